"""Reliability and security, as promises (issue 7).

``docs/robustness.md`` lists every bad input tried, what the user sees and the test that proves it.
Promises that other test files already keep are referenced there, not repeated here. Mechanics run
on a tiny random Llama saved to disk (one word is one token); the memory promise runs the real
default model in a child process.
"""

from __future__ import annotations

import ast
import json
import logging
import math
import os
import signal
import subprocess
import sys
import textwrap
import threading
from dataclasses import replace
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from streamlit.testing.v1 import AppTest
from transformers import GPT2Config

import analysis.cli.main as cli
from analysis.cache import DiskCache
from analysis.corpus import MAX_TEXT_BYTES
from analysis.errors import HeadroomError
from analysis.evaluation import cached_perplexity, perplexity
from analysis.export import export_model
from analysis.loading import load_model
from analysis.mask_files import MAX_MASK_BYTES, decode_mask, mask_warnings
from analysis.masks import Mask
from analysis.memory import MEMORY_LIMIT_ENV
from tests.helpers import TINY, random_windows, word_text
from ui import session

ROOT = Path(__file__).resolve().parent.parent
SEQLEN = 16
LAYERS, HEADS = TINY["num_hidden_layers"], TINY["num_attention_heads"]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("texts") / "words.txt"
    path.write_text(word_text(200, seed=5), encoding="utf-8")
    return path


pytestmark = pytest.mark.usefixtures("cache_dir")  # every test gets its own empty result cache


def mask_obj(**fields) -> dict:
    return {"format": "headroom.mask", "version": 1, **fields}


def write(path: Path, content: bytes | str | dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, dict):
        content = json.dumps(content)
    path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return path


def snapshot(*roots: Path) -> dict[str, bytes]:
    """Every file under ``roots`` with its bytes."""
    return {str(p): p.read_bytes() for root in roots if root.exists() for p in sorted(root.rglob("*")) if p.is_file()}


def run_cli(capsys, argv: list[str]) -> tuple[int, str, str]:
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


# --- 1. bad input: one line saying what is wrong and what to do; nothing lost -------------------------


