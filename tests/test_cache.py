"""The on-disk result cache (analysis/cache.py) and atomic writes (analysis/files.py)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import multiprocessing
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import types
from pathlib import Path

import pytest
import torch

from analysis.cache import PROJECT_ROOT, DiskCache, default_root, model_key, read_entry
from analysis.cache_pack import MANIFEST, pack, unpack
from analysis.errors import HeadroomError
from analysis.files import atomic_write, atomic_write_text
from tests.helpers import save_checkpoint, word_text

KIND = "perplexity"
PARTS = {
    "model": "fp-0123456789abcdef",
    "dtype": "float32",
    "text_sha256": "ab" * 32,
    "seqlen": 256,
    "windows": 16,
    "mask": {"format": "headroom.mask", "drop_qk": [26, 27], "alpha": {"26": 0.2}},
}
VALUE = {"perplexity": 36.5, "nll": [3.5, 3.25], "predicted_tokens": 4080, "note": "é"}
STATS = {"entropy": [[0.5, 1.25], [2.0, 0.0]], "layers": [26, 27]}  # another kind's value


def entries(root: Path, kind: str = KIND) -> list[Path]:
    """Every file under the kind's folder, hidden temporary files included."""
    folder = root / "results" / kind
    return sorted(folder.iterdir()) if folder.exists() else []


def only_entry(root: Path) -> Path:
    found = [p for p in entries(root) if not p.name.startswith(".")]
    assert len(found) == 1, found
    return found[0]


class Counter:
    """A compute function that counts its calls."""

    def __init__(self, value) -> None:
        self.value = value
        self.calls = 0

    def __call__(self):
        self.calls += 1
        return self.value


# --- round trips and keys -------------------------------------------------------------------------


def test_json_round_trip(tmp_path):
    cache = DiskCache(root=tmp_path)
    assert cache.get_json(KIND, PARTS) is None
    cache.put_json(KIND, PARTS, VALUE)
    assert cache.get_json(KIND, PARTS) == VALUE
    assert [p.suffix for p in entries(tmp_path)] == [".json"]


def test_json_computes_once_and_returns_the_same_types_as_a_hit(tmp_path):
    cache = DiskCache(root=tmp_path)
    compute = Counter({"pair": (1, 2), "x": 1.5})
    first = cache.json(KIND, PARTS, compute)
    second = cache.json(KIND, PARTS, compute)
    assert compute.calls == 1
    assert first == second == {"pair": [1, 2], "x": 1.5}  # the tuple comes back as a list both times


def test_part_order_does_not_matter(tmp_path):
    cache = DiskCache(root=tmp_path)
    cache.put_json(KIND, PARTS, VALUE)
    reordered = dict(reversed(list(PARTS.items())))
    reordered["mask"] = dict(reversed(list(PARTS["mask"].items())))
    assert cache.get_json(KIND, reordered) == VALUE


def _variants() -> dict[str, tuple[str, dict]]:
    def changed(key, value):
        return {**PARTS, key: value}

    without_windows = {k: v for k, v in PARTS.items() if k != "windows"}
    return {
        "kind": ("eval", PARTS),
        "model": (KIND, changed("model", "fp-other")),
        "dtype": (KIND, changed("dtype", "bfloat16")),
        "text": (KIND, changed("text_sha256", "cd" * 32)),
        "seqlen": (KIND, changed("seqlen", 512)),
        "seqlen-type": (KIND, changed("seqlen", "256")),
        "windows": (KIND, changed("windows", 17)),
        "mask": (KIND, changed("mask", {**PARTS["mask"], "alpha": {"26": 0.3}})),
        "mask-nested": (KIND, changed("mask", {**PARTS["mask"], "drop_qk": [27, 26]})),
        "extra-part": (KIND, changed("device", None)),
        "missing-part": (KIND, without_windows),
    }


