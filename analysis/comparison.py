"""HARP against the baselines at a matched budget, evaluated on held-out text.

One call runs (or reads from the cache) the HARP search on calibration windows, builds every
baseline matched to the HARP mask on the chosen budget axis, and evaluates all of them, plus the
norm-matching variant of HARP and the unpruned model, on the evaluation windows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from analysis.baselines import AXES, BASELINE_METRICS, matched_baselines
from analysis.cache import DiskCache
from analysis.corpus import Windows
from analysis.errors import HeadroomError
from analysis.evaluation import Progress, cached_perplexity
from analysis.harp import DEFAULT_GRID, HarpResult, cached_harp
from analysis.loading import LoadedModel
from analysis.masks import Budget, Mask, budget, parse_mask


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
    seq_len: int
    harp: HarpResult
    rows: tuple[ComparisonRow, ...]  # unpruned first, then HARP, then the baselines

    def to_json(self) -> dict[str, Any]:
        return {
            "match": self.match,
            "seq_len": self.seq_len,
            "layers": list(self.harp.layers),
            "alpha": {str(k): v for k, v in sorted(self.harp.alpha.items())},
            "calib_perplexity": self.harp.calib_perplexity,
            "rows": [row.to_json() for row in self.rows],
        }


def cached_baselines(
    lm: LoadedModel, calib: Windows, reference: Mask, axis: str, seq_len: int, cache: DiskCache | None = None
) -> dict[str, Mask]:
    """:func:`matched_baselines`, cached under the model, calibration windows, reference and axis."""
    parts = {**lm.cache_key(), **calib.cache_key(), "reference": reference.cache_key(), "axis": axis}
    parts |= {"seq_len": seq_len, "scorers": list(BASELINE_METRICS), "format": 2}  # 2: FLAP as its code, v2 masks

    def compute() -> dict[str, Any]:
        found = matched_baselines(lm.arch, lm.name, calib, reference, axis, seq_len)
        return {name: mask.to_json() for name, mask in found.items()}

    value = (cache or DiskCache()).json("baselines", parts, compute)
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
) -> Comparison:
    """HARP on ``layers`` and every baseline matched on ``axis``, evaluated on ``evaluation``.

    ``result`` is a HARP result already at hand for ``layers`` (e.g. with layers it chose itself);
    without it the plain HARP search on ``layers`` is run or read from the cache. Budgets are reported
    at the evaluation window length.
    """
    if axis not in AXES:
        raise HeadroomError(f"unknown budget axis '{axis}'; use one of {', '.join(AXES)}")
    seq_len = evaluation.seqlen
    result = result or cached_harp(lm, calib, layers, grid)
    norm_matched = result.mask
    for layer, alpha in result.norm_matching_alpha.items():
        norm_matched = norm_matched.with_layer(layer, alpha=alpha)
    masks = {
        "unpruned": Mask.unpruned(lm.shape, lm.name, lm.fingerprint),
        "harp": result.mask,
        "harp-norm-matching-alpha": norm_matched,
        **cached_baselines(lm, calib, result.mask, axis, seq_len),
    }
    rows = []
    for i, (name, mask) in enumerate(masks.items()):
        ppl = cached_perplexity(lm.arch, lm.fingerprint, evaluation, mask).perplexity
        rows.append(ComparisonRow(name, ppl, budget(mask, lm.shape, seq_len), mask))
        if progress:
            progress(i + 1, len(masks))
    return Comparison(match=axis, seq_len=seq_len, harp=result, rows=tuple(rows))
