"""What an app visitor may open and where they may write: the local workbench, or a demo on a shared server.

The workbench (the default) trusts its user: models and texts are paths on the user's own machine.
In demo mode (``HEADROOM_DEMO=1``, started with ``make demo``) the app is one server process shared by an
audience, and nothing a visitor types names a file: a model is the embedded default or one the operator
listed (``HEADROOM_DEMO_MODELS``), a text is a built-in split or a file the visitor uploaded, and an
export is a *name* of a folder below one exports folder (``HEADROOM_EXPORTS``). Every check resolves
links, so a link planted in either folder cannot lead out of it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from analysis.cache import PROJECT_ROOT, default_root
from analysis.corpus import DEFAULT_TEXTS
from analysis.errors import HeadroomError
from analysis.loading import DEFAULT_MODEL

DEMO_ENV = "HEADROOM_DEMO"  # "1" turns demo mode on, "0" or unset keeps the workbench
MODELS_ENV = "HEADROOM_DEMO_MODELS"  # comma-separated model specs the operator allows besides the default
EXPORTS_ENV = "HEADROOM_EXPORTS"  # the one folder demo exports go below (default: exports/ in the project)
UPLOADS = "uploads"  # uploaded texts are kept below <cache root>/uploads/
MAX_NAME_CHARS = 100
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class Access:
    """The policy a session's choices go through; in the workbench every check lets the input pass."""

    demo: bool
    models: tuple[str, ...]  # model specs a demo visitor may pick, the embedded default first
    exports_dir: str  # absolute; demo exports are written only directly below it
    uploads_dir: str  # absolute; the only place a demo text file may come from

    @classmethod
    def from_env(cls) -> Access:
        """The policy the environment sets (see the module docstring); a malformed setting is refused."""
        env = os.environ
        flag = env.get(DEMO_ENV, "0").strip()
        if flag not in ("0", "1", ""):
            raise HeadroomError(f"{DEMO_ENV}={flag!r} is not 0 or 1; set {DEMO_ENV}=1 for a demo, or unset it")
        listed = [spec.strip() for spec in env.get(MODELS_ENV, "").split(",") if spec.strip()]
        models = tuple(dict.fromkeys([DEFAULT_MODEL, *listed]))
        exports = Path(env.get(EXPORTS_ENV, "").strip() or PROJECT_ROOT / "exports").expanduser().absolute()
        return cls(flag == "1", models, str(exports), str((default_root() / UPLOADS).expanduser().absolute()))

    def model(self, spec: str) -> str:
        """``spec`` if this session may load it; in a demo only the default and the operator's models."""
        if self.demo and spec not in self.models:
            raise HeadroomError(
                f"this demo offers only the models {', '.join(self.models)}; pick one of them "
                f"(the operator adds others with {MODELS_ENV})"
            )
        return spec

    def text(self, spec: str) -> str:
        """``spec`` if this session may read it; in a demo only the built-in splits and uploaded files."""
        if not self.demo or spec in DEFAULT_TEXTS:
            return spec
        if _inside(Path(spec), Path(self.uploads_dir), file=True):
            return spec
        raise HeadroomError(
            f"this demo reads only the built-in texts ({', '.join(DEFAULT_TEXTS)}) and texts you upload; "
            "upload the text instead of naming a file"
        )

    def export_path(self, name: str) -> Path:
        """The folder an export called ``name`` goes to in a demo: ``exports_dir/name``, for a plain name only.

        Creates the exports folder when missing. The export itself still goes through
        ``export.check_destination`` (which refuses links and replaces only an earlier export).
        """
        problem = name_problem(name)
        if problem:
            raise HeadroomError(f"the export name {problem}")
        root = Path(self.exports_dir)
        root.mkdir(parents=True, exist_ok=True)
        path = root / name
        if path.is_symlink() or not _inside(path, root):
            raise HeadroomError(f"the export name {name!r} is taken by a link; pick another name")
        return path

    def upload_path(self, name: str, sha256: str) -> Path:
        """Where an uploaded text is kept: ``uploads_dir/<sha256[:16]>/<name>``, its name made a plain file name.

        The browser supplies ``name``: only its last part is kept, with anything but letters, digits,
        '.', '_' and '-' replaced, no leading dot and at most ``MAX_NAME_CHARS`` characters (its end,
        so the extension stays).
        """
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", name.replace("\\", "/").rsplit("/", 1)[-1])
        safe = safe[-MAX_NAME_CHARS:].lstrip(".") or "upload.txt"
        return Path(self.uploads_dir) / sha256[:16] / safe


def name_problem(name: str) -> str | None:
    """What is wrong with ``name`` as a folder name a visitor gives (the message's tail), or None."""
    if not name:
        return "is empty; give a name such as my-pruned-model"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "holds a control character (a newline or NUL, for example); give a plain name"
    if len(name) > MAX_NAME_CHARS:
        return f"is {len(name)} characters long; give one of at most {MAX_NAME_CHARS}"
    if "/" in name or "\\" in name or name in (".", ".."):
        return f"{name!r} is a path; give a plain name (the demo decides the folder)"
    if not _NAME.fullmatch(name):
        return f"{name!r} may use only letters, digits, '.', '_' and '-', and must start with a letter or digit"
    return None


def _inside(path: Path, root: Path, *, file: bool = False) -> bool:
    """Whether ``path``, with every link resolved, lies strictly below ``root`` (and with ``file``, is a file).

    A path the system cannot look at (a NUL byte, a name over the system's limit) lies nowhere.
    """
    try:
        resolved, top = path.resolve(), root.resolve()
        return resolved.is_relative_to(top) and resolved != top and (not file or resolved.is_file())
    except (OSError, ValueError):
        return False
