"""HARP's greedy alpha search and the norm-matching alpha, on tiny models of every family."""

from __future__ import annotations

import pytest
import torch

from analysis.architecture import Architecture
from analysis.errors import HeadroomError
from analysis.evaluation import IncrementalEvaluator, perplexity
from analysis.harp import check_grid, chosen_harp, greedy_alpha_search, harp, top_layers
from analysis.hooks import hidden_arg, hidden_of, observe
from analysis.intervention import apply_mask
from analysis.masks import Mask
from analysis.norm_matching import _branch_moments, norm_matching_alpha
from analysis.rescale import rescalable_layers, rescale
from tests.helpers import random_windows, tiny_model

GRID = (0.0, 0.5, 1.0, 1.5)


def independent_greedy(arch, windows, layers, grid) -> tuple[dict[int, float], list[tuple[int, float, float]]]:
    """method.md's search written out plainly, with a full forward per candidate."""
    mask = Mask.unpruned(arch.shape, "tiny")
    for layer in layers:
        mask = mask.with_layer(layer, drop_qk=True)
    trace, chosen = [], {}
    for layer in sorted(layers, reverse=True):
        scores = []
        for alpha in grid:
            ppl = perplexity(arch, windows, mask.with_layer(layer, alpha=alpha)).perplexity
            trace.append((layer, alpha, ppl))
            scores.append((ppl, alpha))
        chosen[layer] = min(scores)[1]  # lowest perplexity, then the smaller alpha
        mask = mask.with_layer(layer, alpha=chosen[layer])
    return chosen, trace


def test_harp_agrees_with_an_independent_greedy_search(tiny_arch):
    windows = random_windows()
    result = harp(tiny_arch, "tiny", windows, top_layers(4, 2), GRID)
    chosen, trace = independent_greedy(tiny_arch, windows, [2, 3], GRID)
    assert result.alpha == chosen
    assert [(s.layer, s.alpha) for s in result.trace] == [(layer, a) for layer, a, _ in trace]
    for step, (_, _, ppl) in zip(result.trace, trace, strict=True):
        assert step.perplexity == pytest.approx(ppl, rel=1e-5)
    assert result.mask.drop_qk == {2, 3}
    assert result.calib_perplexity == pytest.approx(perplexity(tiny_arch, windows, result.mask).perplexity, rel=1e-6)
    assert result.calib_perplexity <= result.alpha1_perplexity  # alpha = 1 is on the grid


def test_ties_keep_the_smaller_alpha_and_unsearched_layers_stay_at_alpha_1():
    from analysis.architecture import ModelShape

    shape = ModelShape(4, 2, 1, 4, 8, False, False, 0, 1000, 4)
    start = Mask.unpruned(shape, "t").with_layer(1, drop_qk=True).with_layer(3, drop_qk=True)
    seen: list[Mask] = []

    def flat(mask: Mask) -> float:
        seen.append(mask)
        return 7.0

    mask, trace = greedy_alpha_search(start, [1, 3], (1.0, 0.3, 0.6), flat)
    assert mask.alpha == (1.0, 0.3, 1.0, 0.3)  # equal perplexities everywhere: the smallest alpha wins
    assert [s.layer for s in trace] == [3, 3, 3, 1, 1, 1]  # highest layer first
    assert all(m.alpha[1] == 1.0 for m in seen[:3])  # layer 1 not yet searched while layer 3 is
    assert all(m.drop_qk == {1, 3} for m in seen)


def test_candidates_never_recompute_layers_below_the_searched_one(tiny_arch):
    windows = random_windows()
    calls = [0] * tiny_arch.shape.num_layers
    handles = [
        layer.register_forward_hook(lambda m, a, o, i=i: calls.__setitem__(i, calls[i] + 1))
        for i, layer in enumerate(tiny_arch.layers)
    ]
    try:
        harp(tiny_arch, "tiny", windows, [3], GRID)
    finally:
        for h in handles:
            h.remove()
    # one batch: layers 0-2 run once in the capturing pass and never again
    assert calls[:3] == [1, 1, 1]
    assert calls[3] > len(GRID)


