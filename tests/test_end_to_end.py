"""The real embedded model and corpus, end to end: GGUF -> cache -> protocol perplexity -> CLI."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from analysis.corpus import default_text, make_windows
from analysis.evaluation import IncrementalEvaluator, perplexity
from analysis.loading import default_gguf, load_model
from analysis.masks import Mask

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def eval_windows(default_model):
    return make_windows(default_model.tokenizer, default_text("default-eval"), 256, 2048)


def test_default_model_is_smollm2_with_grouped_query_attention(default_model):
    card = default_model.card()
    assert (card["name"], card["family"]) == ("SmolLM2-135M-Instruct", "Llama")
    assert (card["layers"], card["heads"], card["kv_heads"], card["head_dim"]) == (30, 9, 3, 64)


def test_second_load_reads_the_converted_checkpoint(default_model, session_cache, monkeypatch):
    import analysis.loading

    monkeypatch.setattr(analysis.loading, "_convert_gguf", lambda *a: pytest.fail("converted twice"))
    again = load_model("default", cache_root=session_cache)
    assert again.fingerprint == default_model.fingerprint
    for (name, a), b in zip(default_model.model.state_dict().items(), again.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_converted_tokenizer_matches_the_gguf_tokenizer(default_model):
    from transformers import AutoTokenizer

    gguf = default_gguf()
    original = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    text = default_text("default-eval").text[:20000]
    ours = default_model.tokenizer(text, add_special_tokens=False).input_ids
    assert ours == original(text, add_special_tokens=False).input_ids


def test_unpruned_perplexity_agrees_with_an_independent_implementation(default_model, eval_windows):
    """Plain transformers, our own tokenization: tokens -> 256-token chunks -> mean loss -> exp."""
    tok = default_model.tokenizer
    ids = tok(default_text("default-eval").text, add_special_tokens=False)["input_ids"][: 8 * 256]
    chunks = torch.tensor(ids).view(8, 256)
    assert tok("a")["input_ids"][0] != tok.bos_token_id  # SmolLM2 adds no BOS: first token not predicted
    with torch.no_grad():
        losses = [default_model.model(input_ids=c[None], labels=c[None]).loss.item() for c in chunks]
    independent = math.exp(sum(losses) / len(losses))  # equal-length chunks: mean of means is the mean
    ours = perplexity(default_model.arch, eval_windows)
    assert ours.predicted_tokens == 8 * 255
    assert abs(ours.perplexity - independent) / independent < 1e-4
    assert 10 < ours.perplexity < 100  # a working small LM on news text, not a broken conversion


def test_incremental_toggles_on_the_real_model_equal_full_recomputes(default_model, eval_windows):
    arch = default_model.arch
    evaluator = IncrementalEvaluator(arch, eval_windows)
    base = Mask.unpruned(arch.shape, default_model.name)
    harp_like = base
    for layer in (26, 27, 28, 29):
        harp_like = harp_like.with_layer(layer, drop_qk=True)
    for mask in (base.with_head(29, 4, False), base.with_head(7, 0, False), harp_like):
        fast = evaluator.perplexity(mask).perplexity
        full = perplexity(arch, eval_windows, mask).perplexity
        assert abs(fast - full) / full < 1e-5
    unpruned = evaluator.perplexity(base).perplexity
    assert evaluator.perplexity(harp_like).perplexity > unpruned  # dropping attention costs something


def test_cli_eval_reports_the_protocol_metadata(default_model, eval_windows, session_cache, tmp_path):
    mask = Mask.unpruned(default_model.shape, default_model.name).with_layer(29, drop_qk=True, alpha=0.5)
    mask.save(tmp_path / "mask.json")
    cmd = [
        sys.executable,
        "-m",
        "analysis",
        "eval",
        "--max-tokens",
        "2048",
        "--mask",
        str(tmp_path / "mask.json"),
        "--json",
    ]
    env = {**os.environ, "HEADROOM_CACHE": str(session_cache)}
    out = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout)
    assert out["perplexity"] == pytest.approx(perplexity(default_model.arch, eval_windows, mask).perplexity, rel=1e-6)
    assert (out["seqlen"], out["predicted_tokens"], out["text"]) == (256, 2040, "lee-eval")
    assert out["text_sha256"] == default_text("default-eval").sha256
    assert out["model"]["fingerprint"] == default_model.fingerprint
    assert out["mask"] == {"pruned_heads": 0, "drop_qk": [29], "alpha": {"29": 0.5}}
    assert out["budget"]["kv_bytes_per_token_saved"] == 2 * 3 * 64 * 4  # layer 29's K and V, 3 KV heads, fp32
