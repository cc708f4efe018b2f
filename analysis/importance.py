"""Importance scores of attention heads: the registry of head metrics, their cached results, how they rank heads.

Every metric is measured on calibration windows with the model as loaded (no mask) and writes no
weight. The activation metrics are :mod:`analysis.activation_metrics`, the loss metrics (ablation,
gradients) :mod:`analysis.loss_metrics`, and the pattern statistics :mod:`analysis.attention_patterns`
(which recompute attention weights from q/k); :data:`HEAD_METRICS` is the one place that names them.
Head scores are float64 tensors ``[num_layers, num_heads]``; for all of them but
``DESCRIPTIVE_METRICS`` a *low* score means "cheap to remove".
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from analysis.activation_metrics import OProjStats, flap_wifv, magnitude, o_proj_input_stats, wanda_sp
from analysis.architecture import Architecture
from analysis.attention_patterns import attention_stats
from analysis.cache import DiskCache
from analysis.corpus import Windows
from analysis.errors import HeadroomError
from analysis.evaluation import Progress
from analysis.loading import LoadedModel
from analysis.loss_metrics import (
    GateAttribution,
    ablation,
    gradient,
    gradient_normalized,
    integrated_gradients,
    per_layer_l2,
)

# A head metric returns its scores, or (integrated gradients) an attribution carrying a check to show.
HeadMetricFunction = Callable[
    [Architecture, Windows, Sequence[int] | None, Progress | None], torch.Tensor | GateAttribution
]
# What a metric costs on calibration windows, cheapest first: weights only, one forward pass, a forward
# and a backward pass per window, or many passes (per integration step, per head).
COSTS = ("weights", "forward", "backward", "many")


@dataclass(frozen=True)
class HeadMetric:
    """One entry of the registry: how to compute the metric and what it costs.

    ``from_stats`` computes the same scores from o_proj input statistics already measured (so that
    several activation metrics share one pass). A ``descriptive`` metric describes a head rather than
    ranks it: for it a *high* value tends to mark a head cheap to remove (diffuse or sink-only
    attention); every other metric follows "low = cheap".
    """

    compute: HeadMetricFunction
    cost: str
    descriptive: bool = False
    from_stats: Callable[[Architecture, OProjStats], torch.Tensor] | None = None
    # (metric, per-layer rescaling): this metric is that one's scores rescaled per layer, so it ranks the
    # heads of a layer as that one does and can be computed from its scores.
    rescales: tuple[str, Callable[[torch.Tensor], torch.Tensor]] | None = None

    def __call__(
        self,
        arch: Architecture,
        windows: Windows,
        layers: Sequence[int] | None = None,
        progress: Progress | None = None,
    ) -> torch.Tensor | GateAttribution:
        return self.compute(arch, windows, layers, progress)

    def scores(
        self,
        arch: Architecture,
        windows: Windows,
        stats: OProjStats | None = None,
        known: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Plain scores of every head (no details), made from ``stats`` or ``known`` scores where they suffice."""
        if stats is not None and self.from_stats is not None:
            return self.from_stats(arch, stats)
        if known and self.rescales and self.rescales[0] in known:
            return self.rescales[1](known[self.rescales[0]])
        result = self(arch, windows)
        return result.scores if isinstance(result, GateAttribution) else result


def _activation_metric(score: Callable[[Architecture, OProjStats], torch.Tensor]) -> HeadMetric:
    return HeadMetric(
        lambda arch, windows, layers, progress: score(arch, o_proj_input_stats(arch, windows)), "forward", False, score
    )


HEAD_METRICS: dict[str, HeadMetric] = {
    "ablation": HeadMetric(ablation, "many"),
    "gradient": HeadMetric(lambda arch, windows, layers, progress: gradient(arch, windows, progress), "backward"),
    "gradient_normalized": HeadMetric(
        lambda arch, windows, layers, progress: gradient_normalized(arch, windows, progress),
        "backward",
        rescales=("gradient", per_layer_l2),
    ),
    "integrated_gradients": HeadMetric(
        lambda arch, windows, layers, progress: integrated_gradients(arch, windows, progress), "many"
    ),
    "magnitude": HeadMetric(lambda arch, windows, layers, progress: magnitude(arch), "weights"),
    "wanda_sp": _activation_metric(wanda_sp),
    "flap_wifv": _activation_metric(flap_wifv),
    "attention_entropy": HeadMetric(
        lambda arch, windows, layers, progress: attention_stats(arch, windows, progress).entropy, "forward", True
    ),
    "sink_attention": HeadMetric(
        lambda arch, windows, layers, progress: attention_stats(arch, windows, progress).sink, "forward", True
    ),
}
DESCRIPTIVE_METRICS = frozenset(name for name, m in HEAD_METRICS.items() if m.descriptive)


def ranking_metrics(most: str) -> tuple[str, ...]:
    """The metrics that rank heads ("low = cheap") at a cost of at most ``most`` (one of :data:`COSTS`)."""
    limit = COSTS.index(most)
    return tuple(name for name, m in HEAD_METRICS.items() if not m.descriptive and COSTS.index(m.cost) <= limit)


# One pass or none: the default set to compare and to map heads by.
CHEAP_METRICS = ranking_metrics("forward")


@dataclass(frozen=True)
class HeadScores:
    """One metric's rows per layer (None outside the requested layers) and its own checks, if any."""

    metric: str
    scores: list[list[float | None]]
    details: dict[str, float]

    def to_json(self) -> dict[str, Any]:
        return {"metric": self.metric, "scores": self.scores, "details": self.details}


