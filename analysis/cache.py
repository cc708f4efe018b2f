"""The on-disk result cache under ``cache/``.

Keys are sha256 digests of JSON key parts: the kind of result, the model (its fingerprint and the
dtype it was loaded in: :func:`model_key`), the text sha256 and the parameters. A key that names a
model without its dtype is refused, so results of a bfloat16 and a float32 load never mix. Nothing
device- or path-dependent goes into a key, so a cache computed on a GPU machine can be moved next
to the app on a laptop (``analysis/cache_pack.py``) and read there.

Entries are JSON or safetensors (never pickle), written atomically, and carry a checksum of their
content and their own key parts. A truncated, corrupt or foreign entry is detected on read, removed
and reported as a miss, so the caller recomputes it instead of crashing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from analysis.files import atomic_write, atomic_write_text

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


def _tensor_digest(tensors: dict[str, torch.Tensor], meta: Any) -> str:
    """Checksum of the tensors and of the metadata stored with them."""
    h = hashlib.sha256(f"{_canonical(meta)}|".encode())
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")  # 0-dim too
    return h.hexdigest()


class DiskCache:
    """JSON and tensor results, keyed by what they were computed from."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root is not None else default_root()

    def _path(self, kind: str, parts: dict[str, Any], suffix: str) -> Path:
        if not _KIND.fullmatch(kind):
            raise ValueError(f"cache kind {kind!r} must be a lowercase name such as 'perplexity'")
        if "model" in parts and "dtype" not in parts:
            raise ValueError(
                f"cache key parts of {kind!r} name a model but not its dtype; build them with "
                "LoadedModel.cache_key() or cache.model_key(), so that results of different dtypes never mix"
            )
        digest = hashlib.sha256(_canonical({"kind": kind, **parts}).encode()).hexdigest()[:40]
        return self.root / "results" / kind / f"{digest}{suffix}"

    def _discard(self, path: Path, why: str) -> None:
        log.warning("cache entry %s is invalid (%s); it will be recomputed", path.name, why)
        path.unlink(missing_ok=True)

    def get_json(self, kind: str, parts: dict[str, Any]) -> Any | None:
        path = self._path(kind, parts, ".json")
        if not path.exists():
            return None
        entry = self._read_entry(path)
        if entry is None:
            return None
        if entry["parts"] != json.loads(_canonical(parts)):
            self._discard(path, "key mismatch")
            return None
        return entry["value"]

    def _read_entry(self, path: Path) -> dict[str, Any] | None:
        """The checked ``{"parts", "value"}`` of a JSON entry; None (and the file removed) when invalid."""
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
            ok = (
                isinstance(entry, dict)
                and isinstance(entry.get("parts"), dict)
                and entry.get("sha256") == hashlib.sha256(_canonical(entry.get("value")).encode()).hexdigest()
            )
        except (OSError, ValueError, UnicodeDecodeError) as e:
            self._discard(path, str(e))
            return None
        if not ok:
            self._discard(path, "checksum mismatch")
            return None
        return entry

    def entries(self, kind: str, where: dict[str, Any]) -> Iterator[tuple[dict[str, Any], Any]]:
        """``(parts, value)`` of every valid JSON entry of ``kind`` whose key parts include ``where``.

        The folder of a kind is the index: each entry carries its own key parts, so results can be
        enumerated (the Pareto view collects every mask a model has) without a separate index to keep
        in step. An entry whose own path does not match its parts (a foreign file) is skipped.
        """
        folder = self.root / "results" / kind
        wanted = json.loads(_canonical(where))
        for path in sorted(folder.glob("*.json")) if folder.is_dir() else ():
            entry = self._read_entry(path)
            if entry is None or any(entry["parts"].get(k) != v for k, v in wanted.items()):
                continue
            try:
                own = self._path(kind, entry["parts"], ".json")
            except ValueError:  # parts no key could have been written with
                continue
            if own == path:
                yield entry["parts"], entry["value"]

    def put_json(self, kind: str, parts: dict[str, Any], value: Any) -> None:
        body = _canonical(value)
        entry = {"parts": parts, "sha256": hashlib.sha256(body.encode()).hexdigest(), "value": value}
        atomic_write_text(self._path(kind, parts, ".json"), _canonical(entry))

    def json(self, kind: str, parts: dict[str, Any], compute: Callable[[], Any], refresh: bool = False) -> Any:
        """The cached value, or ``compute()`` stored and returned (always, with ``refresh``)."""
        value = None if refresh else self.get_json(kind, parts)
        if value is None:
            value = compute()
            self.put_json(kind, parts, value)
            value = json.loads(_canonical(value))  # the same types a later cache hit returns
        return value

    def get_tensors(self, kind: str, parts: dict[str, Any]) -> tuple[dict[str, torch.Tensor], Any] | None:
        path = self._path(kind, parts, ".safetensors")
        if not path.exists():
            return None
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                header = json.loads((f.metadata() or {}).get("headroom", "null"))
            tensors = load_file(str(path))
            ok = (
                isinstance(header, dict)
                and header.get("parts") == json.loads(_canonical(parts))
                and header.get("sha256") == _tensor_digest(tensors, header.get("meta"))
            )
        except Exception as e:  # safetensors raises several types on truncated or corrupt files
            self._discard(path, str(e))
            return None
        if not ok:
            self._discard(path, "checksum or key mismatch")
            return None
        return tensors, header.get("meta")

    def put_tensors(self, kind: str, parts: dict[str, Any], tensors: dict[str, torch.Tensor], meta: Any = None) -> None:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        header = {"parts": parts, "sha256": _tensor_digest(tensors, meta), "meta": meta}
        metadata = {"headroom": _canonical(header)}
        atomic_write(
            self._path(kind, parts, ".safetensors"), lambda tmp: save_file(tensors, str(tmp), metadata=metadata)
        )
