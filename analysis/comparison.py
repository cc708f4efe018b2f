"""HARP against the baselines at a matched budget, evaluated on held-out text.

One call runs (or reads from the cache) the HARP search on calibration windows, builds every
baseline matched to the HARP mask on the chosen budget axis, and evaluates all of them, plus the
norm-matching variant of HARP and the unpruned model, on the evaluation windows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from analysis.baselines import AXES, BASELINE_METRICS, matched_baselines
from analysis.budget import Budget, budget
from analysis.cache import DiskCache
from analysis.corpus import Windows
from analysis.errors import HeadroomError
from analysis.evaluation import Progress, cached_perplexity
from analysis.harp import DEFAULT_GRID, HarpResult, cached_harp
from analysis.importance import HEAD_METRICS, cached_head_result
from analysis.loading import LoadedModel
from analysis.mask_files import parse_mask
from analysis.masks import Mask

# Baseline scorers worth a disk-cache entry of their own: a backward pass per window, the same entry the
# Importance page reads and writes, so that scoring heads there and comparing here run it once.
SHARED_SCORES = tuple(
    m for m in BASELINE_METRICS if HEAD_METRICS[m].cost == "backward" and not HEAD_METRICS[m].rescales
)


@dataclass(frozen=True)
class ComparisonRow:
    method: str
    eval_perplexity: float
    budget: Budget
    mask: Mask

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "eval_perplexity": self.eval_perplexity,
            "budget": self.budget.to_json(),
            "note": self.mask.note,
        }


@dataclass(frozen=True)
class Comparison:
    match: str
    seqlen: int
    harp: HarpResult
    rows: tuple[ComparisonRow, ...]  # unpruned first, then HARP, then the baselines

    def to_json(self) -> dict[str, Any]:
        return {
            "match": self.match,
            "seqlen": self.seqlen,
            "layers": list(self.harp.layers),
            "alpha": {str(k): v for k, v in sorted(self.harp.alpha.items())},
            "calib_perplexity": self.harp.calib_perplexity,
            "rows": [row.to_json() for row in self.rows],
        }


def shared_scores(
    lm: LoadedModel, calib: Windows, cache: DiskCache | None = None, progress: Progress | None = None
) -> dict[str, torch.Tensor]:
    """The :data:`SHARED_SCORES` head scores on ``calib``, through the importance cache (``progress`` in windows)."""
    return {
        metric: torch.tensor(cached_head_result(lm, calib, metric, None, cache, progress).scores, dtype=torch.float64)
        for metric in SHARED_SCORES
    }


def cached_baselines(
    lm: LoadedModel,
    calib: Windows,
    reference: Mask,
    axis: str,
    seqlen: int,
    cache: DiskCache | None = None,
    progress: Progress | None = None,
) -> dict[str, Mask]:
    """:func:`matched_baselines`, cached under the model, calibration windows, reference and axis.

    The costliest scores come from the importance cache (:func:`shared_scores`; ``progress`` reports them).
    """
    cache = cache or DiskCache()
    parts = {**lm.cache_key(), **calib.cache_key(), "reference": reference.cache_key(), "axis": axis}
    parts |= {"seqlen": seqlen, "scorers": list(BASELINE_METRICS), "format": 2}  # 2: FLAP as its code, v2 masks

    def compute() -> dict[str, Any]:
        measured = shared_scores(lm, calib, cache, progress)
        found = matched_baselines(lm.arch, lm.name, calib, reference, axis, seqlen, measured=measured)
        return {name: mask.to_json() for name, mask in found.items()}

    value = cache.json("baselines", parts, compute)
    return {name: parse_mask(obj, lm.shape, lm.name, lm.fingerprint) for name, obj in value.items()}


def compare(
    lm: LoadedModel,
    calib: Windows,
    evaluation: Windows,
    layers: Sequence[int],
    axis: str,
    grid: Sequence[float] = DEFAULT_GRID,
    progress: Progress | None = None,
    result: HarpResult | None = None,
    cache: DiskCache | None = None,
) -> Comparison:
    """HARP on ``layers`` and every baseline matched on ``axis``, evaluated on ``evaluation``.

    ``result`` is a HARP result already at hand for ``layers`` (e.g. with layers it chose itself);
    without it the plain HARP search on ``layers`` is run or read from the cache. Budgets are reported
    at the evaluation window length. ``progress`` counts evaluation windows over every mask.
    """
    if axis not in AXES:
        raise HeadroomError(f"unknown budget axis '{axis}'; use one of {', '.join(AXES)}")
    seqlen = evaluation.seqlen
    cache = cache or DiskCache()
    result = result or cached_harp(lm, calib, layers, grid, cache)
    norm_matched = result.mask
    for layer, alpha in result.norm_matching_alpha.items():
        norm_matched = norm_matched.with_layer(layer, alpha=alpha)
    masks = {
        "unpruned": Mask.unpruned(lm.shape, lm.name, lm.fingerprint),
        "harp": result.mask,
        "harp-norm-matching-alpha": norm_matched,
        **cached_baselines(lm, calib, result.mask, axis, seqlen, cache),
    }
    rows = []
    total = len(masks) * evaluation.num_windows
    for i, (name, mask) in enumerate(masks.items()):

        def step(done: int, batches: int, before: int = i * evaluation.num_windows) -> None:
            if progress:  # called only while evaluating: a mask read from the cache reports nothing
                progress(before + done * evaluation.num_windows // batches, total)

        ppl = cached_perplexity(lm.arch, lm.fingerprint, evaluation, mask, cache, step).perplexity
        rows.append(ComparisonRow(name, ppl, budget(mask, lm.shape, seqlen), mask))
    return Comparison(match=axis, seqlen=seqlen, harp=result, rows=tuple(rows))
