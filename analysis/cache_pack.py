"""Moving one model's cached results to another machine: ``cache pack`` and ``cache unpack``.

A pack is a tar archive of the result entries of one model fingerprint (all dtypes, or one) and a
manifest listing each entry with the sha256 of its bytes. Result keys hold no device or path, so
entries computed on a GPU box are hits on a laptop that loads the same checkpoint in the same dtype.

Unpacking is all or nothing: every member is read into a staging folder inside the cache and
verified (a manifest of this format, no member outside it, the bytes' sha256, the entry's own
checksum, its name being the digest of its key, and its model being the pack's) before any entry is
moved into place. A valid entry already in the cache is never replaced silently: one with the same
content is left as it is, one with other content is a conflict, refused unless ``on_conflict`` says
to keep the cache's or to take the pack's. Converted models and fingerprint memos are not packed:
the receiving machine converts and fingerprints its own copy of the checkpoint.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from analysis.cache import DiskCache, Entry, InvalidEntry, read_entry
from analysis.errors import HeadroomError
from analysis.files import atomic_write

PACK_FORMAT = "headroom.cache-pack"
PACK_VERSION = 1
MANIFEST = "headroom-pack.json"
CONFLICT_CHOICES = ("refuse", "keep", "replace")
_MEMBER = re.compile(r"results/[a-z][a-z0-9_]*/[0-9a-f]{40}\.json")


@dataclass(frozen=True)
class _Report:
    """What both reports start with: the pack file, and the model and dtypes of its entries."""

    path: str
    model: str
    dtypes: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "dtypes": list(self.dtypes)}


@dataclass(frozen=True)
class PackReport(_Report):
    """What ``pack`` wrote."""

    entries: int
    bytes: int
    kinds: dict[str, int]  # kind -> entries
    invalid_skipped: int  # corrupt entries of the cache, left out


@dataclass(frozen=True)
class UnpackReport(_Report):
    """What ``unpack`` did with each entry of a pack."""

    added: int
    already_present: int  # the same content was in the cache
    replaced_invalid: int  # the cache held a corrupt entry there
    conflicts_kept: int  # other content was in the cache and kept (on_conflict="keep")
    conflicts_replaced: int  # other content was in the cache and replaced (on_conflict="replace")


def _model_entries(cache: DiskCache, fingerprint: str, dtype: str | None) -> tuple[list[tuple[Path, Entry]], int]:
    """The cache's valid entries of ``fingerprint`` (in ``dtype`` if given), and how many invalid ones it skipped."""
    chosen, invalid = [], 0
    for path in cache.entry_files():
        try:
            entry = read_entry(path)
        except InvalidEntry:
            invalid += 1
            continue
        if entry.parts.get("model") == fingerprint and dtype in (None, entry.parts.get("dtype")):
            chosen.append((path, entry))
    return chosen, invalid


def pack(cache: DiskCache, fingerprint: str, out: Path, dtype: str | None = None, name: str = "") -> PackReport:
    """Write every valid result entry of model ``fingerprint`` (only ``dtype``'s if given) to the tar ``out``."""
    out = Path(out)
    if out.is_dir():
        raise HeadroomError(f"{out} is a directory; give the pack a file name such as {out / 'results.tar'}")
    if not out.parent.is_dir():
        raise HeadroomError(f"folder {out.parent} does not exist; create it first")
    chosen, invalid = _model_entries(cache, fingerprint, dtype)
    label = f"model {name} " if name else "model "
    if not chosen:
        which = f" in {dtype}" if dtype else ""
        raise HeadroomError(
            f"the cache {cache.root} holds no results of {label}(fingerprint {fingerprint}){which}; "
            "compute them first (for example `python -m analysis eval --model ...`) or check --model and --dtype"
        )
    members: list[tuple[str, bytes]] = []
    for path, _ in chosen:
        members.append((path.relative_to(cache.root).as_posix(), path.read_bytes()))
    dtypes = tuple(sorted({str(entry.parts.get("dtype")) for _, entry in chosen}))
    manifest = {
        "format": PACK_FORMAT,
        "version": PACK_VERSION,
        "model": fingerprint,
        "name": name,
        "dtypes": list(dtypes),
        "entries": {member: hashlib.sha256(data).hexdigest() for member, data in members},
    }

    def write(tmp: Path) -> None:
        with tarfile.open(tmp, "w") as tar:
            for member, data in [(MANIFEST, json.dumps(manifest, indent=1).encode()), *members]:
                info = tarfile.TarInfo(member)
                info.size, info.mode = len(data), 0o644
                tar.addfile(info, io.BytesIO(data))

    atomic_write(out, write)
    kinds: dict[str, int] = {}
    for _, entry in chosen:
        kinds[entry.kind] = kinds.get(entry.kind, 0) + 1
    total = sum(len(data) for _, data in members)
    return PackReport(str(out), fingerprint, dtypes, len(members), total, dict(sorted(kinds.items())), invalid)


def _refuse(archive: Path, why: str) -> HeadroomError:
    return HeadroomError(f"{archive} is not a valid Headroom cache pack: {why}; nothing was unpacked")