def test_norm_matching_alpha_restores_the_unpruned_residual_norm(tiny_arch):
    windows = random_windows()
    evaluator = IncrementalEvaluator(tiny_arch, windows)
    unpruned = Mask.unpruned(tiny_arch.shape, "tiny")
    hh, hb, bb = _branch_moments(evaluator, 3, unpruned)
    target = hh + 2 * hb + bb
    matched = norm_matching_alpha(evaluator, unpruned.with_layer(3, drop_qk=True), [3])
    alpha = matched.alpha[3]
    evaluator.advance(matched, 3)
    hh, hb, bb = _branch_moments(evaluator, 3, matched.with_layer(3, alpha=1.0))
    reachable = hh - hb * hb / bb  # the smallest E||h + a b||² over all a
    if target >= reachable and 0 < alpha < 4:
        assert hh + 2 * alpha * hb + alpha * alpha * bb == pytest.approx(target, rel=1e-5)
    else:
        assert alpha == pytest.approx(min(max(-hb / bb, 0.0), 4.0), abs=1e-6)


@pytest.mark.parametrize(
    ("grid", "message"), [((), "grid is empty"), ((0.5, -0.1), "not a number in"), ((float("nan"),), "not a number in")]
)
def test_bad_grids_are_refused(grid, message):
    with pytest.raises(HeadroomError, match=message):
        check_grid(grid)


def test_bad_layer_choices_are_refused(tiny_arch):
    with pytest.raises(HeadroomError, match="between 1 and 4"):
        top_layers(4, 0)
    with pytest.raises(HeadroomError, match=r"must name layers in 0\.\.3"):
        harp(tiny_arch, "tiny", random_windows(), [4], GRID)
    with pytest.raises(HeadroomError, match="twice"):
        harp(tiny_arch, "tiny", random_windows(), [2, 2], GRID)


def test_harp_leaves_the_model_untouched(tiny_arch):
    state = {k: v.clone() for k, v in tiny_arch.model.state_dict().items()}
    harp(tiny_arch, "tiny", random_windows(), [2, 3], GRID)
    assert all(torch.equal(state[k], v) for k, v in tiny_arch.model.state_dict().items())


def naive_norm_alpha(arch, windows, mask: Mask, layer: int, target: float) -> float:
    """Closed-form alpha from a full forward: moments of the layer input h and its branch b at alpha = 1."""
    h_seen, b_seen = [], []
    trial = mask.with_layer(layer, alpha=1.0)
    with (
        torch.no_grad(),
        apply_mask(arch, trial),
        observe(
            pre=[(arch.layers[layer], lambda m, a, kw: h_seen.append(hidden_arg(a, kw)))],
            post=[(arch.branch_output(layer), lambda m, a, out: b_seen.append(hidden_of(out)))],
        ),
    ):
        arch.final_hidden(windows.input_ids)
    h, b = h_seen[0].double(), b_seen[0].double()
    n = h.shape[0] * h.shape[1]
    hh, hb, bb = (h * h).sum().item() / n, (h * b).sum().item() / n, (b * b).sum().item() / n
    disc = hb * hb - bb * (hh - target)  # bb a² + 2 hb a + hh - target = 0
    if disc < 0:
        return min(max(-hb / bb, 0.0), 4.0)
    roots = [(-hb + s * disc**0.5) / bb for s in (1, -1)]
    inside = [r for r in roots if 0 <= r <= 4]
    return min(inside, key=lambda r: abs(r - 1)) if inside else min(max(roots[0], 0.0), 4.0)


def unpruned_norm(arch, windows, layer: int) -> float:
    h_seen, b_seen = [], []
    with (
        torch.no_grad(),
        observe(
            pre=[(arch.layers[layer], lambda m, a, kw: h_seen.append(hidden_arg(a, kw)))],
            post=[(arch.branch_output(layer), lambda m, a, out: b_seen.append(hidden_of(out)))],
        ),
    ):
        arch.final_hidden(windows.input_ids)
    x = (h_seen[0] + b_seen[0]).double()
    return (x * x).sum().item() / (x.shape[0] * x.shape[1])


