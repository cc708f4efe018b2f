"""An export's folder: the files that make one, and writing it safely.

An export is built in a temporary folder next to its destination and moved into place at the very
end. It replaces an existing folder only when asked to, only if that folder is itself a Headroom
export (:func:`export_problem`), and only once the new one is complete.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

from analysis.errors import HeadroomError
from analysis.files import atomic_directory
from analysis.masks import FORMAT

MASK_FILE = "headroom_mask.json"
CARD_FILE = "README.md"
MAX_NAME_BYTES = 200  # an export folder's name; its staging siblings add 30 bytes and a file name may have 255
REQUIRED_FILES = ("config.json", MASK_FILE, CARD_FILE)  # with weights, what marks a folder as a Headroom export


def export_problem(path: Path) -> str | None:
    """Why ``path`` is not a Headroom export, or None when it is one: only such a folder is ever replaced.

    An export is a real folder (not a link) holding only files (no sub-folder, no link), among them
    ``REQUIRED_FILES`` and ``*.safetensors`` weights, with a Headroom mask (JSON, ``format`` ``headroom.mask``)
    as its mask file.
    """
    if path.is_symlink():
        return "it is a symbolic link"
    if not path.is_dir():
        return "it is not a folder"
    entries = list(path.iterdir())
    odd = sorted(p.name for p in entries if p.is_symlink() or not p.is_file())
    if odd:
        return f"it holds {odd[0]!r}, a folder or link that no export writes"
    missing = [name for name in REQUIRED_FILES if not (path / name).is_file()]
    if missing:
        return f"it has no {' and no '.join(missing)}"
    if not any(p.suffix == ".safetensors" for p in entries):
        return "it has no weights (*.safetensors)"
    try:
        mask = json.loads((path / MASK_FILE).read_bytes())
    except (ValueError, OSError):
        return f"its {MASK_FILE} is not JSON"
    if not isinstance(mask, dict) or mask.get("format") != FORMAT:
        return f"its {MASK_FILE} is not a Headroom mask"
    return None


def _refuse_to_replace(path: Path, problem: str) -> HeadroomError:
    return HeadroomError(
        f"{path} is not a Headroom export ({problem}), so it is never replaced and nothing was deleted; "
        "give a new folder name, or the name of an earlier export to replace"
    )


def check_destination(out: str | Path, force: bool) -> Path:
    """Refuse a destination the export could not (or must not) be moved to, before any long computation.

    ``force`` replaces only an earlier Headroom export (:func:`export_problem`); any other non-empty
    folder, a file or a link is refused, and nothing is deleted.
    """
    text = str(out).strip()
    if not text:
        raise HeadroomError("the output folder is empty; give a folder name such as exports/my-model")
    control = next((c for c in text if ord(c) < 32 or ord(c) == 127), None)
    if control is not None:
        raise HeadroomError(f"the output folder's name holds the control character {control!r}; give a plain name")
    path = Path(text).expanduser()
    if len(path.name.encode("utf-8")) > MAX_NAME_BYTES:
        raise HeadroomError(
            f"the output folder's name is {len(path.name.encode('utf-8'))} bytes long; give one of at most "
            f"{MAX_NAME_BYTES} bytes"
        )
    if path.is_symlink():
        raise HeadroomError(f"{path} is a symbolic link; an export never writes through one. Give a new folder name")
    if path.exists() and not path.is_dir():
        raise HeadroomError(f"{path} exists and is not a folder; give a new folder name")
    if path.is_dir() and any(path.iterdir()):
        if not force:
            raise HeadroomError(
                f"{path} already exists and is not empty; pick another folder, or ask to replace it",
                settings=("force",),
            )
        if problem := export_problem(path):
            raise _refuse_to_replace(path, problem)
    parent = path.parent
    if not parent.is_dir():
        raise HeadroomError(f"folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise HeadroomError(f"folder {parent} is not writable; pick a folder you can write to")
    return path


def _move_into_place(built: Path, path: Path, force: bool) -> None:
    """Rename ``built`` to ``path``; an existing export at ``path`` is renamed aside first and deleted only afterwards.

    What is deleted is checked after it was renamed aside, so a folder that changed since
    :func:`check_destination` (anything but an earlier export) is put back untouched and refused.
    """
    if path.is_symlink():
        raise HeadroomError(f"{path} became a symbolic link while the export was built; nothing was written")
    if not path.exists() or (path.is_dir() and not any(path.iterdir())):
        os.replace(built, path)
        return
    if not force:
        raise HeadroomError(f"{path} appeared while the export was built; pick another folder, or ask to replace it")
    old = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.old")
    os.rename(path, old)
    if problem := export_problem(old):
        os.rename(old, path)
        raise _refuse_to_replace(path, problem)
    try:
        os.rename(built, path)
    except OSError:
        os.rename(old, path)
        raise
    shutil.rmtree(old, ignore_errors=True)


def write_folder(path: Path, fill: Callable[[Path], None], force: bool) -> None:
    """Write the folder ``path`` by ``fill`` on a staging folder next to it, then move it into place."""
    staging = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.export")
    try:
        atomic_directory(staging, fill)
        _move_into_place(staging, path, force)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
