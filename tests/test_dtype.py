"""Loading in float32, bfloat16 or float16: weights, losses, cache keys and exports.

Whatever the weights' dtype, logits are upcast to float32 and NLL sums kept in float64; results of
different dtypes never share a cache entry; an export keeps the dtype it was made in.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from analysis.budget import budget
from analysis.cache import DiskCache, read_entry
from analysis.cli.main import main
from analysis.corpus import load_text, make_windows
from analysis.errors import HeadroomError
from analysis.evaluation import IncrementalEvaluator, cached_perplexity, head_token_nll, perplexity
from analysis.export import export_model
from analysis.export_folder import CARD_FILE
from analysis.harp import cached_chosen_harp, cached_harp
from analysis.importance import cached_head_result
from analysis.loading import load_model, pick_dtype
from analysis.masks import Mask
from analysis.pruned_model import max_logit_difference
from analysis.rescale import cached_rescale
from analysis.search import cached_search
from tests.helpers import (
    IDS,
    every_kind_of_pruning,
    masked_logits_and_greedy,
    open_page,
    random_windows,
    word_text,
)
from ui import session

LOW = ["bfloat16", "float16"]
# A tiny random model's perplexity (about its vocabulary, 96) in a 16-bit dtype against float32: 16-bit
# weights and activations move each logit by a few machine epsilons; measured below 0.3 % here.
RELATIVE_PPL_TOLERANCE = 0.01


def stored_dtypes(path: Path) -> set[torch.dtype]:
    return {t.dtype for t in load_file(str(path)).values()}


@pytest.fixture(scope="module")
def loaded(llama_dir, tmp_path_factory):
    """The tiny Llama in every dtype, one fingerprint memo."""
    memo = tmp_path_factory.mktemp("memo")
    return {dt: load_model(str(llama_dir), cache_root=memo, dtype=dt) for dt in ["float32", *LOW]}


def test_auto_is_float32_on_the_cpu_and_bfloat16_on_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_dtype("auto", "cpu") is torch.float32
    assert pick_dtype("auto", "auto") is torch.float32
    assert pick_dtype("auto", "cpu", device_map="auto") is torch.float32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_dtype("auto", "cuda") is torch.bfloat16
    assert pick_dtype("auto", "auto") is torch.bfloat16
    assert pick_dtype("auto", "cpu") is torch.float32  # the device decides, not the machine
    assert pick_dtype("auto", "cpu", device_map="auto") is torch.bfloat16
    assert pick_dtype("float16", "cpu") is torch.float16


def test_unknown_dtype_is_a_headroom_error():
    with pytest.raises(HeadroomError, match="unknown dtype 'int8'; use auto, float32, bfloat16, float16"):
        pick_dtype("int8", "cpu")


@pytest.mark.parametrize("dtype,size", [("float32", 4), ("bfloat16", 2), ("float16", 2)])
def test_weights_card_and_element_size_follow_the_dtype(loaded, dtype, size):
    lm = loaded[dtype]
    assert {p.dtype for p in lm.model.parameters()} == {getattr(torch, dtype)}
    assert lm.card()["dtype"] == lm.dtype == dtype
    assert lm.cache_key() == {"model": lm.fingerprint, "dtype": dtype}
    assert lm.shape.bytes_per_element == size
    # KV bytes per token: 2 (k, v) x layers x KV heads x head_dim x element size.
    s = lm.shape
    expected = 2 * s.num_layers * s.num_kv_heads * s.head_dim * size
    assert budget(Mask.unpruned(s, lm.name), s, 16).kv_bytes_per_token_unpruned == expected


def test_the_fingerprint_does_not_depend_on_the_dtype(loaded):
    assert len({lm.fingerprint for lm in loaded.values()}) == 1


@pytest.mark.parametrize("dtype", LOW)
def test_nll_sums_are_float64_of_float32_logits_whatever_the_weights(loaded, dtype):
    """head_token_nll on 16-bit hidden states equals a float64 cross-entropy of the same 16-bit logits."""
    lm = loaded[dtype]
    windows = random_windows(vocab=lm.model.config.vocab_size, n=6, length=40)
    ids = windows.input_ids
    with torch.no_grad():
        hidden = lm.arch.final_hidden(ids)
        logits = lm.model.lm_head(hidden)
        assert hidden.dtype == logits.dtype == getattr(torch, dtype)
        got = head_token_nll(lm.arch, hidden, ids).sum()
    reference = F.cross_entropy(logits[:, :-1].double().flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(reference.item(), rel=1e-6)
    # Summing in the weights' dtype instead would be off by far more than that.
    low = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none").sum()
    assert abs(low.item() - reference.item()) > 1e-4 * reference.item()


@pytest.mark.parametrize("dtype", LOW)
def test_low_precision_perplexity_is_close_to_float32_and_the_incremental_evaluator_agrees(loaded, dtype):
    windows = random_windows(vocab=loaded["float32"].model.config.vocab_size)
    mask = Mask.unpruned(loaded["float32"].shape, "m").with_head(1, 2, False).with_layer(3, drop_qk=True, alpha=0.5)
    reference = perplexity(loaded["float32"].arch, windows, mask).perplexity
    lm = loaded[dtype]
    full = perplexity(lm.arch, windows, mask).perplexity
    assert full != reference  # really computed in the other dtype
    assert full == pytest.approx(reference, rel=RELATIVE_PPL_TOLERANCE)
    evaluator = IncrementalEvaluator(lm.arch, windows)
    evaluator.perplexity(Mask.unpruned(lm.shape, "m"))
    assert evaluator.perplexity(mask).perplexity == pytest.approx(full, rel=1e-6)


def test_the_cache_never_mixes_dtypes(loaded, tmp_path):
    """One fingerprint, one cache: each dtype gets its own entry, and each reads back its own number."""
    cache = DiskCache(tmp_path)
    windows = random_windows(vocab=loaded["float32"].model.config.vocab_size)
    direct = {dt: perplexity(lm.arch, windows).perplexity for dt, lm in loaded.items()}
    assert len(set(direct.values())) == 3
    for _ in range(2):  # the second round reads hits
        for dt, lm in loaded.items():
            assert cached_perplexity(lm.arch, lm.fingerprint, windows, cache=cache).perplexity == direct[dt]
    assert len(list((tmp_path / "results" / "perplexity").glob("*.json"))) == 3
    # Functions keyed by the loaded model (harp, importance) also keep one entry per dtype.
    for lm in loaded.values():
        cached_harp(lm, windows, [3], [0.0, 1.0], cache=cache)
        cached_head_result(lm, windows, "magnitude", None, cache=cache)
    assert len(list((tmp_path / "results" / "harp").glob("*.json"))) == 3
    assert len(list((tmp_path / "results" / "importance").glob("*.json"))) == 3


@pytest.mark.parametrize("dtype", LOW)
def test_an_export_keeps_its_dtype_and_says_so(loaded, tmp_path, dtype):
    lm = loaded[dtype]
    mask = every_kind_of_pruning(lm)
    result = export_model(lm, mask, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert result.dtype == config["dtype"] == dtype
    assert stored_dtypes(tmp_path / "out" / "model.safetensors") == {getattr(torch, dtype)}
    assert f"Weights: {dtype}" in (tmp_path / "out" / CARD_FILE).read_text()
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True)  # dtype from config
    assert next(exported.parameters()).dtype == getattr(torch, dtype)
    with torch.no_grad():
        got = exported(input_ids=IDS, use_cache=False).logits.float()
    expected, _ = masked_logits_and_greedy(lm, mask, IDS)
    expected = expected.float()
    assert (got - expected).abs().max() <= max_logit_difference(lm.model.dtype, expected.abs().max().item())


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_the_export_check_still_catches_a_wrong_head_or_alpha_step(loaded, dtype):
    """The tolerance is far below what a structural error costs: one more pruned head, and in float32 an
    alpha 0.05 off (the tiny model's logits are about 0.3, under the 16-bit bound's floor of 1)."""
    lm = loaded[dtype]
    mask = every_kind_of_pruning(lm)
    right, _ = masked_logits_and_greedy(lm, mask, IDS)
    allowed = max_logit_difference(lm.model.dtype, right.float().abs().max().item())
    errors = [mask.with_head(1, 0, False)]
    errors += [mask.with_layer(2, alpha=mask.alpha[2] + 0.05)] if dtype == "float32" else []
    for error in errors:
        wrong, _ = masked_logits_and_greedy(lm, error, IDS)
        assert (wrong.float() - right.float()).abs().max() > 2 * allowed


def test_cli_dtype_reaches_the_card_and_the_cache_key(llama_dir, tmp_path, capsys, cache_dir):
    text = tmp_path / "words.txt"
    text.write_text(word_text(200, seed=1), encoding="utf-8")
    outs = {}
    for dtype in ["float32", "bfloat16", "auto"]:
        args = ["--model", str(llama_dir), "--text", str(text), "--seqlen", "16", "--dtype", dtype, "--json"]
        code = main(["eval", *args])
        out, err = capsys.readouterr()
        assert code == 0, err
        outs[dtype] = json.loads(out)
    assert outs["bfloat16"]["model"]["dtype"] == "bfloat16"
    assert outs["auto"]["model"]["dtype"] == "float32"  # CPU
    assert outs["auto"]["perplexity"] == outs["float32"]["perplexity"] != outs["bfloat16"]["perplexity"]
    assert math.isclose(outs["bfloat16"]["perplexity"], outs["float32"]["perplexity"], rel_tol=RELATIVE_PPL_TOLERANCE)
    assert (
        outs["bfloat16"]["budget"]["kv_bytes_per_token_unpruned"] * 2
        == outs["float32"]["budget"]["kv_bytes_per_token_unpruned"]
    )


def test_cli_refuses_an_unknown_dtype(capsys):
    with pytest.raises(SystemExit) as info:
        main(["eval", "--dtype", "int8"])
    assert info.value.code == 2
    assert "invalid choice: 'int8'" in capsys.readouterr().err


def test_a_float32_checkpoint_is_cast_once_into_a_16_bit_copy_with_the_same_weights(llama_dir, tmp_path, monkeypatch):
    root = tmp_path / "cache"
    reference = AutoModelForCausalLM.from_pretrained(str(llama_dir), dtype=torch.bfloat16).state_dict()
    first = load_model(str(llama_dir), cache_root=root, dtype="bfloat16")
    (copy,) = (root / "models").glob("cast-*")
    assert copy.name == f"cast-{first.fingerprint}-bfloat16"
    assert stored_dtypes(next(copy.glob("*.safetensors"))) == {torch.bfloat16}
    assert first.fingerprint == load_model(str(llama_dir), cache_root=root, dtype="float32").fingerprint
    assert list((root / "models").glob("cast-*")) == [copy]  # float32 needs no copy
    weights = first.model.state_dict()
    assert weights.keys() == reference.keys() and all(torch.equal(weights[k], reference[k]) for k in reference)

    read: list[Path] = []
    original = AutoModelForCausalLM.from_pretrained

    def recording(path, *args, **kwargs):
        read.append(Path(path))
        return original(path, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", recording)
    second = load_model(str(llama_dir), cache_root=root, dtype="bfloat16")
    assert read == [copy]  # the float32 file is not read again
    assert torch.equal(first.model(input_ids=IDS).logits, second.model(input_ids=IDS).logits)
    assert (second.fingerprint, second.name, second.source) == (first.fingerprint, first.name, first.source)


@pytest.mark.slow
def test_the_converted_default_model_stays_float32_on_disk_and_loads_in_bfloat16(default_model, session_cache):
    lm = load_model("default", cache_root=session_cache, dtype="bfloat16")
    assert lm.fingerprint == default_model.fingerprint and lm.dtype == "bfloat16"
    (converted,) = (session_cache / "models").glob("gguf-*")
    assert stored_dtypes(next(converted.glob("*.safetensors"))) == {torch.float32}
    assert {p.dtype for p in lm.model.parameters()} == {torch.bfloat16}


def test_the_home_page_dtype_setting_loads_that_dtype_everywhere(llama_dir, tmp_path, cache_dir):
    """auto is float32 on this CPU; bfloat16 reaches the card, the perplexity and the editor's live evaluator
    (which must not reuse the float32 evaluator built on the same fingerprint and windows)."""
    text = tmp_path / "words.txt"
    text.write_text(word_text(200, seed=2), encoding="utf-8")
    settings = {session.MODEL: str(llama_dir), session.EVAL_TEXT: str(text), session.CALIB_TEXT: str(text)}
    settings |= {session.SEQLEN: 16, session.MAX_TOKENS: 64}
    expected = {}
    for dtype in ("float32", "bfloat16"):
        lm = load_model(str(llama_dir), cache_root=tmp_path / "memo", dtype=dtype)
        windows = make_windows(lm.tokenizer, load_text(str(text)), 16, 64, lm.max_positions)
        expected[dtype] = f"{perplexity(lm.arch, windows).perplexity:.3f}"
    assert expected["float32"] != expected["bfloat16"]

    def live(at) -> str:
        assert not at.exception and not at.error, at.error
        shown = {m.label: m.value for m in at.metric}
        assert shown["Live perplexity"] == shown["Unpruned, same tokens"]
        return shown["Live perplexity"]

    assert live(open_page("app_pages/4_Mask_editor.py", settings).run()) == expected["float32"]  # auto, built first
    at = open_page(settings=settings).run()  # another session, on the home page
    assert not at.exception and not at.error, at.error
    for dtype in ("float32", "bfloat16"):
        if dtype == "bfloat16":
            at.selectbox(key=f"widget_{session.DTYPE}").set_value("bfloat16").run()
        assert at.selectbox(key=f"widget_{session.DTYPE}").value == ("auto" if dtype == "float32" else dtype)
        assert at.table[0].value["dtype"].iloc[0] == dtype
        assert at.metric[0].value == expected[dtype]
    assert live(at.switch_page("app_pages/4_Mask_editor.py").run()) == expected["bfloat16"]


def test_searches_are_cached_per_dtype(loaded, tmp_path):
    """search, the greedy layer choice and rescale key their results by fingerprint and dtype like every result."""
    cache = DiskCache(tmp_path)
    windows = random_windows(vocab=loaded["float32"].model.config.vocab_size, n=2, length=16)
    for lm in (loaded["float32"], loaded["bfloat16"]):
        mask = Mask.unpruned(lm.shape, lm.name).with_layer(3, drop_qk=True)
        cached_search(lm, windows, {"kv": lm.shape.head_dim * 4}, 16, shortlist=2, proxy_windows=1, cache=cache)
        cached_chosen_harp(lm, windows, 1, [2, 3], [0.0, 1.0], cache=cache)
        cached_rescale(lm, mask, windows, search=False, cache=cache)
    for kind in ("search", "harp_chosen", "rescale"):
        entries = [read_entry(p) for p in (tmp_path / "results" / kind).iterdir()]
        assert sorted(e.parts["dtype"] for e in entries) == ["bfloat16", "float32"], kind