def naive_chosen(arch, windows, n: int, grid) -> tuple[list[int], dict[int, float]]:
    """The greedy selection and alpha search written out with a full forward per candidate."""
    layers = range(arch.shape.num_layers)
    targets = {i: unpruned_norm(arch, windows, i) for i in layers}
    mask, chosen = Mask.unpruned(arch.shape, "tiny"), []
    for _ in range(n):
        scores = []
        for layer in set(layers) - set(chosen):
            trial = mask.with_layer(layer, drop_qk=True)
            alpha = naive_norm_alpha(arch, windows, trial, layer, targets[layer])
            scores.append((perplexity(arch, windows, trial.with_layer(layer, alpha=alpha)).perplexity, layer, alpha))
        _, layer, alpha = min(scores)
        chosen.append(layer)
        mask = mask.with_layer(layer, drop_qk=True, alpha=alpha)
    start = Mask.unpruned(arch.shape, "tiny")
    for layer in sorted(chosen):  # closed-form alphas bottom-up, then the greedy search top-down
        start = start.with_layer(layer, drop_qk=True)
    for layer in sorted(chosen):
        start = start.with_layer(layer, alpha=naive_norm_alpha(arch, windows, start, layer, targets[layer]))
    for layer in sorted(chosen, reverse=True):
        scores = [(perplexity(arch, windows, start.with_layer(layer, alpha=a)).perplexity, a) for a in grid]
        start = start.with_layer(layer, alpha=min(scores)[1])
    return sorted(chosen), {i: start.alpha[i] for i in chosen}


@pytest.mark.parametrize("family", ["llama", "gemma2"])  # gemma2: the branch ends in a post-attention norm
def test_chosen_harp_picks_what_a_naive_greedy_selection_picks(family):
    tiny_arch = Architecture(tiny_model(family))
    windows = random_windows(n=3)
    result = chosen_harp(tiny_arch, "tiny", windows, 2, grid=GRID)
    layers, alphas = naive_chosen(tiny_arch, windows, 2, GRID)
    assert list(result.layers) == layers
    assert result.alpha == alphas
    assert {s.layer for s in result.selection if s.chosen} == set(layers)
    assert len(result.selection) == 4 + 3  # every remaining layer at each of the two steps
    for step in result.selection:
        trial = Mask.unpruned(tiny_arch.shape, "tiny")
        for earlier in result.selection:
            if earlier.chosen and earlier.step < step.step:
                trial = trial.with_layer(earlier.layer, drop_qk=True, alpha=earlier.alpha)
        trial = trial.with_layer(step.layer, drop_qk=True, alpha=step.alpha)
        assert step.perplexity == pytest.approx(perplexity(tiny_arch, windows, trial).perplexity, rel=1e-5)
    assert result.calib_perplexity == pytest.approx(perplexity(tiny_arch, windows, result.mask).perplexity, rel=1e-6)


def test_rescale_matches_the_unpruned_norm_for_pruned_heads_and_the_search_never_does_worse():
    arch = Architecture(tiny_model("llama"))
    windows = random_windows(n=3)
    mask = Mask.unpruned(arch.shape, "tiny").with_heads([(1, 0), (1, 1), (1, 4), (2, 5)], keep=False)
    mask = mask.with_layer(3, drop_qk=True)
    assert rescalable_layers(mask) == (1, 2, 3)
    closed = rescale(arch, mask, windows, search=False)
    for layer in (1, 2, 3):  # bottom-up: each layer's alpha is the naive one given the layers below
        below = mask
        for lower in range(layer):
            below = below.with_layer(lower, alpha=closed.mask.alpha[lower])
        expected = naive_norm_alpha(arch, windows, below, layer, unpruned_norm(arch, windows, layer))
        assert closed.alpha[layer] == pytest.approx(expected, abs=1e-5)
    searched = rescale(arch, mask, windows)
    assert searched.norm_matching_alpha == closed.alpha
    assert searched.calib_perplexity <= searched.norm_matching_perplexity + 1e-9
    assert searched.calib_perplexity == pytest.approx(perplexity(arch, windows, searched.mask).perplexity, rel=1e-6)
    assert searched.mask.heads == mask.heads and searched.mask.drop_qk == mask.drop_qk
    with pytest.raises(HeadroomError, match="changes no layer"):
        rescale(arch, Mask.unpruned(arch.shape, "tiny"), windows)