def cached_head_result(
    lm: LoadedModel,
    windows: Windows,
    metric: str,
    layers: Sequence[int] | None = None,
    cache: DiskCache | None = None,
    progress: Progress | None = None,
) -> HeadScores:
    """A head metric with its details (integrated gradients' completeness), read from the disk cache when seen."""
    if metric not in HEAD_METRICS:
        raise HeadroomError(f"unknown metric '{metric}'; choose one of {', '.join(HEAD_METRICS)}")
    num_layers = lm.shape.num_layers
    if layers is not None and (not layers or any(not 0 <= i < num_layers for i in layers)):
        raise HeadroomError(f"layers {list(layers)} must name layers in 0..{num_layers - 1}", settings=("layers",))
    chosen = sorted(set(layers)) if layers is not None else None
    parts = _head_result_key(lm, windows, metric, chosen)

    def compute() -> dict[str, Any]:
        result = HEAD_METRICS[metric](lm.arch, windows, chosen, progress)
        scores, details = (result.scores, result.details()) if isinstance(result, GateAttribution) else (result, {})
        rows = [row.tolist() if chosen is None or i in chosen else None for i, row in enumerate(scores)]
        return HeadScores(metric, rows, details).to_json()

    value = (cache or DiskCache()).json("importance", parts, compute)
    return HeadScores(value["metric"], value["scores"], value["details"])


def _head_result_key(lm: LoadedModel, windows: Windows, metric: str, layers: list[int] | None) -> dict[str, Any]:
    return {**lm.cache_key(), **windows.cache_key(), "metric": metric, "layers": layers, "format": 2}


def stored_head_result(lm: LoadedModel, windows: Windows, metric: str, cache: DiskCache) -> HeadScores | None:
    """Scores of every head by ``metric`` if :func:`cached_head_result` has them on disk; never computes."""
    value = cache.get_json("importance", _head_result_key(lm, windows, metric, None))
    return None if value is None else HeadScores(value["metric"], value["scores"], value["details"])


@dataclass(frozen=True)
class MetricAgreement:
    """Where head metrics agree: pairwise Spearman rank correlation and overlap of their k cheapest heads."""

    metrics: tuple[str, ...]
    spearman: tuple[tuple[float, ...], ...]  # [i][j] over the heads both metrics scored
    top_k_overlap: tuple[tuple[float, ...], ...]  # share of metric i's k lowest-scored heads among metric j's
    k: int

    def to_json(self) -> dict[str, Any]:
        return {
            "metrics": list(self.metrics),
            "spearman": self.spearman,
            "top_k_overlap": self.top_k_overlap,
            "k": self.k,
        }


def metric_agreement(scores: dict[str, torch.Tensor], k: int) -> MetricAgreement:
    """Compare head metrics (``[num_layers, num_heads]``, NaN where a metric was not computed).

    Spearman's rho (scipy) is taken over the heads both metrics scored. The overlap counts, for the
    k lowest-scored heads of each metric (those a pruner would remove first), how many are among the
    k lowest of the other, divided by k.
    """
    from scipy.stats import spearmanr

    names = tuple(scores)
    flat = {name: s.detach().double().flatten().cpu() for name, s in scores.items()}
    lowest = {name: set(torch.argsort(v.nan_to_num(nan=float("inf")))[:k].tolist()) for name, v in flat.items()}
    rho, overlap = [], []
    for a in names:
        rho_row, overlap_row = [], []
        for b in names:
            both = ~(flat[a].isnan() | flat[b].isnan())
            r = spearmanr(flat[a][both].numpy(), flat[b][both].numpy()).statistic if both.sum() > 1 else float("nan")
            rho_row.append(float(r))
            overlap_row.append(len(lowest[a] & lowest[b]) / k)
        rho.append(tuple(rho_row))
        overlap.append(tuple(overlap_row))
    return MetricAgreement(metrics=names, spearman=tuple(rho), top_k_overlap=tuple(overlap), k=k)


# ---- head orders ----------------------------------------------------------------------------------


def lowest_heads(scores: list[list[float | None]], k: int) -> list[tuple[int, int]]:
    """The ``k`` lowest-scored (layer, head) pairs among the scored ones, ties by layer then head."""
    scored = [
        (s, layer, head) for layer, row in enumerate(scores) if row for head, s in enumerate(row) if s is not None
    ]
    return [(layer, head) for _, layer, head in sorted(scored)[:k]]


def cheapest_heads(scores: list[list[float | None]], metric: str, k: int) -> list[tuple[int, int]]:
    """The k heads ``metric``'s scores mark cheapest to remove: its lowest, or for pattern statistics its highest."""
    if metric in DESCRIPTIVE_METRICS:
        scores = [[None if v is None else -v for v in row] if row else row for row in scores]
    return lowest_heads(scores, k)


def ranks(rows: list[list[float | None]]) -> list[list[int | None]]:
    """Rank of every scored head among all scored heads, 1 = lowest (the first a pruner removes)."""
    width = max(len(row) for row in rows if row)
    order = lowest_heads(rows, sum(s is not None for row in rows if row for s in row))
    rank = {cell: i + 1 for i, cell in enumerate(order)}
    return [[rank.get((layer, head)) for head in range(width)] for layer in range(len(rows))]
