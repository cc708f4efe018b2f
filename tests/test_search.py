"""The budgeted search on a tiny model: it always meets its budget, even when interrupted."""

from __future__ import annotations

import random

import pytest

from analysis.activation_metrics import o_proj_input_stats
from analysis.architecture import Architecture
from analysis.baselines import flap_compensation, saved
from analysis.budget import budget
from analysis.budget_targets import parse_targets
from analysis.errors import HeadroomError
from analysis.evaluation import perplexity
from analysis.masks import Mask
from analysis.search import SearchResult, descend, search
from tests.helpers import random_windows, tiny_model

SEQ = 24


@pytest.fixture(scope="module")
def arch() -> Architecture:
    return Architecture(tiny_model("llama"))


def independent_saving(mask: Mask, shape, axis: str) -> int:
    """What a mask saves, counted by hand from the tiny shape (KV per group, q/o per head, k/v per group)."""
    d, hd = shape.hidden_size, shape.head_dim
    per_group = shape.num_heads // shape.num_kv_heads
    total = 0
    for i in range(mask.num_layers):
        heads = mask.heads[i]
        groups = {h // per_group for h, keep in enumerate(heads) if keep}
        if mask.alpha[i] == 0.0:
            kept = {"params": 0, "kv": 0, "flops": 0}
        else:
            q = sum(heads)
            if i in mask.drop_qk:
                kept = {"params": len(groups) * hd * d + q * hd * d, "kv": 0, "flops": 2 * (len(groups) + q) * hd * d}
            else:
                kept = {
                    "params": 2 * q * hd * d + 2 * len(groups) * hd * d,
                    "kv": 2 * len(groups) * hd * 4,
                    "flops": 2 * (2 * q + 2 * len(groups)) * hd * d + 4 * q * hd * SEQ,
                }
        full = {
            "params": 2 * shape.num_heads * hd * d + 2 * shape.num_kv_heads * hd * d,
            "kv": 2 * shape.num_kv_heads * hd * 4,
            "flops": 2 * (2 * shape.num_heads + 2 * shape.num_kv_heads) * hd * d + 4 * shape.num_heads * hd * SEQ,
        }
        total += full[axis] - kept[axis]
    return total


@pytest.mark.parametrize(
    "targets",
    [
        {"kv": 64},
        {"kv": 300},
        {"params": 5000},
        {"flops": 30000},
        {"kv": 100, "params": 9000, "flops": 3000},
        {"kv": 1024},  # all of the tiny model's KV cache: drop-QK or removal in every layer
        {"params": 49152},  # all its attention parameters: no layer may come back in the alpha phase
    ],
)
def test_the_search_never_returns_a_mask_that_misses_its_budget(arch, targets):
    windows = random_windows(n=3)
    result = search(arch, "tiny", windows, targets, SEQ, shortlist=2, proxy_windows=1)
    for axis, amount in targets.items():
        assert independent_saving(result.mask, arch.shape, axis) >= amount
        assert saved(result.budget, axis) == independent_saving(result.mask, arch.shape, axis)
    assert not result.interrupted
    assert result.calib_perplexity == pytest.approx(perplexity(arch, windows, result.mask).perplexity, rel=1e-6)
    assert result.unpruned_calib_perplexity == pytest.approx(perplexity(arch, windows).perplexity, rel=1e-6)
    # each committed step is what the trace says: its perplexity is the mask's after that step
    assert result.trace[-1].calib_perplexity == pytest.approx(result.calib_perplexity, rel=1e-9)
    assert SearchResult.from_json(result.to_json(), result.mask) == result


@pytest.mark.parametrize("stop_after", [1, 20, 50, 65])  # proxy scoring, structure phase, alpha phase (of 70)
def test_an_interrupted_search_still_meets_its_budget(arch, stop_after):
    windows = random_windows(n=3)
    targets = {"kv": 300, "params": 9000}
    calls = []

    def progress(done: int, total: int) -> None:
        calls.append(done)
        if len(calls) >= stop_after:
            raise KeyboardInterrupt

    result = search(arch, "tiny", windows, targets, SEQ, shortlist=2, proxy_windows=1, progress=progress)
    assert result.interrupted
    b = budget(result.mask, arch.shape, SEQ)
    assert all(saved(b, axis) >= amount for axis, amount in targets.items())
    if result.calib_perplexity is not None:  # a mask evaluated before the interruption: its number is right
        assert result.calib_perplexity == pytest.approx(perplexity(arch, windows, result.mask).perplexity, rel=1e-6)


@pytest.mark.parametrize("targets", [{"params": 9000}, {"kv": 300, "params": 20000}])
def test_a_compensated_search_meets_its_budget_with_the_biases_counted_and_flaps_own_biases(arch, targets):
    """Each bias is FLAP's compensation of its layer's pruned heads, and costs hidden_size parameters."""
    windows = random_windows(n=3)
    result = search(arch, "tiny", windows, targets, SEQ, shortlist=2, proxy_windows=1, compensate=True)
    mask, d = result.mask, arch.shape.hidden_size
    assert result.settings["compensate"] and mask.bias  # the tiny model's heads carry a mean worth compensating
    costly = [i for i, _ in mask.bias if mask.alpha[i] != 0.0]
    for axis, amount in targets.items():
        hand = independent_saving(mask, arch.shape, axis) - (d * len(costly) if axis == "params" else 0)
        assert saved(result.budget, axis) == hand >= amount
    for layer, values in mask.bias:
        assert not all(mask.heads[layer]) and layer not in mask.drop_qk and mask.alpha[layer] > 0
        assert values == flap_compensation(arch, mask, o_proj_input_stats(arch, windows)).bias_of(layer)
    assert result.calib_perplexity == pytest.approx(perplexity(arch, windows, mask).perplexity, rel=1e-6)


def test_a_search_restricted_to_kv_groups_prunes_whole_groups_only(arch):
    windows = random_windows(n=3)
    result = search(arch, "tiny", windows, {"params": 9000}, SEQ, shortlist=2, proxy_windows=1, kinds=["prune_group"])
    shape = arch.shape
    assert result.settings["moves"] == ["prune_group"] and not result.mask.drop_qk
    assert all(alpha > 0 for alpha in result.mask.alpha)
    for row in result.mask.heads:
        for group in range(shape.num_kv_heads):
            kept = {keep for h, keep in enumerate(row) if shape.kv_group(h) == group}
            assert len(kept) == 1  # a group is kept or pruned whole
    assert saved(result.budget, "params") >= 9000
    with pytest.raises(HeadroomError, match="unknown move kind"):
        search(arch, "tiny", windows, {"kv": 64}, SEQ, kinds=["prune_layer"])
    with pytest.raises(HeadroomError, match="allow more kinds of move"):  # a single head saves no KV cache
        search(arch, "tiny", windows, {"kv": 64}, SEQ, kinds=["prune_head"])
    with pytest.raises(HeadroomError, match="allow more kinds of move"):  # q/k alone: not all the parameters
        search(arch, "tiny", windows, {"params": 49152}, SEQ, kinds=["drop_qk"])


def test_impossible_or_malformed_budgets_are_refused(arch):
    with pytest.raises(HeadroomError, match="no mask saves"):
        search(arch, "tiny", random_windows(n=2), {"kv": 10**6}, SEQ)
    for bad in (["kv"], ["kv:-3"], ["memory:5"], ["kv:1", "kv:2"], []):
        with pytest.raises(HeadroomError):
            parse_targets(bad)
    assert parse_targets(["kv:12288", "params:3981312"]) == {"kv": 12288, "params": 3981312}


@pytest.mark.parametrize("seed", range(40))
def test_the_alpha_walk_ends_where_trying_every_alpha_would_on_a_unimodal_value(seed):
    rng = random.Random(seed)
    alphas = sorted(rng.sample([round(0.1 * i, 1) for i in range(16)], rng.randint(1, 9)))
    start = rng.choice([*alphas, 0.0, 1.0, 1.55])
    centre, curve = rng.uniform(-0.2, 1.7), rng.uniform(0.5, 3.0)
    f = lambda a: abs(a - centre) ** curve  # noqa: E731  unimodal in alpha
    options = [(a, f"mask@{a}") for a in alphas if a != start]
    seen = []
    value, item, evaluations = descend(options, start, f(start), lambda m: seen.append(m) or f(float(m[5:])))
    brute = min([(f(a), i, m) for i, (a, m) in enumerate(options)] + [(f(start), -1, None)])
    if brute[2] is not None and brute[0] < f(start):
        assert item == brute[2] and value == brute[0]
    else:
        assert item is None and value == f(start)
    assert evaluations == len(seen) == len(set(seen)) <= len(options)
    end = start if item is None else float(item[5:])
    steps = sum(1 for a, _ in options if a != start and min(start, end) <= a <= max(start, end))  # walked past
    assert evaluations <= steps + 2


def test_the_alpha_walk_stops_at_a_local_minimum_and_never_returns_a_worse_point():
    values = {0.8: 5.0, 0.9: 4.0, 1.1: 6.0, 1.2: 1.0}  # two valleys; the walk from 1.0 takes the nearer
    options = [(a, a) for a in sorted(values)]
    assert descend(options, 1.0, 4.5, values.__getitem__) == (4.0, 0.9, 3)
    assert descend(options, 1.0, 3.0, values.__getitem__) == (3.0, None, 2)
    assert descend([], 1.0, 3.0, values.__getitem__) == (3.0, None, 0)
