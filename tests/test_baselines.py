"""Baselines at a matched budget: the smallest mask that reaches the target, and honest refusals."""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest
import torch

from analysis.activation_metrics import flap_wifv, o_proj_input_stats
from analysis.architecture import Architecture, ModelShape
from analysis.baselines import (
    AXES,
    flap_compensation,
    matched_baselines,
    prune_heads,
    remove_attention_layers,
    saved,
)
from analysis.budget import budget
from analysis.errors import HeadroomError
from analysis.intervention import apply_mask
from analysis.masks import Mask
from tests.helpers import random_windows, tiny_model

# 4 layers x 6 query heads in 2 KV groups of 3 (heads 0-2 read KV head 0, heads 3-5 KV head 1).
SHAPE = ModelShape(
    num_layers=4,
    num_heads=6,
    num_kv_heads=2,
    head_dim=16,
    hidden_size=48,
    qkv_bias=True,
    o_bias=False,
    qk_norm_params_per_layer=0,
    total_params=100_000,
    bytes_per_element=4,
)
SEQ = 64
HEAD_PARAMS = 2 * 16 * 48 + 16  # one query head: q rows with bias, o columns
GROUP_KV_BYTES = 2 * 16 * 4  # one KV head: k and v, head_dim float32 each
MATCHED = [
    "gradient-global",
    "gradient-uniform",
    "gradient_normalized-global",  # its uniform allocation would be gradient-uniform
    "magnitude-global",
    "magnitude-uniform",
    "wanda_sp-global",
    "wanda_sp-uniform",
    "flap_wifv-global",
    "flap_wifv-uniform",
    "flap_wifv-global-compensated",
    "block_influence-attention",
]


