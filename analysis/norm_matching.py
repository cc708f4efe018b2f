"""The norm-matching alpha: the search-free alternative to searching a layer's alpha.

The closed-form alpha makes the mean squared residual norm right after the pruned layer's attention
branch joins equal the unpruned model's on the same windows. It tests the paper's explanation of why
rescaling works: if rescaling only restored the residual norm, these alphas would match the searched
ones. HARP compares the two, ``rescale`` starts its search from them and the mask search scores
drop-QK moves at them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from analysis.evaluation import IncrementalEvaluator
from analysis.hooks import hidden_of, observe
from analysis.intervention import apply_mask
from analysis.masks import ALPHA_MAX, Mask


def _branch_moments(evaluator: IncrementalEvaluator, layer: int, mask: Mask) -> tuple[float, float, float]:
    """E||h||², E<h, b>, E||b||² over all tokens: h enters ``layer``, b is its attention branch under ``mask``.

    The evaluator must already hold the residual stream under a mask equal to ``mask`` below ``layer``.
    """
    arch = evaluator.arch
    seen: list[torch.Tensor] = []
    sums = torch.zeros(3, dtype=torch.float64)
    count = 0
    record = (arch.branch_output(layer), lambda m, a, out: seen.append(hidden_of(out)))
    with torch.no_grad(), apply_mask(arch, mask), observe(post=[record]):  # observe after the mask's hooks
        for b, h in enumerate(evaluator.layer_inputs(layer)):
            seen.clear()
            evaluator.run_layer(b, layer, h)
            h64, br = h.double(), seen[0].double()
            sums += torch.stack([(h64 * h64).sum(), (h64 * br).sum(), (br * br).sum()]).cpu()
            count += h.shape[0] * h.shape[1]
    hh, hb, bb = (sums / count).tolist()
    return hh, hb, bb


def _solve_norm_alpha(hh: float, hb: float, bb: float, target: float) -> float:
    """alpha with E||h + alpha b||² = target, clipped to [0, ALPHA_MAX].

    The quadratic ``bb a² + 2 hb a + (hh - target) = 0``; of its real roots the non-negative one
    nearest 1 is taken. With no real root (the target is below the smallest reachable norm) the
    norm-minimising alpha ``-hb / bb`` is the closest one can get.
    """
    if bb <= 0.0:
        return 1.0
    disc = hb * hb - bb * (hh - target)
    if disc < 0:
        return min(max(-hb / bb, 0.0), ALPHA_MAX)
    roots = [(-hb + s * math.sqrt(disc)) / bb for s in (1, -1)]
    valid = [r for r in roots if 0.0 <= r <= ALPHA_MAX]
    if not valid:
        return min(max(roots[0], 0.0), ALPHA_MAX)
    return min(valid, key=lambda r: abs(r - 1.0))


def norm_targets(evaluator: IncrementalEvaluator, layers: Sequence[int]) -> dict[int, float]:
    """E||h + b||² right after each layer's attention branch joins, in the unpruned model."""
    unpruned = Mask.unpruned(evaluator.arch.shape, "")
    targets = {}
    for layer in sorted(layers):
        evaluator.advance(unpruned, layer)
        hh, hb, bb = _branch_moments(evaluator, layer, unpruned)
        targets[layer] = hh + 2 * hb + bb
    return targets


def closed_form_alpha(evaluator: IncrementalEvaluator, mask: Mask, layer: int, target: float) -> float:
    """The alpha of ``layer`` under ``mask`` (any mask: drop-QK, pruned heads or both) that matches ``target``.

    Brings the evaluator's residual stream up to date with ``mask`` below ``layer`` first, which costs
    nothing when only layers at or above ``layer`` changed since its last call.
    """
    evaluator.advance(mask, layer)
    hh, hb, bb = _branch_moments(evaluator, layer, mask.with_layer(layer, alpha=1.0))
    return round(_solve_norm_alpha(hh, hb, bb, target), 6)


def norm_matching_alpha(evaluator: IncrementalEvaluator, start: Mask, layers: Sequence[int]) -> Mask:
    """Closed-form alphas, lowest chosen layer first, each matching the unpruned residual norm.

    Bottom-up, so each layer's input already carries the corrections of the layers below it.
    """
    targets = norm_targets(evaluator, layers)
    mask = start
    for layer in sorted(layers):
        mask = mask.with_layer(layer, alpha=closed_form_alpha(evaluator, mask, layer, targets[layer]))
    return mask
