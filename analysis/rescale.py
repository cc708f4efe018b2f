"""Rescaling any mask: per-layer alphas for every layer the mask changed but did not remove.

The mask editor's "rescale this mask" and ``python -m analysis rescale`` use it: closed-form
norm-matching alphas bottom-up (``analysis.norm_matching``), then optionally HARP's greedy alpha
search from them, on a grid that suits the layer (drop-QK: HARP's; pruned heads: near and above 1).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from analysis.architecture import Architecture
from analysis.cache import DiskCache
from analysis.corpus import Windows
from analysis.errors import HeadroomError
from analysis.evaluation import IncrementalEvaluator, Progress
from analysis.harp import DEFAULT_GRID, SearchStep, check_layers, greedy_alpha_search
from analysis.loading import LoadedModel
from analysis.mask_files import parse_mask
from analysis.masks import Mask
from analysis.norm_matching import norm_matching_alpha

HEAD_GRID = (0.8, 0.9, 1.0, 1.1, 1.2, 1.35, 1.5)  # fewer heads shrink the branch: alphas near and above 1


def rescalable_layers(mask: Mask) -> tuple[int, ...]:
    """Layers whose attention branch a mask changed but did not remove: drop-QK or pruned heads, alpha > 0."""
    return tuple(
        i
        for i in range(mask.num_layers)
        if (i in mask.drop_qk or not all(mask.heads[i])) and any(mask.heads[i]) and mask.alpha[i] > 0.0
    )


def alpha_grid(mask: Mask, layer: int) -> tuple[float, ...]:
    """The alphas worth trying at ``layer``: HARP's grid for drop-QK, :data:`HEAD_GRID` for pruned heads."""
    return DEFAULT_GRID if layer in mask.drop_qk else HEAD_GRID


@dataclass(frozen=True)
class RescaleResult:
    """Per-layer alphas for any mask: the closed-form norm-matching ones, and the greedy search from them."""

    mask: Mask  # the searched mask (the closed-form one when no search was asked for)
    layers: tuple[int, ...]
    start_perplexity: float  # calibration perplexity of the mask as given
    norm_matching_alpha: dict[int, float]
    norm_matching_perplexity: float
    alpha: dict[int, float]
    calib_perplexity: float
    trace: tuple[SearchStep, ...]

    def to_json(self) -> dict[str, Any]:
        obj = asdict(self)
        obj["mask"] = self.mask.to_json()
        for key in ("norm_matching_alpha", "alpha"):
            obj[key] = {str(k): v for k, v in sorted(obj[key].items())}
        return obj

    @classmethod
    def from_json(cls, obj: dict[str, Any], mask: Mask) -> RescaleResult:
        """Rebuild a cached result; ``mask`` is the already-validated mask of ``obj['mask']``."""
        return cls(
            mask=mask,
            layers=tuple(obj["layers"]),
            start_perplexity=obj["start_perplexity"],
            norm_matching_alpha={int(k): v for k, v in obj["norm_matching_alpha"].items()},
            norm_matching_perplexity=obj["norm_matching_perplexity"],
            alpha={int(k): v for k, v in obj["alpha"].items()},
            calib_perplexity=obj["calib_perplexity"],
            trace=tuple(SearchStep(**s) for s in obj["trace"]),
        )


def rescale(
    arch: Architecture,
    mask: Mask,
    calib: Windows,
    layers: Sequence[int] | None = None,
    search: bool = True,
    progress: Progress | None = None,
) -> RescaleResult:
    """Rescale every changed layer of ``mask``: closed-form alphas bottom-up, then (``search``) the greedy search.

    The search starts from the closed-form alphas and tries, per layer, :func:`alpha_grid` plus the
    layer's closed-form alpha, highest layer first; a tie keeps the smaller alpha.
    """
    layers = check_layers(layers, mask.num_layers) if layers else rescalable_layers(mask)
    if not layers:
        raise HeadroomError(
            "this mask changes no layer that can be rescaled (no drop-QK layer, no pruned head in a layer that keeps "
            "some); prune something first"
        )
    evaluator = IncrementalEvaluator(arch, calib)
    start_ppl = evaluator.perplexity(mask).perplexity
    matched = norm_matching_alpha(evaluator, mask, layers)
    matched_ppl = evaluator.perplexity(matched).perplexity
    result, trace = matched, ()
    if search:
        grids = {i: tuple(sorted({*alpha_grid(mask, i), matched.alpha[i]})) for i in layers}
        evaluate = lambda m: evaluator.perplexity(m).perplexity  # noqa: E731
        result, trace = greedy_alpha_search(matched, layers, grids, evaluate, progress)
    return RescaleResult(
        mask=replace(result, note=(mask.note + " | rescaled").lstrip(" |")),
        layers=layers,
        start_perplexity=start_ppl,
        norm_matching_alpha={i: matched.alpha[i] for i in layers},
        norm_matching_perplexity=matched_ppl,
        alpha={i: result.alpha[i] for i in layers},
        calib_perplexity=evaluator.perplexity(result).perplexity,
        trace=trace,
    )


def cached_rescale(
    lm: LoadedModel,
    mask: Mask,
    calib: Windows,
    search: bool = True,
    cache: DiskCache | None = None,
    progress: Progress | None = None,
    refresh: bool = False,
) -> RescaleResult:
    """:func:`rescale` through the disk cache."""
    parts = {**lm.cache_key(), **calib.cache_key(), "mask": mask.cache_key(), "search": search}
    parts["grids"] = [list(DEFAULT_GRID), list(HEAD_GRID)]
    value = (cache or DiskCache()).json(
        "rescale", parts, lambda: rescale(lm.arch, mask, calib, search=search, progress=progress).to_json(), refresh
    )
    return RescaleResult.from_json(value, parse_mask(value["mask"], lm.shape, lm.name, lm.fingerprint))