def _bad_input(case: str, tmp: Path, llama_dir: Path, text: Path, monkeypatch) -> tuple[list[str], str, str]:
    """argv of one bad request, a fragment saying what is wrong and one saying what to do."""
    ev = ["eval", "--model", str(llama_dir), "--text", str(text), "--seqlen", str(SEQLEN)]

    def with_model(model: Path | str) -> list[str]:
        return ["eval", "--model", str(model), "--text", str(text), "--seqlen", str(SEQLEN)]

    def with_text(data: bytes) -> list[str]:
        return ["eval", "--model", str(llama_dir), "--text", str(write(tmp / "text.txt", data)), "--seqlen", "16"]

    def with_mask(content: bytes | str | dict) -> list[str]:
        return [*ev, "--mask", str(write(tmp / "mask.json", content))]

    if case == "model-directory-without-config":
        write(tmp / "noconfig" / "model.safetensors", b"")
        return with_model(tmp / "noconfig"), "has no config.json", "point to a Hugging Face model directory"
    if case == "model-of-an-unsupported-architecture":
        GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50).save_pretrained(tmp / "gpt2")
        return with_model(tmp / "gpt2"), "model type 'gpt2' is not supported", "Pick a checkpoint of one of these"
    if case == "model-with-truncated-safetensors":
        broken = tmp / "truncated"
        for f in llama_dir.iterdir():
            write(broken / f.name, f.read_bytes())
        weights = broken / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
        return with_model(broken), "A file may be truncated or corrupt", "cannot load the weights"
    if case == "corrupt-gguf-file":
        return (
            with_model(write(tmp / "m.gguf", b"GGUF\x03\x00\x00\x00" + bytes(range(256)) * 4)),
            "cannot read GGUF",
            ("download it again"),
        )
    if case == "hub-id-with-no-hub-reachable":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        monkeypatch.chdir(tmp)
        return (
            with_model("headroom-tests/no-such-model"),
            "cannot be had from the model hub",
            "pass its local directory",
        )
    if case == "empty-text":
        return with_text(b" \n\n "), "text.txt is empty", "give a text with at least one window"
    if case == "text-shorter-than-one-window":
        return with_text(word_text(10).encode()), "fewer than one window of 16", "argument --seqlen: "
    if case == "latin-1-text":
        return (
            with_text("w3 w4 caf\xe9 w5".encode("latin-1")),
            "text.txt is not valid utf-8: byte 0xe9 at offset 9 (line 1)",
            "argument --encoding: text.txt is not valid utf-8",
        )
    if case == "binary-text":
        return with_text(b"w3 w4\x00\x01\x02"), "looks like binary data (a NUL byte at offset 5)", "give a plain text"
    if case == "text-beyond-the-size-limit":
        big = tmp / "big.txt"
        with open(big, "wb") as f:
            f.truncate(MAX_TEXT_BYTES + 1)  # sparse: refused from its size, never read
        return [*ev[:3], "--text", str(big)], "the limit is 64 MiB", "Use a shorter excerpt"
    if case == "mask-of-unknown-version":
        return (
            with_mask(mask_obj(version=3)),
            "'version' must be 1 or 2, got 3",
            "Fix the file, or make the mask with Headroom",
        )
    if case == "mask-with-a-layer-out-of-range":
        return with_mask(mask_obj(drop_qk=[LAYERS])), f"drop_qk entry {LAYERS} is not a layer index", "in 0..3"
    if case == "mask-with-a-head-count-of-another-model":
        rows = [[1] * (HEADS + 1)] * LAYERS
        return with_mask(mask_obj(heads=rows)), f"heads[0] must have {HEADS} entries", "one per query head"
    if case == "mask-alpha-nan":
        return with_mask('{"format": "headroom.mask", "version": 1, "alpha": {"1": NaN}}'), "alpha", "finite number"
    if case == "mask-alpha-negative":
        return with_mask(mask_obj(alpha={"1": -0.5})), 'alpha["1"] must be in [0, 4]', "got -0.5"
    if case == "mask-alpha-too-large":
        return with_mask(mask_obj(alpha={"1": 4.5})), 'alpha["1"] must be in [0, 4]', "got 4.5"
    if case == "mask-file-beyond-the-size-limit":
        padded = json.dumps(mask_obj()) + " " * MAX_MASK_BYTES
        return with_mask(padded), "a mask is at most 1,048,576 bytes", "Choose the .json that Headroom wrote"
    if case == "mask-not-utf-8":
        return (
            with_mask('{"note": "caf\xe9"}'.encode("latin-1")),
            "byte 0xe9 at offset 13 is not UTF-8",
            "save the mask",
        )
    if case == "negative-seqlen":
        return [*ev[:-1], "-5"], "argument --seqlen: seqlen must be at least 1 tokens, got -5", "a window length"
    if case == "empty-alpha-grid":
        harp = ["harp", "--model", str(llama_dir), "--calib", str(text), "--seqlen", "16", "--layers", "1"]
        return [*harp, "--grid", "", "--out", str(tmp / "kept.json")], "argument --grid: the alpha grid", "e.g. 0,0.5,1"
    if case == "request-beyond-the-memory-limit":
        monkeypatch.setenv(MEMORY_LIMIT_ENV, "64KiB")
        return (
            [*ev, "--no-cache"],
            f"MiB is allowed by {MEMORY_LIMIT_ENV}",
            "arguments --max-tokens, --seqlen: ",
        )
    if case == "incremental-evaluator-beyond-the-memory-limit":
        monkeypatch.setenv(MEMORY_LIMIT_ENV, "64KiB")
        harp = ["harp", "--model", str(llama_dir), "--calib", str(text), "--seqlen", "16", "--layers", "1"]
        return [*harp, "--out", str(tmp / "kept.json")], "every layer's input", "arguments --max-tokens, --seqlen: "
    assert case == "unreadable-memory-limit"
    monkeypatch.setenv(MEMORY_LIMIT_ENV, "lots")
    return [*ev, "--no-cache"], f"{MEMORY_LIMIT_ENV}='lots' is not a size", "write it like 4GiB"