def test_keys_differ_when_any_part_differs(tmp_path):
    cache = DiskCache(root=tmp_path)
    cache.put_json(KIND, PARTS, VALUE)
    variants = _variants()
    for name, (kind, parts) in variants.items():
        assert cache.get_json(kind, parts) is None, name
        cache.put_json(kind, parts, {"variant": name})
    assert cache.get_json(KIND, PARTS) == VALUE  # no variant overwrote the original
    for name, (kind, parts) in variants.items():
        assert cache.get_json(kind, parts) == {"variant": name}
    files = [p for kind in (KIND, "eval") for p in entries(tmp_path, kind)]
    assert len({p.name for p in files}) == len(files) == 1 + len(variants)


@pytest.mark.parametrize("op", ["get_json", "put_json", "json"])
def test_a_key_naming_a_model_without_its_dtype_is_refused(tmp_path, op):
    cache = DiskCache(root=tmp_path)
    parts = {k: v for k, v in PARTS.items() if k != "dtype"}
    args = {"put_json": (VALUE,), "json": (lambda: VALUE,)}.get(op, ())
    with pytest.raises(ValueError, match="name a model but not its dtype"):
        getattr(cache, op)(KIND, parts, *args)
    assert not (tmp_path / "results").exists()


def test_model_key_names_the_dtype_without_the_torch_prefix():
    assert model_key("fp", torch.bfloat16) == {"model": "fp", "dtype": "bfloat16"}
    assert model_key("fp", torch.float32) != model_key("fp", torch.float16)


def test_entries_hold_no_path_and_can_be_moved(tmp_path):
    here, there = tmp_path / "here" / "cache", tmp_path / "elsewhere" / "copy"
    cache = DiskCache(root=here)
    cache.put_json(KIND, PARTS, VALUE)
    for path in here.rglob("*"):
        if path.is_file():
            assert str(tmp_path).encode() not in path.read_bytes()
            assert str(tmp_path) not in path.name
    shutil.copytree(here, there)
    shutil.rmtree(here)
    moved = DiskCache(root=there)
    assert moved.get_json(KIND, PARTS) == VALUE
    assert not here.exists()  # nothing was read or written at the old place


def test_default_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("HEADROOM_CACHE", str(tmp_path / "env-cache"))
    assert default_root() == tmp_path / "env-cache"
    assert DiskCache().root == tmp_path / "env-cache"
    monkeypatch.delenv("HEADROOM_CACHE")
    assert default_root() == PROJECT_ROOT / "cache"


# --- faults are misses ----------------------------------------------------------------------------


def damaged(good: bytes, damage: str, i: int) -> bytes:
    """``good`` cut to its first ``i`` bytes, or with one bit of byte ``i`` flipped."""
    if damage == "truncated":
        return good[:i]
    bad = bytearray(good)
    bad[i] ^= 0x01
    return bytes(bad)


