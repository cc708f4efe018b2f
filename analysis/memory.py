"""Memory a computation may use, and refusing one that would not fit.

A request whose estimated working memory exceeds what the machine has free is refused with a
HeadroomError before it starts, instead of being left to the kernel's out-of-memory killer (which
would take the app, and every session in it, down). The limit is the smallest of the kernel's
``MemAvailable``, the cgroup's free memory where one limits this process, and ``$HEADROOM_MEMORY_LIMIT``
(for example ``4GiB``: a cap for a shared machine).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from analysis.errors import HeadroomError

MEMORY_LIMIT_ENV = "HEADROOM_MEMORY_LIMIT"
_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
_CGROUP = Path("/sys/fs/cgroup")
_MEMINFO = Path("/proc/meminfo")


def parse_size(text: str) -> int:
    """``4GiB``, ``512M``, ``1.5g`` or a plain number of bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", text, flags=re.IGNORECASE)
    if not match:
        raise HeadroomError(f"{MEMORY_LIMIT_ENV}={text!r} is not a size; write it like 4GiB, 512MiB or 1000000")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def _meminfo_available() -> int | None:
    try:
        for line in _MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _cgroup_available() -> int | None:
    """Free memory under a cgroup v2 limit, if this process runs under one."""
    try:
        limit = (_CGROUP / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return int(limit) - int((_CGROUP / "memory.current").read_text())
    except (OSError, ValueError):
        return None


def available_bytes() -> tuple[int | None, str]:
    """Memory this process may still take, and what sets that limit; ``(None, ...)`` if unknown."""
    limits = [(_meminfo_available(), "available on this machine"), (_cgroup_available(), "left in this container")]
    if os.environ.get(MEMORY_LIMIT_ENV):
        limits.append((parse_size(os.environ[MEMORY_LIMIT_ENV]), f"allowed by {MEMORY_LIMIT_ENV}"))
    known = [(size, why) for size, why in limits if size is not None]
    return min(known) if known else (None, "unknown")


def require(needed: int, what: str) -> None:
    """Refuse ``what`` if it needs more than ``needed`` bytes of the memory left."""
    free, why = available_bytes()
    if free is not None and needed > free:
        raise HeadroomError(
            f"{what} needs about {_size(needed)} of memory but only {_size(max(free, 0))} is {why}; "
            "use fewer tokens (max-tokens) or shorter windows (seqlen)",
            settings=("max_tokens", "seqlen"),
        )


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"