BAD_INPUTS = [
    "model-directory-without-config",
    "model-of-an-unsupported-architecture",
    "model-with-truncated-safetensors",
    "corrupt-gguf-file",
    "hub-id-with-no-hub-reachable",
    "empty-text",
    "text-shorter-than-one-window",
    "latin-1-text",
    "binary-text",
    "text-beyond-the-size-limit",
    "mask-of-unknown-version",
    "mask-with-a-layer-out-of-range",
    "mask-with-a-head-count-of-another-model",
    "mask-alpha-nan",
    "mask-alpha-negative",
    "mask-alpha-too-large",
    "mask-file-beyond-the-size-limit",
    "mask-not-utf-8",
    "negative-seqlen",
    "empty-alpha-grid",
    "request-beyond-the-memory-limit",
    "incremental-evaluator-beyond-the-memory-limit",
    "unreadable-memory-limit",
]


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_error_line_with_advice_and_loses_nothing(
    capsys, tmp_path, monkeypatch, cache_dir, llama_dir, text_file, case
):
    # A good run first, so there is a cache entry and an earlier output that must survive.
    code, _, err = run_cli(capsys, ["eval", "--model", str(llama_dir), "--text", str(text_file), "--seqlen", "16"])
    assert code == 0, err
    kept = Mask.unpruned(load_model(str(llama_dir)).shape, "tiny-llama")
    kept.save(tmp_path / "bad" / "kept.json")
    before = snapshot(cache_dir, tmp_path / "bad" / "kept.json")

    argv, what, todo = _bad_input(case, tmp_path / "bad", llama_dir, text_file, monkeypatch)
    code, out, err = run_cli(capsys, argv)
    assert code == 2
    assert out == ""
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert what in err and todo in err
    after = snapshot(cache_dir, tmp_path / "bad" / "kept.json")
    assert after == before  # no new, changed or removed file in the cache, the earlier output intact


def _eval_with_mask(capsys, llama_dir: Path, text: Path, mask: Path) -> tuple[dict, list[str]]:
    argv = ["eval", "--model", str(llama_dir), "--text", str(text), "--seqlen", "16", "--mask", str(mask), "--json"]
    code, out, err = run_cli(capsys, argv)
    assert code == 0, err
    return json.loads(out), [line for line in err.splitlines() if line.startswith("warning: ")]  # not progress


def test_a_mask_made_for_another_model_is_evaluated_with_a_warning(capsys, tmp_path, llama_dir, text_file):
    rows = [[1] * HEADS for _ in range(LAYERS)]
    rows[2][1] = 0
    plain = write(tmp_path / "plain.json", mask_obj(heads=rows))
    foreign = write(tmp_path / "foreign.json", mask_obj(heads=rows, model={"name": "other", "fingerprint": "f" * 16}))
    expected, quiet = _eval_with_mask(capsys, llama_dir, text_file, plain)
    result, warnings = _eval_with_mask(capsys, llama_dir, text_file, foreign)
    assert quiet == []
    assert result["perplexity"] == expected["perplexity"]
    [warning] = warnings
    assert warning.startswith("warning: the mask was made for model 'other' with fingerprint ffffffffffffffff")
    assert result["model"]["fingerprint"] in warning


def test_every_head_pruned_is_warned_and_perplexity_is_still_computed(capsys, tmp_path, llama_dir, text_file):
    mask = write(tmp_path / "none.json", mask_obj(heads=[[0] * HEADS] * LAYERS))
    unpruned = write(tmp_path / "unpruned.json", mask_obj())
    result, [warning] = _eval_with_mask(capsys, llama_dir, text_file, mask)
    reference, _ = _eval_with_mask(capsys, llama_dir, text_file, unpruned)
    assert warning.startswith("warning: the mask removes the attention of every layer")
    assert math.isfinite(result["perplexity"]) and result["perplexity"] != reference["perplexity"]
    assert result["budget"]["kv_bytes_per_token"] == 0


@pytest.mark.parametrize("how", ["every-head-pruned", "every-alpha-zero", "alpha-zero-or-all-heads-pruned"])
def test_a_model_with_no_attention_left_gives_a_finite_perplexity_in_every_family(tiny_arch, how):
    full = Mask.unpruned(tiny_arch.shape, "tiny")
    mask = full
    for layer in range(LAYERS):
        if how == "every-head-pruned" or (how == "alpha-zero-or-all-heads-pruned" and layer % 2):
            for head in range(HEADS):
                mask = mask.with_head(layer, head, False)
        else:
            mask = mask.with_layer(layer, alpha=0.0)
    [warning] = mask_warnings(mask, None)
    assert warning.startswith("the mask removes the attention of every layer")
    assert mask_warnings(full, None) == []
    windows = random_windows()
    ppl = perplexity(tiny_arch, windows, mask).perplexity
    assert math.isfinite(ppl) and ppl != perplexity(tiny_arch, windows).perplexity


