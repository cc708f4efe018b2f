"""The on-disk result cache under ``cache/``.

Keys are sha256 digests of JSON key parts: the kind of result, the model (its fingerprint and the
dtype it was loaded in: :func:`model_key`), the text sha256 and the parameters. A key that names a
model without its dtype is refused, so results of a bfloat16 and a float32 load never mix. Nothing
device- or path-dependent goes into a key, so a cache computed on a GPU machine can be moved next
to the app on a laptop (``analysis/cache_pack.py``) and read there.

Entries are JSON files (never pickle), written atomically, and carry a checksum of their content
and their own key parts. A truncated, corrupt or foreign entry is detected on read, removed
and reported as a miss, so the caller recomputes it instead of crashing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from analysis.files import atomic_write_text

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
_KIND = re.compile(r"[a-z][a-z0-9_]*")  # a kind names a folder; user data only ever reaches a path as a digest


def default_root() -> Path:
    """``$HEADROOM_CACHE`` if set, else ``cache/`` in the project root."""
    return Path(os.environ.get("HEADROOM_CACHE") or PROJECT_ROOT / "cache")


def model_key(fingerprint: str, dtype: torch.dtype) -> dict[str, str]:
    """The key parts naming a model: its fingerprint and the dtype its weights were loaded in."""
    return {"model": fingerprint, "dtype": str(dtype).removeprefix("torch.")}


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


class InvalidEntry(ValueError):
    """An entry file that is truncated, corrupt, or not the entry its name says."""


@dataclass(frozen=True)
class Entry:
    """A verified entry file: its kind, key parts and content checksum, and its value."""

    kind: str
    parts: dict[str, Any]
    sha256: str
    value: Any


ENTRY_SUFFIX = ".json"


def _digest(kind: str, parts: dict[str, Any]) -> str:
    return hashlib.sha256(_canonical({"kind": kind, **parts}).encode()).hexdigest()[:40]


def read_entry(path: Path) -> Entry:
    """The entry in file ``path`` (``.../results/<kind>/<digest>.json``), verified.

    Its content must match its checksum, and its name the digest of its kind (the folder) and key parts, so a
    file copied under another name or into another kind's folder is refused too. Raises :class:`InvalidEntry`.
    """
    kind = path.parent.name
    try:
        if path.suffix != ENTRY_SUFFIX:
            raise InvalidEntry(f"{path.suffix or 'no suffix'} is not an entry file ({ENTRY_SUFFIX})")
        entry = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(entry, dict) or not isinstance(entry.get("parts"), dict):
            raise InvalidEntry("not a cache entry")
        checksum, parts, value = entry.get("sha256"), entry["parts"], entry.get("value")
        ok = checksum == hashlib.sha256(_canonical(value).encode()).hexdigest()
    except InvalidEntry:
        raise
    except Exception as e:  # reading and json raise several types on truncated or corrupt files
        raise InvalidEntry(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__) from None
    if not ok:
        raise InvalidEntry("checksum mismatch")
    if not _KIND.fullmatch(kind) or path.stem != _digest(kind, parts):
        raise InvalidEntry(f"its name is not the digest of its key (kind {kind!r})")
    return Entry(kind, parts, checksum, value)


class DiskCache:
    """JSON results, keyed by what they were computed from."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root is not None else default_root()

    def _path(self, kind: str, parts: dict[str, Any]) -> Path:
        if not _KIND.fullmatch(kind):
            raise ValueError(f"cache kind {kind!r} must be a lowercase name such as 'perplexity'")
        if "model" in parts and "dtype" not in parts:
            raise ValueError(
                f"cache key parts of {kind!r} name a model but not its dtype; build them with "
                "LoadedModel.cache_key() or cache.model_key(), so that results of different dtypes never mix"
            )
        return self.root / "results" / kind / f"{_digest(kind, parts)}{ENTRY_SUFFIX}"

    def entry_files(self) -> list[Path]:
        """Every entry file in the cache (not temporary files), unverified, sorted."""
        return sorted(p for p in (self.root / "results").glob(f"*/*{ENTRY_SUFFIX}") if not p.name.startswith("."))

    def get_json(self, kind: str, parts: dict[str, Any]) -> Any | None:
        """The value stored under this key, or None (also for an invalid entry, which is removed)."""
        path = self._path(kind, parts)
        if not path.exists():
            return None
        try:
            entry = read_entry(path)
        except InvalidEntry as e:
            why = str(e)
        else:
            if entry.parts == json.loads(_canonical(parts)):
                return entry.value
            why = "key mismatch"
        self._discard(path, why)
        return None

    def _discard(self, path: Path, why: str) -> None:
        log.warning("cache entry %s is invalid (%s); it will be recomputed", path.name, why)
        path.unlink(missing_ok=True)

    def entries(self, kind: str, where: dict[str, Any]) -> Iterator[tuple[dict[str, Any], Any]]:
        """``(parts, value)`` of every valid JSON entry of ``kind`` whose key parts include ``where``.

        The folder of a kind is the index: each entry carries its own key parts, so results can be
        enumerated (the Pareto view collects every mask a model has) without a separate index to keep
        in step. An invalid entry (corrupt, or a file whose name is not its key's digest) is removed, as on a read.
        """
        wanted = json.loads(_canonical(where))
        for path in sorted((self.root / "results" / kind).glob(f"*{ENTRY_SUFFIX}")):
            try:
                entry = read_entry(path)
            except InvalidEntry as e:
                self._discard(path, str(e))
                continue
            if all(entry.parts.get(k) == v for k, v in wanted.items()):
                yield entry.parts, entry.value

    def put_json(self, kind: str, parts: dict[str, Any], value: Any) -> None:
        body = _canonical(value)
        entry = {"parts": parts, "sha256": hashlib.sha256(body.encode()).hexdigest(), "value": value}
        atomic_write_text(self._path(kind, parts), _canonical(entry))

    def json(self, kind: str, parts: dict[str, Any], compute: Callable[[], Any], refresh: bool = False) -> Any:
        """The cached value, or ``compute()`` stored and returned (always, with ``refresh``)."""
        value = None if refresh else self.get_json(kind, parts)
        if value is None:
            value = compute()
            self.put_json(kind, parts, value)
            value = json.loads(_canonical(value))  # the same types a later cache hit returns
        return value