def random_scores(seed: int = 0) -> torch.Tensor:
    return torch.rand(4, 6, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def saves(mask: Mask, axis: str) -> int:
    return saved(budget(mask, SHAPE, SEQ), axis)


def pruned(mask: Mask) -> set[tuple[int, int]]:
    return {(layer, head) for layer, row in enumerate(mask.heads) for head, keep in enumerate(row) if not keep}


def pruning(heads_per_layer: int) -> Mask:
    """Heads 0 .. heads_per_layer - 1 pruned in every layer."""
    mask = Mask.unpruned(SHAPE, "m")
    for layer in range(4):
        for head in range(heads_per_layer):
            mask = mask.with_head(layer, head, False)
    return mask


def most_saved(axis: str) -> int:
    """What pruning every head of the model saves; no baseline may get there."""
    return saves(pruning(6), axis)


def test_saved_reads_the_budget_field_of_each_axis():
    b = budget(Mask.drop_qk_top(SHAPE, "m", 1, 0.0), SHAPE, SEQ)
    assert saved(b, "params") == b.params_removed > 0
    assert saved(b, "kv") == b.kv_bytes_per_token_saved > 0
    assert saved(b, "flops") == b.attention_flops_per_token_saved > 0
    with pytest.raises(HeadroomError, match="unknown budget axis 'memory'; use one of params, kv, flops"):
        saved(b, "memory")


@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("share", [0.1, 0.45, 0.8])
def test_global_pruning_takes_the_smallest_prefix_that_reaches_the_target(axis, share):
    scores = random_scores()
    target = int(share * most_saved(axis))
    mask = prune_heads(scores, SHAPE, "m", target, axis, SEQ)
    gone = pruned(mask)
    assert saves(mask, axis) >= target
    # A prefix of the ascending order: every pruned head scores below every kept one.
    kept = {(layer, head) for layer in range(4) for head in range(6)} - gone
    assert max(scores[h].item() for h in gone) < min(scores[h].item() for h in kept)
    last = max(gone, key=lambda h: scores[h].item())
    assert saves(mask.with_head(*last, True), axis) < target


@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("share", [0.1, 0.45, 0.8])
def test_uniform_pruning_takes_the_same_lowest_count_in_every_layer(axis, share):
    scores = random_scores(1)
    target = int(share * saves(pruning(5), axis))  # 5 of 6 in every layer is the most uniform pruning does
    mask = prune_heads(scores, SHAPE, "m", target, axis, SEQ, allocation="uniform")
    assert saves(mask, axis) >= target
    k = mask.heads[0].count(False)
    assert k > 0
    for layer in range(4):
        lowest = set(scores[layer].argsort()[:k].tolist())
        assert {h for h, keep in enumerate(mask.heads[layer]) if not keep} == lowest
    one_fewer = Mask.unpruned(SHAPE, "m")
    for layer in range(4):
        for head in scores[layer].argsort()[: k - 1].tolist():
            one_fewer = one_fewer.with_head(layer, head, False)
    assert saves(one_fewer, axis) < target


def test_kv_axis_prunes_until_a_whole_kv_group_is_gone():
    scores = torch.full((4, 6), 9.0, dtype=torch.float64)
    scores[0] = torch.tensor([0.0, 2.0, 4.0, 1.0, 3.0, 5.0])  # lowest heads alternate between the two groups
    mask = prune_heads(scores, SHAPE, "m", GROUP_KV_BYTES, "kv", SEQ)
    # Heads 0, 3, 1, 4 save no KV (each group keeps a head); head 2 empties group 0.
    assert pruned(mask) == {(0, 0), (0, 3), (0, 1), (0, 4), (0, 2)}
    assert saves(mask, "kv") == GROUP_KV_BYTES


@pytest.mark.parametrize("allocation", ["global", "uniform"])
def test_kv_savings_come_in_whole_groups(allocation):
    for target in (1, 3 * GROUP_KV_BYTES):
        mask = prune_heads(random_scores(2), SHAPE, "m", target, "kv", SEQ, allocation)
        assert saves(mask, "kv") % GROUP_KV_BYTES == 0 and saves(mask, "kv") >= target


def test_ties_are_broken_by_layer_then_head():
    scores = torch.zeros(4, 6, dtype=torch.float64)
    mask = prune_heads(scores, SHAPE, "m", 2 * HEAD_PARAMS, "params", SEQ)
    assert pruned(mask) == {(0, 0), (0, 1)}
    mask = prune_heads(scores, SHAPE, "m", 1, "params", SEQ, allocation="uniform")
    assert pruned(mask) == {(layer, 0) for layer in range(4)}


def test_a_target_of_zero_prunes_nothing():
    assert prune_heads(random_scores(), SHAPE, "m", 0, "kv", SEQ).is_unpruned
    assert remove_attention_layers(torch.zeros(4), SHAPE, "m", 0, "flops", SEQ).is_unpruned


def test_global_pruning_never_removes_every_head_and_says_what_it_can_save():
    scores = random_scores()
    everything = most_saved("params")
    all_but_best = pruning(6).with_head(*divmod(scores.argmax().item(), 6), True)
    most = saves(all_but_best, "params")
    assert most < everything
    assert prune_heads(scores, SHAPE, "m", most, "params", SEQ) == all_but_best
    with pytest.raises(HeadroomError) as e:
        prune_heads(scores, SHAPE, "m", everything, "params", SEQ)
    assert str(e.value) == (
        f"global head pruning cannot save {everything:,} attention parameters (sequence length {SEQ}): "
        f"the most it can save is {most:,}, with every head pruned but the highest-scored one. "
        "Choose a smaller budget or another axis"
    )


def test_uniform_pruning_keeps_a_head_per_layer_and_says_what_it_can_save():
    most = 4 * GROUP_KV_BYTES  # one group per layer stays
    assert prune_heads(random_scores(), SHAPE, "m", most, "kv", SEQ, "uniform").heads[0].count(False) == 5
    with pytest.raises(HeadroomError, match=r"the most it can save is 512, with 5 of 6 heads pruned in every layer"):
        prune_heads(random_scores(), SHAPE, "m", most + 1, "kv", SEQ, "uniform")


def test_bad_scores_and_allocations_are_refused():
    with pytest.raises(HeadroomError, match="unknown allocation 'random'; use one of global, uniform"):
        prune_heads(random_scores(), SHAPE, "m", 1, "params", SEQ, allocation="random")
    nan = random_scores()
    nan[2, 3] = float("nan")
    with pytest.raises(HeadroomError, match="head scores are not all finite"):
        prune_heads(nan, SHAPE, "m", 1, "params", SEQ)
    with pytest.raises(ValueError, match="scores are"):
        prune_heads(torch.zeros(4, 5), SHAPE, "m", 1, "params", SEQ)


def test_attention_layers_are_removed_from_the_lowest_influence_up():
    influence = torch.tensor([0.3, 0.1, 0.2, 0.4], dtype=torch.float64)
    one_layer = saves(Mask.unpruned(SHAPE, "m").with_layer(0, alpha=0.0), "params")
    mask = remove_attention_layers(influence, SHAPE, "m", one_layer, "params", SEQ)
    assert mask.alpha == (1.0, 0.0, 1.0, 1.0) and not mask.drop_qk
    mask = remove_attention_layers(influence, SHAPE, "m", 2 * one_layer + 1, "params", SEQ)
    assert mask.alpha == (0.0, 0.0, 0.0, 1.0)
    with pytest.raises(HeadroomError, match="with the attention of 3 of 4 layers removed"):
        remove_attention_layers(influence, SHAPE, "m", 3 * one_layer + 1, "params", SEQ)


def test_drop_qk_top_puts_the_highest_layers_in_drop_qk_mode():
    mask = Mask.drop_qk_top(SHAPE, "m", 2, 0.5)
    assert mask.drop_qk == {2, 3} and mask.alpha == (1.0, 1.0, 0.5, 0.5)
    assert Mask.drop_qk_top(SHAPE, "m", 0, 0.0).is_unpruned
    with pytest.raises(HeadroomError, match="cannot put 5 layers in drop-QK mode: the model has 4 layers"):
        Mask.drop_qk_top(SHAPE, "m", 5, 1.0)


@pytest.mark.parametrize("axis", AXES)
def test_matched_baselines_save_at_least_the_reference_and_leave_the_model_unchanged(tiny_arch, axis):
    shape, calib = tiny_arch.shape, random_windows(n=3, length=16)
    reference = Mask.unpruned(shape, "tiny", fingerprint="f00d").with_layer(2, drop_qk=True, alpha=0.4)
    reference = reference.with_layer(3, drop_qk=True, alpha=0.0)
    before = {k: v.clone() for k, v in tiny_arch.model.state_dict().items()}
    stats = o_proj_input_stats(tiny_arch, calib) if axis == "kv" else None  # also the path that reuses stats
    found = matched_baselines(tiny_arch, "tiny", calib, reference, axis, SEQ, stats=stats)
    target = saved(budget(reference, shape, SEQ), axis)
    # Uniform allocation prunes at most 5 of 6 heads per layer (any 5 empty one KV group of 3). Where that saves
    # less than the reference (OLMo2 on params: its q/k norms span every head, so a pruned head keeps its q rows)
    # the uniform baselines must be left out rather than under-matched.
    most_uniform = Mask.unpruned(shape, "tiny")
    for layer in range(shape.num_layers):
        for head in range(1, shape.num_heads):
            most_uniform = most_uniform.with_head(layer, head, False)
    reachable = [
        n for n in MATCHED if not n.endswith("-uniform") or saved(budget(most_uniform, shape, SEQ), axis) >= target
    ]
    assert list(found) == [*reachable, "drop_qk-alpha1", "drop_qk-alpha0"]
    for name in reachable:
        assert saved(budget(found[name], shape, SEQ), axis) >= target, name
        assert f"matched on {axis}" in found[name].note
    for alpha in (1, 0):
        point = found[f"drop_qk-alpha{alpha}"]
        assert replace(point, note="") == Mask.drop_qk_top(shape, "tiny", 2, alpha)
        assert point.note == f"top 2 layers drop-QK with alpha {alpha} (a reference point, not matched)"
    assert {m.fingerprint for m in found.values()} == {"f00d"}
    after = tiny_arch.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_baselines_that_cannot_reach_the_target_are_left_out_with_a_warning(caplog):
    arch = Architecture(tiny_model("llama"))
    everything = Mask.drop_qk_top(arch.shape, "tiny", arch.shape.num_layers, 0.0)  # no attention left at all
    with caplog.at_level(logging.WARNING, logger="analysis.baselines"):
        found = matched_baselines(arch, "tiny", random_windows(n=2, length=8), everything, "kv", SEQ)
    assert list(found) == ["drop_qk-alpha1", "drop_qk-alpha0"]
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == len(MATCHED)
    assert all("left out" in w and "cannot save 1,024 KV-cache bytes per token" in w for w in warned)


def test_a_reference_without_drop_qk_layers_gets_no_drop_qk_reference_points():
    arch = Architecture(tiny_model("qwen2"))
    reference = Mask.unpruned(arch.shape, "tiny").with_head(0, 0, False).with_head(0, 1, False).with_head(0, 2, False)
    found = matched_baselines(arch, "tiny", random_windows(n=2, length=8), reference, "kv", SEQ)
    assert list(found) == MATCHED


# --- FLAP's bias compensation ---------------------------------------------------------------------


def o_proj_outputs(arch: Architecture, windows, mask: Mask | None, layer: int) -> torch.Tensor:
    """Every token's o_proj output in ``layer`` under ``mask`` (bias included), ``[tokens, hidden]``."""
    seen = []
    with apply_mask(arch, mask):
        handle = arch.output_projection(layer).register_forward_hook(lambda m, a, out: seen.append(out.flatten(0, -2)))
        try:
            with torch.no_grad():
                arch.model(input_ids=windows.input_ids)
        finally:
            handle.remove()
    return torch.cat(seen).double()


def test_compensation_keeps_the_mean_o_proj_output_of_the_calibration_text(tiny_arch):
    """Layer 1 is the lowest pruned layer, so its o_proj input is the measured one: the mean must match."""
    calib = random_windows(n=3, length=16)
    mask = Mask.unpruned(tiny_arch.shape, "tiny").with_heads([(1, 0), (1, 4), (2, 2)], False)
    compensated = flap_compensation(tiny_arch, mask, o_proj_input_stats(tiny_arch, calib))
    assert [layer for layer, _ in compensated.bias] == [1, 2]
    unpruned = o_proj_outputs(tiny_arch, calib, None, 1).mean(0)
    pruned = o_proj_outputs(tiny_arch, calib, mask, 1).mean(0)
    torch.testing.assert_close(o_proj_outputs(tiny_arch, calib, compensated, 1).mean(0), unpruned, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(pruned, unpruned, atol=1e-3)  # without it the mean moves


def test_compensation_is_w_o_of_the_pruned_channels_times_their_mean_by_hand(tiny_arch):
    calib = random_windows(n=2, length=12)
    hd = tiny_arch.shape.head_dim
    stats = o_proj_input_stats(tiny_arch, calib)
    mask = Mask.unpruned(tiny_arch.shape, "tiny").with_heads([(0, 1), (0, 5)], False)
    mask = mask.with_layer(3, drop_qk=True).with_head(3, 0, False)  # drop-QK: its o_proj input was not measured
    bias = flap_compensation(tiny_arch, mask, stats).bias
    assert [layer for layer, _ in bias] == [0]
    w = tiny_arch.attention(0).o_proj.weight.double()
    pruned = [*range(1 * hd, 2 * hd), *range(5 * hd, 6 * hd)]
    for i in (0, 17, 47):
        expected = sum(w[i, j].item() * stats.mean[0, j].item() for j in pruned)
        assert bias[0][1][i] == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_compensated_flap_counts_its_new_biases_in_the_budget():
    """Llama has no o_proj bias: each compensated layer costs hidden_size parameters, so more heads go."""
    arch = Architecture(tiny_model("llama"))
    calib = random_windows(n=2, length=8)
    reference = Mask.unpruned(arch.shape, "tiny").with_heads([(0, 0), (1, 1), (2, 2), (3, 3)], False)
    found = matched_baselines(arch, "tiny", calib, reference, "params", SEQ)
    target = budget(reference, arch.shape, SEQ).params_removed
    plain, compensated = found["flap_wifv-global"], found["flap_wifv-global-compensated"]
    assert budget(compensated, arch.shape, SEQ).params_removed >= target
    assert compensated.pruned_heads > plain.pruned_heads
    layers = {i for i, row in enumerate(compensated.heads) if not all(row)}
    assert {i for i, _ in compensated.bias} == layers
    without = budget(replace(compensated, bias=()), arch.shape, SEQ).params_removed
    assert budget(compensated, arch.shape, SEQ).params_removed == without - 48 * len(layers)  # hidden_size each
    # The same heads as FLAP's own walk, only further along it.
    scores = flap_wifv(arch, o_proj_input_stats(arch, calib)).flatten().tolist()
    order = sorted(range(len(scores)), key=lambda i: (scores[i], i))
    pruned = {divmod(i, 6) for i in order[: compensated.pruned_heads]}
    assert {
        (layer, h) for layer, row in enumerate(compensated.heads) for h, keep in enumerate(row) if not keep
    } == pruned