def test_an_oversized_mask_upload_is_refused_before_it_is_parsed(llama_dir):
    lm = load_model(str(llama_dir))
    data = json.dumps(mask_obj()).encode()
    assert decode_mask("upload.json", data, lm.shape, lm.name).is_unpruned
    with pytest.raises(HeadroomError, match=r"upload\.json is 1,048,577 bytes; a mask is at most 1,048,576 bytes"):
        decode_mask("upload.json", data + b" " * (MAX_MASK_BYTES + 1 - len(data)), lm.shape, lm.name)


# --- 2. sessions are isolated ---------------------------------------------------------------------


def test_threads_with_different_masks_get_their_own_perplexities_and_the_weights_stay_bit_identical(tiny_arch):
    arch = tiny_arch
    weights = {k: v.clone() for k, v in arch.model.state_dict().items()}
    full = Mask.unpruned(arch.shape, "tiny")
    masks = [
        full.with_head(0, 0, False).with_layer(3, drop_qk=True, alpha=0.3),
        full.with_layer(1, alpha=0.0).with_head(2, 4, False),
        full,
    ]
    windows = random_windows(n=6)
    sequential = [perplexity(arch, windows, mask).perplexity for mask in masks]
    assert len(set(sequential)) == 3
    start = threading.Barrier(len(masks))
    seen: dict[int, list[float]] = {i: [] for i in range(len(masks))}

    def session(i: int) -> None:
        start.wait()
        for _ in range(5):
            seen[i].append(perplexity(arch, windows, masks[i]).perplexity)

    threads = [threading.Thread(target=session, args=(i,)) for i in range(len(masks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == {i: [sequential[i]] * 5 for i in range(len(masks))}
    after = arch.model.state_dict()
    assert after.keys() == weights.keys()
    assert all(torch.equal(after[k], v) for k, v in weights.items())


# --- 3. the cache survives faults -------------------------------------------------------------------

_KILLED_MIDWAY = """
import sys, time
import torch
import analysis.evaluation as evaluation
from analysis.cache import DiskCache
from analysis.corpus import Windows
from analysis.loading import load_model

lm = load_model(sys.argv[1])
evaluation.TOKENS_PER_BATCH = 16  # one window per batch, so there is a midway
windows = Windows(torch.load(sys.argv[2], weights_only=True), 16, False, "random", "0" * 64)

def progress(done, total):
    print(f"batch {done} of {total}", flush=True)
    time.sleep(60)  # killed here, after one batch

evaluation.cached_perplexity(lm.arch, lm.fingerprint, windows, cache=DiskCache(), progress=progress)
"""

_KILLED_WRITING = """
from analysis.cache import DiskCache

cache = DiskCache()
print("writing", flush=True)
for i in range(1_000_000):
    cache.put_json("stream", {"key": 1}, {"i": i, "payload": [i] * 300_000})  # about 2 MB an entry
"""


def _whole(value: dict) -> bool:
    """Whether a value read back is one complete write: its payload all that write's own number."""
    return len(value["payload"]) == 300_000 and set(value["payload"]) == {value["i"]}


def _child(script: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script), *args], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )


def test_a_computation_killed_midway_leaves_no_entry_and_the_next_run_computes_it(tmp_path, cache_dir, llama_dir):
    lm = load_model(str(llama_dir))
    windows = random_windows(n=4, length=SEQLEN)
    torch.save(windows.input_ids, tmp_path / "ids.pt")
    child = _child(_KILLED_MIDWAY, str(llama_dir), str(tmp_path / "ids.pt"))
    assert child.stdout.readline().startswith("batch 1 of")
    child.send_signal(signal.SIGKILL)
    child.wait()
    stored = [p for p in cache_dir.rglob("results/**/*") if p.is_file()]
    assert [p for p in stored if not p.name.startswith(".")] == []
    assert cached_perplexity(lm.arch, lm.fingerprint, windows, cache=DiskCache()) == perplexity(lm.arch, windows)


def test_a_process_killed_while_writing_an_entry_never_leaves_a_torn_one(cache_dir, caplog):
    """A writer rewrites one entry over and over; it is read meanwhile, then killed with a write under way.

    Every read that finds the entry must get one whole write, and after the kill the last whole write
    must still be there (a torn file would be a miss: the checksum refuses it).
    """
    cache, key = DiskCache(), {"key": 1}
    folder = cache_dir / "results" / "stream"
    with caplog.at_level(logging.WARNING, logger="analysis.cache"):
        for _attempt in range(5):
            child = _child(_KILLED_WRITING)
            assert child.stdout.readline() == "writing\n"
            reads = 0
            while reads == 0 or not any(p.name.startswith(".") for p in folder.iterdir()):
                assert child.poll() is None, "the writer stopped by itself"
                value = cache.get_json("stream", key)
                if value is not None:
                    assert _whole(value)
                    reads += 1
            child.send_signal(signal.SIGKILL)
            child.wait()
            if any(p.name.startswith(".") for p in folder.iterdir()):
                break  # killed with a temporary file open: during a write
        else:
            pytest.fail("the writer was never killed during a write")
        value = cache.get_json("stream", key)
        assert value is not None and _whole(value)
    assert "invalid" not in caplog.text  # no read ever met a torn entry


# --- 4. untrusted files are not code ------------------------------------------------------------------


class _Payload:
    """Unpickling this calls ``Path.touch`` on the marker: code run by merely loading a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_pickled_checkpoint_cannot_run_code(tmp_path, llama_dir):
    directory = tmp_path / "pickled"
    for f in llama_dir.iterdir():
        if f.name != "model.safetensors":
            write(directory / f.name, f.read_bytes())
    marker = tmp_path / "pwned"
    state = load_model(str(llama_dir)).model.state_dict()
    torch.save({**state, "payload": _Payload(marker)}, directory / "pytorch_model.bin")
    with pytest.raises(HeadroomError, match="cannot load the weights or tokenizer"):
        load_model(str(directory), cache_root=tmp_path / "cache")
    assert not marker.exists()


def test_a_model_directorys_own_code_does_not_run_without_the_flag(tmp_path, llama_dir):
    directory = tmp_path / "remote-code"
    for f in llama_dir.iterdir():
        write(directory / f.name, f.read_bytes())
    marker = tmp_path / "pwned"
    write(directory / "modeling_evil.py", f"from pathlib import Path\nPath({str(marker)!r}).touch()\n")
    config = json.loads((directory / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    write(directory / "config.json", config)
    try:
        lm = load_model(str(directory), cache_root=tmp_path / "cache")
        assert type(lm.model).__name__ == "LlamaForCausalLM"  # the stock class, not the directory's
    except HeadroomError:
        pass  # refusing is as good as ignoring
    assert not marker.exists()


def _keyword(call: ast.Call, name: str) -> object:
    return next((k.value.value for k in call.keywords if k.arg == name and isinstance(k.value, ast.Constant)), None)


def test_no_module_unpickles_or_trusts_remote_code_on_its_own():
    sources = [*ROOT.glob("analysis/**/*.py"), ROOT / "app.py", *ROOT.glob("ui/*.py"), *ROOT.glob("app_pages/*.py")]
    assert len(sources) > 20
    for path in sources:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                modules = [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                assert not {"pickle", "cPickle", "dill", "joblib"} & set(modules), path
            if isinstance(node, ast.Call):
                assert _keyword(node, "trust_remote_code") is not True, (path, node.lineno)
                if isinstance(node.func, ast.Attribute) and ast.unparse(node.func) == "torch.load":
                    assert _keyword(node, "weights_only") is True, (path, node.lineno)


def test_cache_entries_stay_inside_the_cache_folder_whatever_the_key(tmp_path):
    root = tmp_path / "cache"
    cache = DiskCache(root)
    hostile = {"text": "../../../escaped", "mask": "/etc/passwd", "note": "..\\..\\x"}
    cache.put_json("perplexity", hostile, 1.0)
    assert cache.get_json("perplexity", hostile) == 1.0
    assert [p.parent for p in root.rglob("*") if p.is_file()] == [root / "results" / "perplexity"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]
    for kind in ("../escaped", "/tmp/escaped", "a/b", ""):
        with pytest.raises(ValueError, match="must be a lowercase name"):
            cache.put_json(kind, {}, 1.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]


def test_an_export_writes_only_inside_its_folder_whatever_the_mask_says(tmp_path, cache_dir, llama_dir):
    lm = load_model(str(llama_dir))
    mask = Mask.unpruned(lm.shape, "../../escaped").with_head(1, 2, False)
    mask = replace(mask, note="/tmp/escaped ../../escaped")
    out = tmp_path / "exports" / "mine"
    out.parent.mkdir()
    export_model(lm, mask, out)
    outside = [p for p in tmp_path.rglob("*") if p.is_file() and not {out, cache_dir} & set(p.parents)]
    assert outside == []
    assert (out / "headroom_mask.json").is_file()


# --- 5. memory ------------------------------------------------------------------------------------------

# The heaviest path at the defaults (2,048 tokens at seqlen 256): the incremental evaluator's first pass
# is a full evaluation that also keeps every layer's input; one layer and one alpha keep the rest short.
_DEFAULT_SETTINGS = """
from analysis.cli.main import main
assert main(["harp", "--layers", "1", "--grid", "1", "--no-cache"]) == 0
"""


@pytest.mark.slow
def test_the_default_model_at_default_settings_stays_under_3_gb(default_model, session_cache, tmp_path):
    with open(tmp_path / "out.txt", "w") as out:
        child = subprocess.Popen(
            [sys.executable, "-c", _DEFAULT_SETTINGS],
            cwd=ROOT,
            env={**os.environ, "HEADROOM_CACHE": str(session_cache)},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        _, status, usage = os.wait4(child.pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, (tmp_path / "out.txt").read_text()
    peak_gib = usage.ru_maxrss * 1024 / 2**30  # Linux reports KiB
    assert peak_gib < 3.0, peak_gib


# --- the app: an error message, and the page keeps working ---------------------------------------------


def test_the_home_page_shows_each_bad_input_as_an_error_and_keeps_working(tmp_path, llama_dir, text_file):
    latin = write(tmp_path / "latin.txt", "caf\xe9 w3".encode("latin-1"))
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    for key, value in {
        session.MODEL: str(llama_dir),
        session.EVAL_TEXT: str(text_file),
        session.SEQLEN: 16,
        session.MAX_TOKENS: 64,
    }.items():
        at.session_state[key] = value
    at.run()
    good = at.metric[0].value
    bad_inputs = [
        ("text_input", session.MODEL, str(tmp_path / "nowhere"), str(llama_dir), "does not exist"),
        ("text_input", session.MODEL, str(tmp_path), str(llama_dir), "has no config.json"),
        ("text_input", session.EVAL_TEXT, str(latin), str(text_file), "is not valid utf-8: byte 0xe9 at offset 3"),
        ("number_input", session.MAX_TOKENS, 8, 64, "max-tokens 8 is smaller than one window of 16"),
    ]
    for widget, key, bad, fixed, message in bad_inputs:
        getattr(at, widget)(key=f"widget_{key}").set_value(bad).run()
        assert not at.exception
        assert [message in e.value for e in at.error] == [True], [e.value for e in at.error]
        getattr(at, widget)(key=f"widget_{key}").set_value(fixed).run()
        assert not at.exception and not at.error
        assert at.metric[0].value == good


@pytest.mark.parametrize("name", ["..", "../../escape.txt", "/etc/hostname", ".hidden", "a b\\c.txt"])
def test_an_uploaded_file_name_cannot_place_the_text_outside_the_uploads_folder(name, tmp_path, monkeypatch):
    from ui import backend

    monkeypatch.setenv("HEADROOM_CACHE", str(tmp_path))
    path = Path(backend.save_upload(name, b"plain words for a text"))
    assert path.is_file() and path.read_bytes() == b"plain words for a text"
    assert path.resolve().is_relative_to((tmp_path / "uploads").resolve())
    assert not path.name.startswith(".")


# --- 6. the test run leaves the environment as it found it ---------------------------------------------

_RUN_AND_CHECK_ENV = """
import json, os
import pytest

seen = set()


class Record:
    def pytest_runtest_call(self, item):
        seen.add(os.environ.get("HEADROOM_CACHE"))


code = pytest.main(["-q", "-p", "no:cacheprovider", "tests/test_memory.py", "-k", "sizes"], plugins=[Record()])
assert code == 0, code
print(json.dumps({"during": sorted(seen), "after": os.environ.get("HEADROOM_CACHE")}))
"""


@pytest.mark.parametrize("preset", [None, "/somewhere/the/user/keeps/it"])
def test_a_test_run_uses_a_cache_of_its_own_and_restores_headroom_cache(preset):
    env = {k: v for k, v in os.environ.items() if k != "HEADROOM_CACHE"}
    if preset is not None:
        env["HEADROOM_CACHE"] = preset
    run = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_RUN_AND_CHECK_ENV)], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads(run.stdout.splitlines()[-1])
    (during,) = report["during"]  # one temporary cache for the whole run, never the user's or the project's
    assert during != preset and not Path(during).resolve().is_relative_to(ROOT)
    assert report["after"] == preset