@pytest.mark.parametrize("damage", ["truncated", "flipped-byte"])
def test_every_truncation_and_every_flipped_byte_of_an_entry_is_a_miss(tmp_path, caplog, damage):
    cache = DiskCache(root=tmp_path)
    cache.put_json(KIND, PARTS, VALUE)
    path = only_entry(tmp_path)
    good = path.read_bytes()
    for i in range(len(good)):  # from nothing to one byte short; every byte of the file
        path.write_bytes(damaged(good, damage, i))
        with caplog.at_level(logging.WARNING, logger="analysis.cache"):
            assert cache.get_json(KIND, PARTS) is None, i
        assert not path.exists(), i  # the bad file is removed
    assert "will be recomputed" in caplog.text
    compute = Counter(VALUE)
    path.write_bytes(good[: len(good) // 2])
    assert cache.json(KIND, PARTS, compute) == VALUE
    assert compute.calls == 1
    assert cache.json(KIND, PARTS, compute) == VALUE
    assert compute.calls == 1  # the recomputed entry is good


def test_json_entry_edited_without_its_checksum_is_recomputed(tmp_path):
    cache = DiskCache(root=tmp_path)
    cache.put_json(KIND, PARTS, VALUE)
    path = only_entry(tmp_path)
    entry = json.loads(path.read_text(encoding="utf-8"))
    entry["value"]["perplexity"] = 12.0  # a tempting edit, checksum left as it was
    path.write_text(json.dumps(entry), encoding="utf-8")
    compute = Counter(VALUE)
    assert cache.json(KIND, PARTS, compute) == VALUE
    assert compute.calls == 1
    assert json.loads(path.read_text(encoding="utf-8"))["value"]["perplexity"] == 36.5


def test_json_entry_of_another_key_is_a_miss(tmp_path):
    """A file copied over another entry's name has the right checksum but the wrong parts."""
    cache = DiskCache(root=tmp_path)
    other = {**PARTS, "seqlen": 512}
    cache.put_json(KIND, other, {"perplexity": 1.0})
    cache.put_json(KIND, PARTS, VALUE)
    paths = entries(tmp_path)
    mine = next(p for p in paths if json.loads(p.read_text())["parts"]["seqlen"] == 256)
    theirs = next(p for p in paths if p != mine)
    shutil.copyfile(theirs, mine)
    assert cache.get_json(KIND, PARTS) is None
    assert not mine.exists()
    assert cache.get_json(KIND, other) == {"perplexity": 1.0}


def test_empty_entry_is_a_miss(tmp_path):
    cache = DiskCache(root=tmp_path)
    cache.put_json(KIND, PARTS, VALUE)
    only_entry(tmp_path).write_bytes(b"")
    compute = Counter(VALUE)
    assert cache.json(KIND, PARTS, compute) == VALUE
    assert compute.calls == 1
    assert cache.get_json(KIND, PARTS) == VALUE


def test_leftover_temporary_file_is_a_miss(tmp_path):
    """A write killed before its rename leaves `.<name>.<random>.tmp` beside where the entry goes."""
    cache = DiskCache(root=tmp_path)
    cache.put_json(KIND, PARTS, VALUE)
    path = only_entry(tmp_path)
    good = path.read_bytes()
    path.unlink()
    leftover = path.with_name(f".{path.name}.k1ll3d.tmp")
    leftover.write_bytes(good[: len(good) // 2])
    assert cache.get_json(KIND, PARTS) is None
    compute = Counter(VALUE)
    assert cache.json(KIND, PARTS, compute) == VALUE
    assert compute.calls == 1
    assert cache.get_json(KIND, PARTS) == VALUE
    assert path.read_bytes() == good  # the new write did not pick up the leftover


def test_leftover_temporary_file_beside_a_good_entry_is_ignored(tmp_path):
    cache = DiskCache(root=tmp_path)
    cache.put_json(KIND, PARTS, VALUE)
    path = only_entry(tmp_path)
    path.with_name(f".{path.name}.k1ll3d.tmp").write_text('{"parts": ', encoding="utf-8")
    compute = Counter({"perplexity": 0.0})
    assert cache.json(KIND, PARTS, compute) == VALUE
    assert compute.calls == 0


# --- two writers at once --------------------------------------------------------------------------

ROUNDS = 30


def _hammer(root: str, start, rounds: int) -> None:
    """Child process: write the same entries over and over, starting together with the others."""
    cache = DiskCache(root=Path(root))
    start.wait(120)
    for _ in range(rounds):
        cache.put_json(KIND, PARTS, VALUE)


def test_two_processes_writing_one_entry_leave_a_valid_entry(tmp_path, caplog, monkeypatch):
    # A spawned child first re-runs this process's ``__main__`` from its file. After an AppTest in the same pytest
    # process that is app.py (Streamlit's script runner installs the page as ``__main__`` and leaves it), which
    # cannot run outside Streamlit; the writers need nothing from ``__main__``, so they get an empty one.
    monkeypatch.setitem(sys.modules, "__main__", types.ModuleType("__main__"))
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(3)  # both writers, once imported, and this reader
    procs = [ctx.Process(target=_hammer, args=(str(tmp_path), start, ROUNDS)) for _ in range(2)]
    for p in procs:
        p.start()
    start.wait(120)
    cache = DiskCache(root=tmp_path)
    reads = 0
    with caplog.at_level(logging.WARNING, logger="analysis.cache"):
        while any(p.is_alive() for p in procs):  # read while they write: never a torn entry
            value = cache.get_json(KIND, PARTS)
            assert value in (None, VALUE)
            reads += 1
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert "invalid" not in caplog.text  # no reader ever saw a half-written file
    assert reads > 0
    assert cache.get_json(KIND, PARTS) == VALUE
    assert [p.suffix for p in entries(tmp_path)] == [".json"]  # no temporary files left


# --- atomic_write ---------------------------------------------------------------------------------


def test_atomic_write_failure_keeps_the_old_file(tmp_path):
    path = tmp_path / "result.json"
    path.write_text("old contents", encoding="utf-8")

    def half_then_fail(tmp: Path) -> None:
        assert tmp != path and tmp.parent == path.parent
        tmp.write_text("new but incompl", encoding="utf-8")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, half_then_fail)
    assert path.read_text(encoding="utf-8") == "old contents"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]


def test_atomic_write_failure_creates_nothing(tmp_path):
    path = tmp_path / "sub" / "result.json"

    def fail(tmp: Path) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, fail)
    assert not path.exists()
    assert list(path.parent.iterdir()) == []


def test_atomic_write_replaces_and_uses_ordinary_permissions(tmp_path):
    path = tmp_path / "result.txt"
    path.write_text("old", encoding="utf-8")
    atomic_write_text(path, "new ✓")
    assert path.read_text(encoding="utf-8") == "new ✓"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.txt"]
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


# --- packs: one model's results moved to another machine ------------------------------------------

FP, OTHER_FP = "fp-0123456789abcdef", "fp-fedcba9876543210"


def fill(cache: DiskCache) -> None:
    """Entries of two models, two dtypes and two kinds, and one key naming no model."""
    for fp in (FP, OTHER_FP):
        for dtype in ("float32", "bfloat16"):
            cache.put_json(KIND, {**PARTS, "model": fp, "dtype": dtype}, {**VALUE, "dtype": dtype})
            cache.put_json("attention_stats", {**PARTS, "model": fp, "dtype": dtype}, STATS)
    cache.put_json("corpus", {"text_sha256": "cd" * 32}, {"tokens": 3})


def files_under(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def tar_of(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def members_of(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar}


@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_pack_holds_exactly_one_models_valid_entries(tmp_path, dtype, caplog):
    source = DiskCache(tmp_path / "a")
    fill(source)
    corrupt = source._path(KIND, {**PARTS, "model": FP, "dtype": "float16"})
    source.put_json(KIND, {**PARTS, "model": FP, "dtype": "float16"}, VALUE)
    corrupt.write_text(corrupt.read_text().replace("36.5", "37.5"))  # content no longer matches its checksum
    report = pack(source, FP, tmp_path / "fp.tar", dtype)

    wanted = [p for p in source.entry_files() if p != corrupt]
    wanted = [
        p for p in wanted if read_entry(p).parts.get("model") == FP and dtype in (None, read_entry(p).parts["dtype"])
    ]
    members = members_of(tmp_path / "fp.tar")
    manifest = json.loads(members.pop(MANIFEST))
    assert members == {p.relative_to(source.root).as_posix(): p.read_bytes() for p in wanted}
    assert len(members) == report.entries == (2 if dtype else 4)
    assert manifest["model"] == report.model == FP
    assert manifest["dtypes"] == list(report.dtypes) == (["bfloat16"] if dtype else ["bfloat16", "float32"])
    assert manifest["entries"] == {m: hashlib.sha256(b).hexdigest() for m, b in members.items()}
    assert report.invalid_skipped == 1 and report.kinds == {
        "attention_stats": len(members) // 2,
        KIND: len(members) // 2,
    }


def test_unpack_into_an_empty_cache_gives_hits_of_the_same_values(tmp_path):
    source, target = DiskCache(tmp_path / "a"), DiskCache(tmp_path / "b")
    fill(source)
    pack(source, FP, tmp_path / "fp.tar")
    report = unpack(target, tmp_path / "fp.tar")
    assert (report.added, report.already_present, report.model) == (4, 0, FP)
    for dtype in ("float32", "bfloat16"):
        parts = {**PARTS, "model": FP, "dtype": dtype}
        assert target.get_json(KIND, parts) == {**VALUE, "dtype": dtype}
        assert target.get_json("attention_stats", parts) == STATS
        assert target.get_json(KIND, {**parts, "model": OTHER_FP}) is None  # only the packed model
    assert [p.name for p in target.root.iterdir()] == ["results"]  # no staging folder left
    again = unpack(target, tmp_path / "fp.tar")  # the same pack twice: nothing changes
    assert (again.added, again.already_present) == (0, 4)


def test_unpack_never_replaces_a_valid_entry_silently(tmp_path):
    source, target = DiskCache(tmp_path / "a"), DiskCache(tmp_path / "b")
    fill(source)
    pack(source, FP, tmp_path / "fp.tar")
    parts = {**PARTS, "model": FP, "dtype": "float32"}
    target.put_json(KIND, parts, {**VALUE, "perplexity": 36.6})  # same key, other numbers (another device)
    before = files_under(target.root)
    with pytest.raises(
        HeadroomError,
        match=r"1 entries of .* differ from valid entries already in the cache .*"
        r"nothing was unpacked. Rerun with --on-conflict keep",
    ):
        unpack(target, tmp_path / "fp.tar")
    assert files_under(target.root) == before

    kept = unpack(target, tmp_path / "fp.tar", on_conflict="keep")
    assert (kept.added, kept.conflicts_kept) == (3, 1)
    assert target.get_json(KIND, parts)["perplexity"] == 36.6
    replaced = unpack(target, tmp_path / "fp.tar", on_conflict="replace")
    assert (replaced.added, replaced.already_present, replaced.conflicts_replaced) == (0, 3, 1)
    assert target.get_json(KIND, parts)["perplexity"] == 36.5


def test_unpack_replaces_a_corrupt_entry(tmp_path):
    source, target = DiskCache(tmp_path / "a"), DiskCache(tmp_path / "b")
    fill(source)
    pack(source, FP, tmp_path / "fp.tar")
    parts = {**PARTS, "model": FP, "dtype": "float32"}
    target.put_json(KIND, parts, VALUE)
    path = target._path(KIND, parts)
    path.write_bytes(path.read_bytes()[:20])  # truncated
    report = unpack(target, tmp_path / "fp.tar")
    assert (report.added, report.replaced_invalid) == (3, 1)
    assert target.get_json(KIND, parts) == {**VALUE, "dtype": "float32"}


def _tampered(tmp_path: Path, case: str) -> tuple[Path, str]:
    """A pack of FP changed in one way, and what the refusal must say."""
    source = DiskCache(tmp_path / "a")
    fill(source)
    pack(source, FP, tmp_path / "fp.tar")
    members = members_of(tmp_path / "fp.tar")
    manifest = json.loads(members[MANIFEST])
    name = next(m for m in members if m.startswith(f"results/{KIND}/"))  # holds 36.5
    if case == "flipped-byte":
        data = bytearray(members[name])
        data[len(data) // 2] ^= 1
        members[name] = bytes(data)
        why = f"member {name} does not match its sha256 in the manifest"
    elif case == "consistent-edit":  # bytes and manifest agree, the entry's own checksum does not
        members[name] = members[name].replace(b"36.5", b"37.5")
        manifest["entries"][name] = hashlib.sha256(members[name]).hexdigest()
        why = f"entry {name} is invalid (checksum mismatch)"
    elif case == "renamed":  # a valid entry under another key's name
        other = name[:-10] + "0" * 5 + name[-5:]
        members[other] = members.pop(name)
        manifest["entries"][other] = manifest["entries"].pop(name)
        why = f"entry {other} is invalid (its name is not the digest of its key"
    elif case == "foreign-model":  # another model's valid entry, slipped in with a right sha256
        cache = DiskCache(tmp_path / "a")
        path = cache._path(KIND, {**PARTS, "model": OTHER_FP, "dtype": "float32"})
        foreign = path.relative_to(cache.root).as_posix()
        members[foreign] = path.read_bytes()
        manifest["entries"][foreign] = hashlib.sha256(members[foreign]).hexdigest()
        why = f"entry {foreign} is of model '{OTHER_FP}', the pack of '{FP}'"
    elif case == "unlisted":
        extra = f"results/{KIND}/{'e' * 40}.json"
        members[extra] = members[name]
        why = f"member {extra} is not in its manifest"
    elif case == "missing":
        del members[name]
        why = "1 entries of its manifest are missing"
    elif case == "path-outside":
        members["../../escaped.json"] = members[name]
        why = "member ../../escaped.json is not a result entry"
    elif case == "no-manifest":
        del members[MANIFEST]
        why = f"it has no {MANIFEST} of format headroom.cache-pack"
    elif case == "newer-version":
        manifest["version"] = 99
        why = "pack version 99; this Headroom reads version 1"
    if MANIFEST in members:
        members[MANIFEST] = json.dumps(manifest).encode()
    return tar_of(tmp_path / f"{case}.tar", members), why


TAMPERINGS = [
    "flipped-byte",
    "consistent-edit",
    "renamed",
    "foreign-model",
    "unlisted",
    "missing",
    "path-outside",
    "no-manifest",
    "newer-version",
]


@pytest.mark.parametrize("case", TAMPERINGS)
def test_a_corrupt_or_foreign_pack_is_refused_and_writes_nothing(tmp_path, case):
    archive, why = _tampered(tmp_path, case)
    target = DiskCache(tmp_path / "b")
    target.put_json(KIND, {**PARTS, "model": OTHER_FP, "dtype": "float32"}, VALUE)  # something to keep
    before = files_under(tmp_path)
    with pytest.raises(HeadroomError) as info:
        unpack(target, archive)
    message = str(info.value)
    assert message.startswith(f"{archive} is not a valid Headroom cache pack: {why}"), message
    assert message.endswith("; nothing was unpacked") and "\n" not in message
    assert files_under(tmp_path) == before  # no entry, no staging folder, nothing escaped


@pytest.mark.parametrize("case", ["cut-early", "cut-late", "not-a-tar"])
def test_a_truncated_or_non_tar_file_is_refused(tmp_path, case):
    source = DiskCache(tmp_path / "a")
    fill(source)
    pack(source, FP, tmp_path / "fp.tar")
    whole = (tmp_path / "fp.tar").read_bytes()
    content_end = len(whole.rstrip(b"\0"))  # the archive ends in zero padding; cut into the last member's data
    data = {"cut-early": whole[: len(whole) // 3], "cut-late": whole[: content_end - 10]}.get(case)
    bad = tmp_path / "bad.tar"
    bad.write_bytes(data if data is not None else source.entry_files()[0].read_bytes())
    with pytest.raises(HeadroomError, match=r"bad\.tar is not a valid Headroom cache pack: .*; nothing was unpacked"):
        try:
            unpack(DiskCache(tmp_path / "b"), bad)
        except HeadroomError as e:
            assert "\n" not in str(e)  # one line for the CLI
            raise
    assert not (tmp_path / "b" / "results").exists()


def test_packing_a_model_with_nothing_cached_says_so(tmp_path):
    cache = DiskCache(tmp_path / "a")
    fill(cache)
    with pytest.raises(HeadroomError, match=r"holds no results of model tiny \(fingerprint fp-none\) in float16"):
        pack(cache, "fp-none", tmp_path / "x.tar", "float16", name="tiny")
    assert not (tmp_path / "x.tar").exists()


# The other machine: unpack, then run CLI commands on a model whose every module refuses to run forward, so
# any result that is not read from the cache fails the command instead of being recomputed.
OTHER_MACHINE = """
import contextlib, io, json, sys
import analysis.cli.main as cli

real_load = cli.load_model


def refuse(module, args):
    raise RuntimeError(f"recomputed: {type(module).__name__} ran forward")


def load_without_forward(*args, **kwargs):
    lm = real_load(*args, **kwargs)
    for module in lm.model.modules():
        module.register_forward_pre_hook(refuse)
    return lm


cli.load_model = load_without_forward
outputs = {}
for name, argv in json.loads(sys.argv[1]).items():
    stdout = io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout):
            code = cli.main(argv)
        outputs[name] = json.loads(stdout.getvalue()) if code == 0 else f"exit status {code}"
    except RuntimeError as e:
        outputs[name] = str(e)
print(json.dumps(outputs))
"""


def test_results_packed_on_one_machine_are_hits_on_another(tmp_path, monkeypatch):
    """Computed with ``--device-map auto``, packed (bfloat16 only), unpacked into an empty cache in another process
    that runs the same commands with ``--device auto`` and a model copied elsewhere: every one is a hit, and the
    float32 result, not packed, is not (it would be recomputed, which the other process refuses)."""
    import analysis.cli.main as cli

    here, there = tmp_path / "gpu-box", tmp_path / "laptop"
    save_checkpoint(here / "tiny-llama")
    (here / "words.txt").write_text(word_text(200, seed=5), encoding="utf-8")
    mask = {"format": "headroom.mask", "version": 1, "model": {"name": "tiny-llama"}}
    mask |= {"heads": [[1] * 6, [1, 0, 1, 1, 1, 1], [1] * 6, [1] * 6], "drop_qk": [3], "alpha": {"3": 0.5}}
    (here / "mask.json").write_text(json.dumps(mask), encoding="utf-8")
    shutil.copytree(here, there)
    text = ["--seqlen", "16", "--max-tokens", "96"]
    commands = {
        "eval": ["eval", "--text", "words.txt", *text],
        "eval-masked": ["eval", "--text", "words.txt", "--mask", "mask.json", *text],
        "importance": ["importance", "--metric", "wanda_sp", "--text", "words.txt", *text],
        "harp": ["harp", "--calib", "words.txt", "--layer-set", "2,3", "--grid", "0,0.5,1", *text],
        "drift": ["drift", "--mask", "mask.json", "--text", "words.txt", *text],
        "compare": [
            "compare",
            "--calib",
            "words.txt",
            "--eval",
            "words.txt",
            "--layers",
            "1",
            *text,
            "--eval-max-tokens",
            "96",
        ],
    }

    def argv(command: list[str], device: list[str], dtype: str = "bfloat16") -> list[str]:
        return [*command, "--model", "tiny-llama", *device, "--dtype", dtype, "--json"]

    monkeypatch.chdir(here)
    monkeypatch.setenv("HEADROOM_CACHE", str(here / "cache"))
    computed = {}
    for name, command in {**commands, "eval-float32": commands["eval"]}.items():
        dtype = "float32" if name == "eval-float32" else "bfloat16"
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            assert cli.main(argv(command, ["--device-map", "auto"], dtype)) == 0
        computed[name] = json.loads(stdout.getvalue())
    with contextlib.redirect_stdout(io.StringIO()):
        assert cli.main(["cache", "pack", "--model", "tiny-llama", "--dtype", "bfloat16", str(tmp_path / "p.tar")]) == 0

    runs = {"unpack": ["cache", "unpack", str(tmp_path / "p.tar"), "--json"]}
    runs |= {name: argv(command, ["--device", "auto"]) for name, command in commands.items()}
    runs["eval-float32"] = argv(commands["eval"], ["--device", "auto"], "float32")
    env = {**os.environ, "HEADROOM_CACHE": str(there / "cache"), "PYTHONPATH": str(PROJECT_ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", OTHER_MACHINE, json.dumps(runs)], cwd=there, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    read = json.loads(done.stdout)
    assert read.pop("unpack")["added"] > len(commands)
    assert read.pop("eval-float32").startswith("recomputed: ")  # not packed: proves a miss would have failed
    for name in commands:
        assert isinstance(read[name], dict), f"{name}: {read[name]}"
        for out in (read[name], computed[name]):
            out.pop("seconds")
        assert read[name] == computed[name], name
