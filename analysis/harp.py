"""HARP: drop the query/key projections of the top layers and rescale their attention branch.

``harp`` puts the chosen layers in drop-QK mode and finds each layer's alpha by the greedy search of
method.md: highest layer first, every candidate on the grid, keep the lowest calibration perplexity
(ties: the smaller alpha), fix it, go one layer down; layers not searched yet stay at alpha = 1.

The search is fast by construction. While layer i is searched nothing below it changes, so the
incremental evaluator keeps the residual stream entering layer i and each candidate costs layer i,
the layers above it and the language-model head; nothing below i is ever recomputed. (Layer i's own
attention branch is the per-token map ``o_proj(repeat_kv(v_proj(x)))``, under 2 % of a candidate's
cost, so it is recomputed rather than stored.)

Every result also carries the search-free alternative, the norm-matching alphas
(``analysis.norm_matching``), and their perplexity. ``chosen_harp`` lets HARP choose the layers
itself (``choose_layers``: greedy on calibration perplexity at those alphas) before the search.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from analysis.architecture import Architecture
from analysis.cache import DiskCache
from analysis.corpus import Windows
from analysis.errors import HeadroomError
from analysis.evaluation import IncrementalEvaluator, Progress
from analysis.loading import LoadedModel
from analysis.mask_files import parse_mask
from analysis.masks import ALPHA_MAX, Mask
from analysis.norm_matching import closed_form_alpha, norm_matching_alpha, norm_targets

DEFAULT_GRID = tuple(round(0.1 * i, 1) for i in range(11))


@dataclass(frozen=True)
class SearchStep:
    layer: int
    alpha: float
    perplexity: float


@dataclass(frozen=True)
class SelectionStep:
    """One candidate of the greedy layer selection: drop-QK on ``layer`` at its closed-form alpha."""

    step: int
    layer: int
    alpha: float
    perplexity: float
    chosen: bool


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
    selection: tuple[SelectionStep, ...] = ()  # the greedy layer selection, when the layers were chosen

    def to_json(self) -> dict[str, Any]:
        return {
            "layers": list(self.layers),
            "grid": list(self.grid),
            "alpha": {str(k): v for k, v in sorted(self.alpha.items())},
            "trace": [asdict(s) for s in self.trace],
            "calib_perplexity": self.calib_perplexity,
            "unpruned_perplexity": self.unpruned_perplexity,
            "alpha1_perplexity": self.alpha1_perplexity,
            "norm_matching": {
                "alpha": {str(k): v for k, v in sorted(self.norm_matching_alpha.items())},
                "calib_perplexity": self.norm_matching_perplexity,
            },
            "selection": [asdict(s) for s in self.selection],
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
            selection=tuple(SelectionStep(**s) for s in obj.get("selection", [])),
        )


def top_layers(num_layers: int, n: int) -> tuple[int, ...]:
    if not 1 <= n <= num_layers:
        raise HeadroomError(
            f"the number of top layers must be between 1 and {num_layers} for this model, got {n}", settings=("layers",)
        )
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
        raise HeadroomError("the alpha grid is empty; give at least one value, e.g. 0,0.5,1", settings=("grid",))
    for a in grid:
        if not (math.isfinite(a) and 0.0 <= a <= ALPHA_MAX):
            raise HeadroomError(f"alpha grid value {a} is not a number in [0, {ALPHA_MAX:g}]")
    return tuple(sorted(set(grid)))


def greedy_alpha_search(
    start: Mask,
    layers: Sequence[int],
    grid: Sequence[float] | Mapping[int, Sequence[float]],
    evaluate: Callable[[Mask], float],
    progress: Progress | None = None,
) -> tuple[Mask, tuple[SearchStep, ...]]:
    """The greedy search itself, for any perplexity function (cached or naive).

    ``grid`` is one grid for every layer or a grid per layer (a head-pruned layer wants alphas near
    and above 1, a drop-QK layer near 0).
    """
    grids = {layer: grid[layer] if isinstance(grid, Mapping) else grid for layer in layers}
    trace: list[SearchStep] = []
    mask = start
    total, done = sum(len(g) for g in grids.values()), 0
    for layer in sorted(layers, reverse=True):
        best: tuple[float, float] | None = None  # (perplexity, alpha)
        for alpha in sorted(grids[layer]):
            ppl = evaluate(mask.with_layer(layer, alpha=alpha))
            trace.append(SearchStep(layer, alpha, ppl))
            if best is None or ppl < best[0]:  # strict: a tie keeps the smaller alpha
                best = (ppl, alpha)
            done += 1
            if progress:
                progress(done, total)
        mask = mask.with_layer(layer, alpha=best[1])
    return mask, tuple(trace)


def choose_layers(
    evaluator: IncrementalEvaluator,
    n: int,
    candidates: Sequence[int],
    progress: Progress | None = None,
) -> tuple[tuple[int, ...], tuple[SelectionStep, ...]]:
    """Greedy forward selection of ``n`` drop-QK layers on calibration perplexity.

    Each step puts every remaining candidate layer in drop-QK mode with its closed-form
    norm-matching alpha (the cheap stand-in for a search), evaluates the calibration perplexity, and
    commits the lowest (ties: the lower layer). Candidates are tried highest layer first: each one
    differs from the committed mask only at its own layer, so the evaluator reruns that layer and
    those above it, and the closed-form alpha reuses the stored input of the layer.
    """
    if not 1 <= n <= len(candidates):
        raise HeadroomError(f"cannot choose {n} layers out of {len(candidates)} candidates; give 1..{len(candidates)}")
    targets = norm_targets(evaluator, candidates)
    mask = Mask.unpruned(evaluator.arch.shape, "")
    chosen: list[int] = []
    trace: list[SelectionStep] = []
    total = sum(len(candidates) - k for k in range(n))
    for step in range(n):
        scores = []
        for layer in sorted(set(candidates) - set(chosen), reverse=True):
            trial = mask.with_layer(layer, drop_qk=True)
            alpha = closed_form_alpha(evaluator, trial, layer, targets[layer])
            ppl = evaluator.perplexity(trial.with_layer(layer, alpha=alpha)).perplexity
            scores.append((ppl, layer, alpha))
            if progress:
                progress(len(trace) + len(scores), total)
        best = min(scores)
        trace.extend(SelectionStep(step, layer, alpha, ppl, (ppl, layer) == best[:2]) for ppl, layer, alpha in scores)
        chosen.append(best[1])
        mask = mask.with_layer(best[1], drop_qk=True, alpha=best[2])
    return tuple(sorted(chosen)), tuple(trace)


def _search_layers(
    evaluator: IncrementalEvaluator,
    model_name: str,
    layers: tuple[int, ...],
    grid: tuple[float, ...],
    from_norm_matching: bool,
    progress: Progress | None,
    selection: tuple[SelectionStep, ...] = (),
) -> HarpResult:
    """Drop-QK on ``layers`` and the greedy alpha search, from alpha = 1 (HARP) or the closed-form alphas."""
    unpruned = Mask.unpruned(evaluator.arch.shape, model_name)
    unpruned_ppl = evaluator.perplexity(unpruned).perplexity
    start = unpruned.with_drop_qk(layers)
    matched = norm_matching_alpha(evaluator, start, layers)
    matched_ppl = evaluator.perplexity(matched).perplexity
    alpha1_ppl = evaluator.perplexity(start).perplexity
    first = matched if from_norm_matching else start
    mask, trace = greedy_alpha_search(first, layers, grid, lambda m: evaluator.perplexity(m).perplexity, progress)
    how = "chosen by greedy selection" if selection else ""
    note = f"HARP: drop-QK on layers {list(layers)} {how}, alpha searched on grid {list(grid)}".replace("  ", " ")
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
        selection=selection,
    )


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
    return _search_layers(IncrementalEvaluator(arch, calib), model_name, layers, grid, False, progress)


def chosen_harp(
    arch: Architecture,
    model_name: str,
    calib: Windows,
    n: int,
    candidates: Sequence[int] | None = None,
    grid: Sequence[float] = DEFAULT_GRID,
    progress: Progress | None = None,
) -> HarpResult:
    """HARP on ``n`` layers chosen by :func:`choose_layers`, then the greedy alpha search on them.

    The alpha search starts from the closed-form alphas of the chosen set (not alpha = 1), so the
    layers below the one being searched are already near their final scale. ``candidates``
    restricts the choice (e.g. the layers of lowest Block Influence); default every layer.
    """
    candidates = check_layers(candidates or range(arch.shape.num_layers), arch.shape.num_layers)
    grid = check_grid(grid)
    evaluator = IncrementalEvaluator(arch, calib)
    total = sum(len(candidates) - k for k in range(n)) + n * len(grid)

    def selecting(done: int, _: int) -> None:
        if progress:
            progress(done, total)

    def searching(done: int, _: int) -> None:
        if progress:
            progress(total - n * len(grid) + done, total)

    layers, selection = choose_layers(evaluator, n, candidates, selecting)
    return _search_layers(evaluator, model_name, layers, grid, True, searching, selection)


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

    def compute() -> dict[str, Any]:
        return harp(lm.arch, lm.name, calib, layers, grid, progress).to_json()

    value = (cache or DiskCache()).json("harp", _harp_parts(lm, calib, layers, grid), compute, refresh)
    return _stored_result(lm, value)


def stored_harp(
    lm: LoadedModel, calib: Windows, layers: Sequence[int], grid: Sequence[float], cache: DiskCache | None = None
) -> HarpResult | None:
    """What :func:`cached_harp` would answer from the disk cache, or None; never computes (a page shows a past run)."""
    parts = _harp_parts(lm, calib, check_layers(layers, lm.shape.num_layers), check_grid(grid))
    value = (cache or DiskCache()).get_json("harp", parts)
    return None if value is None else _stored_result(lm, value)


def _stored_result(lm: LoadedModel, value: dict[str, Any]) -> HarpResult:
    """A HARP result from its cache entry, its mask checked against ``lm``."""
    return HarpResult.from_json(value, parse_mask(value["mask"], lm.shape, lm.name, lm.fingerprint))


def _harp_parts(lm: LoadedModel, calib: Windows, layers: Sequence[int], grid: Sequence[float]) -> dict[str, Any]:
    return {**lm.cache_key(), **calib.cache_key(), "layers": list(layers), "grid": list(grid)}


def cached_chosen_harp(
    lm: LoadedModel,
    calib: Windows,
    n: int,
    candidates: Sequence[int] | None = None,
    grid: Sequence[float] = DEFAULT_GRID,
    cache: DiskCache | None = None,
    progress: Progress | None = None,
    refresh: bool = False,
) -> HarpResult:
    """:func:`chosen_harp` through the disk cache."""
    candidates = check_layers(candidates or range(lm.shape.num_layers), lm.shape.num_layers)
    grid = check_grid(grid)
    parts = {**lm.cache_key(), **calib.cache_key(), "choose": n, "candidates": list(candidates)}
    parts["grid"] = list(grid)

    def compute() -> dict[str, Any]:
        return chosen_harp(lm.arch, lm.name, calib, n, candidates, grid, progress).to_json()

    value = (cache or DiskCache()).json("harp_chosen", parts, compute, refresh)
    return _stored_result(lm, value)
