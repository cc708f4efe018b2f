"""The memory helpers on hand-made inputs: sizes as people write them, /proc/meminfo and cgroup v2 files."""

from __future__ import annotations

from pathlib import Path

import pytest

import analysis.memory as memory
from analysis.errors import HeadroomError
from analysis.memory import MEMORY_LIMIT_ENV, available_bytes, parse_size, require

MEMINFO = """MemTotal:       16318480 kB
MemFree:          512000 kB
MemAvailable:    8000000 kB
Buffers:          123456 kB
"""


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("4GiB", 4 * 2**30),
        ("512M", 512 * 2**20),
        ("1.5g", 3 * 2**29),
        ("1000000", 1_000_000),
        (" 2 KiB ", 2048),
        ("3kb", 3 * 1024),
        ("1T", 2**40),
        ("0", 0),
    ],
)
def test_sizes_read_as_people_write_them(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["lots", "", "4 GB extra", "-1", "1e9", "4 PiB", "GiB"])
def test_a_size_that_is_not_one_says_how_to_write_it(text):
    with pytest.raises(HeadroomError, match=r"is not a size; write it like 4GiB, 512MiB or 1000000"):
        parse_size(text)


@pytest.fixture
def machine(tmp_path, monkeypatch) -> Path:
    """An empty stand-in for /proc/meminfo and /sys/fs/cgroup (files are added by each test), no env limit."""
    monkeypatch.setattr(memory, "_MEMINFO", tmp_path / "meminfo")
    monkeypatch.setattr(memory, "_CGROUP", tmp_path / "cgroup")
    (tmp_path / "cgroup").mkdir()
    monkeypatch.delenv(MEMORY_LIMIT_ENV, raising=False)
    return tmp_path


def test_meminfo_gives_memavailable_in_bytes(machine):
    (machine / "meminfo").write_text(MEMINFO)
    assert memory._meminfo_available() == 8_000_000 * 1024
    (machine / "meminfo").write_text(MEMINFO.replace("MemAvailable", "MemAvail"))  # a kernel without the line
    assert memory._meminfo_available() is None
    (machine / "meminfo").unlink()
    assert memory._meminfo_available() is None


def test_cgroup_gives_what_is_left_under_its_limit(machine):
    cgroup = machine / "cgroup"
    assert memory._cgroup_available() is None  # no cgroup files: not limited
    (cgroup / "memory.max").write_text("max\n")
    (cgroup / "memory.current").write_text("536870912\n")
    assert memory._cgroup_available() is None  # a cgroup without a limit
    (cgroup / "memory.max").write_text("1073741824\n")
    assert memory._cgroup_available() == 2**29
    (cgroup / "memory.current").write_text("garbage\n")
    assert memory._cgroup_available() is None


def test_the_smallest_limit_wins_and_says_where_it_comes_from(machine, monkeypatch):
    assert available_bytes() == (None, "unknown")
    (machine / "meminfo").write_text(MEMINFO)
    assert available_bytes() == (8_000_000 * 1024, "available on this machine")
    (machine / "cgroup" / "memory.max").write_text(str(2**30))
    (machine / "cgroup" / "memory.current").write_text(str(2**29 + 2**28))
    assert available_bytes() == (2**28, "left in this container")
    monkeypatch.setenv(MEMORY_LIMIT_ENV, "100MiB")
    assert available_bytes() == (100 * 2**20, f"allowed by {MEMORY_LIMIT_ENV}")


def test_require_refuses_only_what_does_not_fit(machine, monkeypatch):
    monkeypatch.setenv(MEMORY_LIMIT_ENV, "1GiB")
    require(2**30, "exactly the limit")
    with pytest.raises(HeadroomError) as info:
        require(2**30 + 1, "evaluating 8 windows")
    assert str(info.value).startswith("evaluating 8 windows needs about 1.0 GiB of memory but only 1.0 GiB is allowed")
    assert info.value.settings == ("max_tokens", "seqlen")
    (machine / "cgroup" / "memory.max").write_text(str(2**20))
    (machine / "cgroup" / "memory.current").write_text(str(2**21))  # over its limit already: nothing is left
    with pytest.raises(HeadroomError, match=r"needs about 0\.0 MiB of memory but only 0\.0 MiB is left in this"):
        require(1, "anything")
