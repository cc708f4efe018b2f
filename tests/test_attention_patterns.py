"""Attention patterns recomputed from q/k equal the family's own eager attention, and their statistics."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import analysis.attention_patterns as attention_patterns
from analysis.architecture import Architecture
from analysis.attention_patterns import STATISTICS, attention_pattern, attention_stats, cached_attention_stats
from analysis.cache import DiskCache
from analysis.errors import HeadroomError
from tests.helpers import forbid, random_windows


def _eager_weights(arch: Architecture, ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The weights transformers' own eager attention returns, from a copy switched to eager."""
    eager = copy.deepcopy(arch.model)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        return eager(input_ids=ids, output_attentions=True, use_cache=False).attentions


def test_recomputed_patterns_equal_the_eager_attention_weights_of_every_family(tiny_arch):
    ids = random_windows(n=1).input_ids  # 24 tokens: longer than the sliding windows of 8
    expected = _eager_weights(tiny_arch, ids)
    shape = tiny_arch.shape
    for layer in range(shape.num_layers):
        for head in (0, shape.num_heads - 1):
            got = attention_pattern(tiny_arch, ids[0], layer, head)
            torch.testing.assert_close(got, expected[layer][0, head].float(), atol=1e-5, rtol=1e-4)


def test_the_shared_model_keeps_its_attention_implementation(tiny_arch):
    before = tiny_arch.config._attn_implementation
    attention_stats(tiny_arch, random_windows(n=2))
    assert tiny_arch.config._attn_implementation == before


def test_statistics_match_their_definitions_on_the_eager_weights(tiny_arch):
    windows = random_windows(n=3)
    stats = attention_stats(tiny_arch, windows)
    t = windows.seqlen
    i = torch.arange(t)[:, None]
    j = torch.arange(t)[None, :]
    per_layer = torch.stack(_eager_weights(tiny_arch, windows.input_ids)).double()  # [L, B, H, T, T]
    p = per_layer[..., 1:, :]  # queries 1..T-1
    expected = {
        "entropy": -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum(-1),
        "distance": (p * (i - j)[1:].double()).sum(-1),
        "sink": p[..., 0],
        "previous": torch.stack([per_layer[..., q, q - 1] for q in range(1, t)], dim=-1),
    }
    for name in STATISTICS:
        torch.testing.assert_close(getattr(stats, name), expected[name].mean(dim=(1, 3)), atol=1e-5, rtol=1e-4)
    assert (stats.entropy >= 0).all() and (stats.entropy <= math.log(t)).all()
    assert ((stats.sink >= 0) & (stats.sink <= 1)).all()


def test_a_head_that_does_not_exist_is_refused(tiny_arch):
    with pytest.raises(HeadroomError, match="does not exist"):
        attention_pattern(tiny_arch, random_windows(n=1).input_ids[0], 0, tiny_arch.shape.num_heads)


@pytest.mark.slow
def test_real_model_stats_are_cached_and_show_sink_heads(default_model, tmp_path, monkeypatch):
    from analysis.corpus import default_text, make_windows

    windows = make_windows(default_model.tokenizer, default_text("default-calib"), 128, 256)
    cache = DiskCache(tmp_path)
    first = cached_attention_stats(default_model, windows, cache)
    forbid(monkeypatch, attention_patterns, "attention_stats")
    again = cached_attention_stats(default_model, windows, cache)
    assert torch.equal(first.sink, again.sink)
    # Sink heads are a known property of trained LMs: some head puts most of its weight on token 0.
    assert first.sink.max() > 0.5
    assert first.sink.min() < 0.5
