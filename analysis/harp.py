"""HARP: drop the query/key projections of the top layers and rescale their attention branch.

``harp`` puts the chosen layers in drop-QK mode and finds each layer's alpha by the greedy search of
method.md: highest layer first, every candidate on the grid, keep the lowest calibration perplexity
(ties: the smaller alpha), fix it, go one layer down; layers not searched yet stay at alpha = 1.

The search is fast by construction. While layer i is searched nothing below it changes, so the
incremental evaluator keeps the residual stream entering layer i and each candidate costs layer i,
the layers above it and the language-model head; nothing below i is ever recomputed. (Layer i's own
attention branch is the per-token map ``o_proj(repeat_kv(v_proj(x)))``, under 2 % of a candidate's
cost, so it is recomputed rather than stored.)

``norm_matching_alpha`` is the search-free alternative: the closed-form alpha that makes the mean
squared residual norm right after the pruned layer's attention branch joins equal the unpruned
model's on the same windows. It tests the paper's explanation of why rescaling works: if rescaling
only restored the residual norm, these alphas would match the searched ones.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from analysis.architecture import Architecture
from analysis.cache import DiskCache
from analysis.corpus import Windows
from analysis.errors import HeadroomError
from analysis.evaluation import IncrementalEvaluator, Progress
from analysis.hooks import hidden_of, observe
from analysis.intervention import apply_mask
from analysis.loading import LoadedModel
from analysis.masks import ALPHA_MAX, Mask, parse_mask

DEFAULT_GRID = tuple(round(0.1 * i, 1) for i in range(11))


@dataclass(frozen=True)
class SearchStep:
    layer: int
    alpha: float
    perplexity: float


@dataclass(frozen=True)
class HarpResult:
    """The searched mask, how the search went, and the norm-matching comparison."""

    mask: Mask
    layers: tuple[int, ...]
    grid: tuple[float, ...]
    alpha: dict[int, float]
    trace: tuple[SearchStep, ...]
    calib_perplexity: float
    unpruned_perplexity: float
    alpha1_perplexity: float  # the chosen layers in drop-QK mode before any rescaling
    norm_matching_alpha: dict[int, float]
    norm_matching_perplexity: float

    def to_json(self) -> dict[str, Any]:
        return {
            "layers": list(self.layers),
            "grid": list(self.grid),
            "alpha": {str(k): v for k, v in sorted(self.alpha.items())},
            "trace": [s.__dict__ for s in self.trace],
            "calib_perplexity": self.calib_perplexity,
            "unpruned_perplexity": self.unpruned_perplexity,
            "alpha1_perplexity": self.alpha1_perplexity,
            "norm_matching": {
                "alpha": {str(k): v for k, v in sorted(self.norm_matching_alpha.items())},
                "calib_perplexity": self.norm_matching_perplexity,
            },
            "mask": self.mask.to_json(),
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any], mask: Mask) -> HarpResult:
        """Rebuild a cached result; ``mask`` is the already-validated mask of ``obj['mask']``."""
        return cls(
            mask=mask,
            layers=tuple(obj["layers"]),
            grid=tuple(obj["grid"]),
            alpha={int(k): v for k, v in obj["alpha"].items()},
            trace=tuple(SearchStep(**s) for s in obj["trace"]),
            calib_perplexity=obj["calib_perplexity"],
            unpruned_perplexity=obj["unpruned_perplexity"],
            alpha1_perplexity=obj["alpha1_perplexity"],
            norm_matching_alpha={int(k): v for k, v in obj["norm_matching"]["alpha"].items()},
            norm_matching_perplexity=obj["norm_matching"]["calib_perplexity"],
        )


def top_layers(num_layers: int, n: int) -> tuple[int, ...]:
    if not 1 <= n <= num_layers:
        raise HeadroomError(f"--layers must be between 1 and {num_layers} for this model, got {n}")
    return tuple(range(num_layers - n, num_layers))


def check_layers(layers: Sequence[int], num_layers: int) -> tuple[int, ...]:
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad or not layers:
        raise HeadroomError(f"layer set {list(layers)} must name layers in 0..{num_layers - 1}")
    if len(set(layers)) != len(layers):
        raise HeadroomError(f"layer set {list(layers)} names a layer twice")
    return tuple(sorted(layers))


def check_grid(grid: Sequence[float]) -> tuple[float, ...]:
    if not grid:
        raise HeadroomError("the alpha grid is empty; give at least one value, e.g. --grid 0,0.5,1")
    for a in grid:
        if not (math.isfinite(a) and 0.0 <= a <= ALPHA_MAX):
            raise HeadroomError(f"alpha grid value {a} is not a number in [0, {ALPHA_MAX:g}]")
    return tuple(sorted(set(grid)))


def greedy_alpha_search(
    start: Mask,
    layers: Sequence[int],
    grid: Sequence[float],
    evaluate: Callable[[Mask], float],
    progress: Progress | None = None,
) -> tuple[Mask, tuple[SearchStep, ...]]:
    """The greedy search itself, for any perplexity function (cached or naive)."""
    trace: list[SearchStep] = []
    mask = start
    total, done = len(layers) * len(grid), 0
    for layer in sorted(layers, reverse=True):
        best: tuple[float, float] | None = None  # (perplexity, alpha)
        for alpha in sorted(grid):
            ppl = evaluate(mask.with_layer(layer, alpha=alpha))
            trace.append(SearchStep(layer, alpha, ppl))
            if best is None or ppl < best[0]:  # strict: a tie keeps the smaller alpha
                best = (ppl, alpha)
            done += 1
            if progress:
                progress(done, total)
        mask = mask.with_layer(layer, alpha=best[1])
    return mask, tuple(trace)


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


def norm_matching_alpha(evaluator: IncrementalEvaluator, start: Mask, layers: Sequence[int]) -> Mask:
    """Closed-form alphas, lowest chosen layer first, each matching the unpruned residual norm.

    Bottom-up, so each layer's input already carries the corrections of the layers below it.
    """
    unpruned = Mask.unpruned(evaluator.arch.shape, start.model_name)
    targets = {}
    for layer in layers:
        evaluator.advance(unpruned, layer)
        hh, hb, bb = _branch_moments(evaluator, layer, unpruned)
        targets[layer] = hh + 2 * hb + bb  # E||h + b||² of the unpruned model
    mask = start
    for layer in sorted(layers):
        evaluator.advance(mask, layer)
        hh, hb, bb = _branch_moments(evaluator, layer, mask.with_layer(layer, alpha=1.0))
        mask = mask.with_layer(layer, alpha=round(_solve_norm_alpha(hh, hb, bb, targets[layer]), 6))
    return mask


def harp(
    arch: Architecture,
    model_name: str,
    calib: Windows,
    layers: Sequence[int],
    grid: Sequence[float] = DEFAULT_GRID,
    progress: Progress | None = None,
) -> HarpResult:
    """Run HARP on ``layers`` with calibration windows ``calib``."""
    layers = check_layers(layers, arch.shape.num_layers)
    grid = check_grid(grid)
    unpruned = Mask.unpruned(arch.shape, model_name)
    evaluator = IncrementalEvaluator(arch, calib)
    unpruned_ppl = evaluator.perplexity(unpruned).perplexity
    start = unpruned.with_drop_qk(layers)
    matched = norm_matching_alpha(evaluator, start, layers)
    matched_ppl = evaluator.perplexity(matched).perplexity
    alpha1_ppl = evaluator.perplexity(start).perplexity
    mask, trace = greedy_alpha_search(start, layers, grid, lambda m: evaluator.perplexity(m).perplexity, progress)
    note = f"HARP: drop-QK on layers {list(layers)}, alpha searched on grid {list(grid)}"
    mask = replace(mask, note=note)
    return HarpResult(
        mask=mask,
        layers=layers,
        grid=grid,
        alpha={i: mask.alpha[i] for i in layers},
        trace=trace,
        calib_perplexity=evaluator.perplexity(mask).perplexity,
        unpruned_perplexity=unpruned_ppl,
        alpha1_perplexity=alpha1_ppl,
        norm_matching_alpha={i: matched.alpha[i] for i in layers},
        norm_matching_perplexity=matched_ppl,
    )


def cached_harp(
    lm: LoadedModel,
    calib: Windows,
    layers: Sequence[int],
    grid: Sequence[float] = DEFAULT_GRID,
    cache: DiskCache | None = None,
    progress: Progress | None = None,
    refresh: bool = False,
) -> HarpResult:
    """:func:`harp`, read from the disk cache when this model, calibration text, layers and grid were seen."""
    layers = check_layers(layers, lm.shape.num_layers)
    grid = check_grid(grid)
    parts = {"model": lm.fingerprint, **calib.cache_key(), "layers": list(layers), "grid": list(grid)}

    def compute() -> dict[str, Any]:
        return harp(lm.arch, lm.name, calib, layers, grid, progress).to_json()

    value = (cache or DiskCache()).json("harp", parts, compute, refresh)
    return HarpResult.from_json(value, parse_mask(value["mask"], lm.shape, lm.name, lm.fingerprint))
