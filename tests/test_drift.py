"""Representation-norm drift: the promises of analysis/drift.py on tiny random models of every family."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from analysis import drift
from analysis.architecture import Architecture
from analysis.cache import DiskCache
from analysis.drift import DriftReport, cached_layer_drift, layer_drift, mask_drift, position_drift
from analysis.errors import HeadroomError
from analysis.intervention import apply_mask
from analysis.loading import LoadedModel
from analysis.masks import Mask
from tests.helpers import random_windows, tiny_model

WINDOWS = random_windows()


def unpruned(arch: Architecture) -> Mask:
    return Mask.unpruned(arch.shape, "tiny")


def mixed_mask(arch: Architecture) -> Mask:
    """Pruned heads at layer 1 and a rescaled drop-QK layer 3: every kind of change a mask makes."""
    return unpruned(arch).with_head(1, 0, False).with_head(1, 4, False).with_layer(3, drop_qk=True, alpha=0.3)


def layer_outputs(arch: Architecture, ids: torch.Tensor) -> list[torch.Tensor]:
    """Each layer's output from transformers' own ``output_hidden_states``, float64 ``[b, t, d]``.

    ``hidden_states[l + 1]`` is layer l's output except for the last layer, whose entry is after the
    final norm; with the final norm swapped for the identity it is the last layer's raw output.
    (Swapped by hand: monkeypatch's undo would delete a submodule, which lives outside ``__dict__``.)
    """
    norm = arch.decoder.norm
    arch.decoder.norm = nn.Identity()
    try:
        hidden = arch.model(input_ids=ids, output_hidden_states=True).hidden_states
    finally:
        arch.decoder.norm = norm
    return [h.double() for h in hidden[1:]]


def assert_stats_match(stats: drift.NormStats, norms: torch.Tensor) -> None:
    q = torch.quantile(norms, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))
    expected = [norms.mean().item(), *q.tolist()]
    got = [stats.l2_mean, stats.l2_q10, stats.l2_q50, stats.l2_q90]
    assert got == pytest.approx(expected, rel=1e-6)


def test_unpruned_mask_has_no_drift(tiny_arch):
    report = layer_drift(tiny_arch, WINDOWS, unpruned(tiny_arch))
    assert report.tokens == WINDOWS.input_ids.numel()
    assert [d.layer for d in report.layers] == list(range(tiny_arch.shape.num_layers))
    for d in report.layers:
        assert d.masked == d.unpruned
        assert d.cosine_mean == pytest.approx(1.0, abs=1e-12)
    assert report.kl_nats_per_token == 0.0


def test_head_pruned_at_layer_2_leaves_layers_below_identical(tiny_arch):
    report = layer_drift(tiny_arch, WINDOWS, unpruned(tiny_arch).with_head(2, 3, False))
    for d in report.layers[:2]:
        assert d.masked == d.unpruned
        assert d.cosine_mean == pytest.approx(1.0, abs=1e-12)
    for d in report.layers[2:]:
        assert d.masked.l2_mean != d.unpruned.l2_mean
        assert d.cosine_mean < 1.0 - 1e-6
    assert report.kl_nats_per_token > 0.0


def test_norms_and_cosines_equal_transformers_hidden_states(tiny_arch):
    mask = mixed_mask(tiny_arch)
    ids = WINDOWS.input_ids
    with torch.no_grad():
        base = layer_outputs(tiny_arch, ids)
        with apply_mask(tiny_arch, mask):
            masked = layer_outputs(tiny_arch, ids)
    report = layer_drift(tiny_arch, WINDOWS, mask)
    where = position_drift(tiny_arch, WINDOWS, mask, window=2)
    for layer, (h, g, d) in enumerate(zip(base, masked, report.layers, strict=True)):
        cos = F.cosine_similarity(h, g, dim=-1)
        assert_stats_match(d.unpruned, h.norm(dim=-1).flatten())
        assert_stats_match(d.masked, g.norm(dim=-1).flatten())
        assert d.cosine_mean == pytest.approx(cos.mean().item(), rel=1e-9)
        torch.testing.assert_close(where.unpruned_l2[layer], h[2].norm(dim=-1), rtol=1e-5, atol=0)
        torch.testing.assert_close(where.masked_l2[layer], g[2].norm(dim=-1), rtol=1e-5, atol=0)
        torch.testing.assert_close(where.cosine[layer], cos[2], rtol=1e-5, atol=1e-6)
    assert where.input_ids == tuple(ids[2].tolist())


def test_kl_equals_kl_div_on_full_logits(tiny_arch):
    mask = mixed_mask(tiny_arch)
    ids = WINDOWS.input_ids
    with torch.no_grad():
        log_p = torch.log_softmax(tiny_arch.model(input_ids=ids).logits.double(), dim=-1)
        with apply_mask(tiny_arch, mask):
            log_q = torch.log_softmax(tiny_arch.model(input_ids=ids).logits.double(), dim=-1)
    expected = F.kl_div(log_q, log_p, log_target=True, reduction="sum").item() / ids.numel()
    report = layer_drift(tiny_arch, WINDOWS, mask)
    assert expected > 0.0
    assert report.kl_nats_per_token == pytest.approx(expected, rel=1e-6)


def test_kl_is_the_same_in_chunks_of_one_window(monkeypatch):
    arch = Architecture(tiny_model("llama"))
    mask = mixed_mask(arch)
    whole = layer_drift(arch, WINDOWS, mask).kl_nats_per_token
    monkeypatch.setattr(drift, "KL_LOGITS_PER_CHUNK", 1)
    assert layer_drift(arch, WINDOWS, mask).kl_nats_per_token == pytest.approx(whole, rel=1e-12)


def test_quantiles_are_ordered(tiny_arch):
    report = layer_drift(tiny_arch, WINDOWS, mixed_mask(tiny_arch))
    for d in report.layers:
        for s in (d.unpruned, d.masked):
            assert 0.0 < s.l2_q10 <= s.l2_q50 <= s.l2_q90


def test_rescaling_changes_drift_only_at_drop_qk_layers(tiny_arch):
    mask = unpruned(tiny_arch).with_layer(2, drop_qk=True, alpha=0.3).with_layer(3, drop_qk=True, alpha=0.3)
    reports = mask_drift(tiny_arch, WINDOWS, mask)
    scaled, unscaled = reports.mask, reports.without_rescaling
    assert scaled == layer_drift(tiny_arch, WINDOWS, mask)
    alpha1 = mask.with_layer(2, alpha=1.0).with_layer(3, alpha=1.0)
    assert unscaled == layer_drift(tiny_arch, WINDOWS, alpha1)
    for layer in (0, 1):
        assert scaled.layers[layer] == unscaled.layers[layer]
        assert scaled.layers[layer].masked == scaled.layers[layer].unpruned
    for layer in (2, 3):
        assert scaled.layers[layer].unpruned == unscaled.layers[layer].unpruned
        assert scaled.layers[layer].masked.l2_mean != unscaled.layers[layer].masked.l2_mean
        assert scaled.layers[layer].cosine_mean != unscaled.layers[layer].cosine_mean
    assert scaled.kl_nats_per_token != unscaled.kl_nats_per_token


def test_weights_and_hooks_unchanged_afterwards(tiny_arch):
    state = {k: v.clone() for k, v in tiny_arch.model.state_dict().items()}
    mask = mixed_mask(tiny_arch)
    layer_drift(tiny_arch, WINDOWS, mask)
    position_drift(tiny_arch, WINDOWS, mask, window=0)
    mask_drift(tiny_arch, WINDOWS, mask)
    assert all(torch.equal(state[k], v) for k, v in tiny_arch.model.state_dict().items())
    for module in tiny_arch.model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
        assert "forward" not in module.__dict__


def test_unpruned_pass_is_unpruned_inside_an_outer_mask():
    arch = Architecture(tiny_model("qwen2"))
    mask = mixed_mask(arch)
    expected = layer_drift(arch, WINDOWS, mask)
    with apply_mask(arch, unpruned(arch).with_head(0, 0, False)):
        assert layer_drift(arch, WINDOWS, mask) == expected


def test_position_drift_rejects_a_window_that_does_not_exist():
    arch = Architecture(tiny_model("llama"))
    with pytest.raises(HeadroomError, match="window 5 does not exist"):
        position_drift(arch, WINDOWS, unpruned(arch), window=5)


def test_reports_round_trip_through_json():
    arch = Architecture(tiny_model("gemma2"))
    mask = mixed_mask(arch)
    report = layer_drift(arch, WINDOWS, mask)
    assert DriftReport.from_json(json.loads(json.dumps(report.to_json()))) == report
    where = json.loads(json.dumps(position_drift(arch, WINDOWS, mask, window=1).to_json()))
    shape = [arch.shape.num_layers, WINDOWS.seqlen]
    for key in ("unpruned_l2", "masked_l2", "cosine"):
        assert [len(where[key]), len(where[key][0])] == shape
    assert where["mask"] == mask.summary()


def test_cached_layer_drift_second_call_reads_the_cache(tmp_path, monkeypatch):
    arch = Architecture(tiny_model("mistral"))
    lm = LoadedModel(model=arch.model, tokenizer=None, arch=arch, name="tiny", fingerprint="tiny-fp", source="test")
    cache = DiskCache(root=tmp_path)
    mask = mixed_mask(arch)
    first = cached_layer_drift(lm, WINDOWS, mask, cache)
    assert first == layer_drift(arch, WINDOWS, mask)

    def fail(*args: object) -> DriftReport:
        raise AssertionError("layer_drift ran although the result was cached")

    monkeypatch.setattr(drift, "layer_drift", fail)
    assert cached_layer_drift(lm, WINDOWS, mask, cache) == first
    with pytest.raises(AssertionError, match="although"):  # another mask is another key
        cached_layer_drift(lm, WINDOWS, mask.with_layer(3, alpha=0.5), cache)


def test_cached_mask_drift_shares_entries_with_cached_layer_drift(tmp_path, monkeypatch):
    arch = Architecture(tiny_model("llama"))
    lm = LoadedModel(model=arch.model, tokenizer=None, arch=arch, name="tiny", fingerprint="tiny-fp", source="test")
    cache = DiskCache(root=tmp_path)
    mask = (
        Mask.unpruned(arch.shape, "tiny").with_layer(2, drop_qk=True, alpha=0.3).with_layer(3, drop_qk=True, alpha=0.6)
    )
    pair = drift.cached_mask_drift(lm, WINDOWS, mask, cache)
    assert pair == mask_drift(arch, WINDOWS, mask)
    assert pair.without_rescaling == layer_drift(arch, WINDOWS, mask.with_layer(2, alpha=1.0).with_layer(3, alpha=1.0))

    def fail(*args: object) -> DriftReport:
        raise AssertionError("recomputed although cached")

    monkeypatch.setattr(drift, "_reports", fail)
    monkeypatch.setattr(drift, "layer_drift", fail)
    assert drift.cached_mask_drift(lm, WINDOWS, mask, cache) == pair
    assert cached_layer_drift(lm, WINDOWS, drift.alpha_one(mask), cache) == pair.without_rescaling
    assert cached_layer_drift(lm, WINDOWS, mask, cache) == pair.mask
    # A mask without drop-QK layers has only its own report, from the same entry as cached_layer_drift's.
    plain = Mask.unpruned(arch.shape, "tiny").with_head(1, 0, False)
    with pytest.raises(AssertionError, match="recomputed"):
        drift.cached_mask_drift(lm, WINDOWS, plain, cache)
    monkeypatch.undo()
    single = drift.cached_mask_drift(lm, WINDOWS, plain, cache)
    assert single.without_rescaling is None and single.mask == cached_layer_drift(lm, WINDOWS, plain, cache)
    assert single.to_json() == {"mask": single.mask.to_json()}