def _read_members(archive: Path, staging: Path) -> tuple[dict[str, Any], dict[str, Path]]:
    """The manifest and every entry member of ``archive``, copied under ``staging`` (never ``tar.extract``)."""
    manifest: dict[str, Any] | None = None
    staged: dict[str, Path] = {}
    opened = False
    try:
        with tarfile.open(archive, "r:*") as tar:
            opened = True
            for info in tar:
                if info.name in staged or (info.name == MANIFEST and manifest is not None):
                    raise _refuse(archive, f"member {info.name} appears twice")
                if not info.isfile():
                    raise _refuse(archive, f"member {info.name} is not a regular file")
                if info.name != MANIFEST and not _MEMBER.fullmatch(info.name):
                    raise _refuse(archive, f"member {info.name} is not a result entry")
                data = tar.extractfile(info)
                if info.name == MANIFEST:
                    manifest = json.loads(data.read().decode("utf-8"))
                    continue
                target = staging / info.name
                target.parent.mkdir(parents=True, exist_ok=True)
                with open(target, "wb") as f:
                    shutil.copyfileobj(data, f)
                staged[info.name] = target
    except HeadroomError:
        raise
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:  # ValueError: a manifest that is no JSON
        if not opened:
            raise _refuse(archive, "it is not a tar archive") from None
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise _refuse(archive, f"it is truncated or corrupt ({first})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != PACK_FORMAT:
        raise _refuse(archive, f"it has no {MANIFEST} of format {PACK_FORMAT}")
    if manifest.get("version") != PACK_VERSION:
        raise _refuse(archive, f"pack version {manifest.get('version')!r}; this Headroom reads version {PACK_VERSION}")
    if not isinstance(manifest.get("model"), str) or not isinstance(manifest.get("entries"), dict):
        raise _refuse(archive, "its manifest names no model or no entries")
    return manifest, staged


def _verified(archive: Path, manifest: dict[str, Any], staged: dict[str, Path]) -> Iterator[tuple[str, Entry]]:
    listed = manifest["entries"]
    missing = sorted(set(listed) - set(staged))
    if missing:
        raise _refuse(archive, f"{len(missing)} entries of its manifest are missing, e.g. {missing[0]}")
    for member, path in staged.items():
        if member not in listed:
            raise _refuse(archive, f"member {member} is not in its manifest")
        with open(path, "rb") as f:
            if hashlib.file_digest(f, "sha256").hexdigest() != listed[member]:
                raise _refuse(archive, f"member {member} does not match its sha256 in the manifest (corrupt)")
        try:
            entry = read_entry(path)
        except InvalidEntry as e:
            raise _refuse(archive, f"entry {member} is invalid ({e})") from None
        if entry.parts.get("model") != manifest["model"]:
            raise _refuse(
                archive, f"entry {member} is of model {entry.parts.get('model')!r}, the pack of {manifest['model']!r}"
            )
        yield member, entry


def _existing(path: Path) -> Entry | None:
    """The valid entry at ``path``, or None if there is none or it is corrupt."""
    try:
        return read_entry(path) if path.exists() else None
    except InvalidEntry:
        return None


def unpack(cache: DiskCache, archive: Path, on_conflict: str = "refuse") -> UnpackReport:
    """Add the entries of pack ``archive`` to ``cache``, after verifying all of them (see the module docstring)."""
    archive = Path(archive)
    if on_conflict not in CONFLICT_CHOICES:
        raise HeadroomError(f"unknown conflict policy '{on_conflict}'; use {', '.join(CONFLICT_CHOICES)}")
    if not archive.is_file():
        raise HeadroomError(f"pack {archive} does not exist or is not a file; check the path")
    cache.root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".unpack-", dir=cache.root))  # same file system: moves are renames
    try:
        manifest, staged = _read_members(archive, staging)
        counts = dict.fromkeys(("added", "already_present", "replaced_invalid", "kept", "replaced"), 0)
        moves, conflicts = [], []
        for member, entry in _verified(archive, manifest, staged):
            old = _existing(cache.root / member)
            if not (cache.root / member).exists():
                outcome = "added"
            elif old is None:
                outcome = "replaced_invalid"
            elif old.sha256 == entry.sha256:
                outcome = "already_present"
            else:
                conflicts.append(member)
                outcome = "kept" if on_conflict == "keep" else "replaced"
            counts[outcome] += 1
            if outcome in ("added", "replaced_invalid", "replaced"):
                moves.append(member)
        if conflicts and on_conflict == "refuse":
            raise HeadroomError(
                f"{len(conflicts)} entries of {archive} differ from valid entries already in the cache "
                f"{cache.root} (e.g. {conflicts[0]}: the same computation, other numbers, as from another device); "
                "nothing was unpacked. Rerun with --on-conflict keep to keep the cache's or replace to take the pack's"
            )
        for member in moves:
            (cache.root / member).parent.mkdir(parents=True, exist_ok=True)
            os.replace(staged[member], cache.root / member)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return UnpackReport(
        str(archive),
        manifest["model"],
        tuple(manifest.get("dtypes", ())),
        counts["added"],
        counts["already_present"],
        counts["replaced_invalid"],
        counts["kept"],
        counts["replaced"],
    )
