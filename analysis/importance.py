"""Importance scores of attention heads and layers, the inputs of the baselines at a matched budget.

Every score is measured on calibration windows with the model as loaded (no mask): call these
functions outside ``apply_mask``. Hooks are installed for the duration of one pass only and no
weight is written; the activation scores only read activations, the gradient metrics multiply
each head by a gate (1 for the gradient, 0 to 1 along the integration path), the ablation metric
prunes one head at a time through the incremental evaluator, and the pattern statistics
(``analysis.attention_patterns``) recompute attention weights from q/k.
Head scores are float64 tensors ``[num_layers, num_heads]``, layer scores ``[num_layers]``; for all
of them but ``DESCRIPTIVE_METRICS`` a *low* score means "cheap to remove".

X below is the input of ``o_proj``: the concatenated outputs of the query heads, ``num_heads *
head_dim`` channels, head h owning channels ``h * head_dim ... (h + 1) * head_dim - 1``. Its
statistics are over every token of every window (each window position counts as one token).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from analysis.architecture import Architecture
from analysis.attention_patterns import attention_stats
from analysis.cache import DiskCache
from analysis.corpus import Windows
from analysis.errors import HeadroomError
from analysis.evaluation import IncrementalEvaluator, Progress, batches
from analysis.hooks import PostHook, PreHook, hidden_arg, hidden_of, observe
from analysis.loading import LoadedModel
from analysis.masks import Mask


@dataclass(frozen=True, eq=False)  # tensors have no single truth value, so no field-wise ==
class OProjStats:
    """Per layer and o_proj input channel, over all calibration tokens; float64 ``[num_layers, channels]``."""

    sum_sq: torch.Tensor  # sum over tokens of X_j^2, i.e. ||X_j||_2^2
    mean: torch.Tensor
    var: torch.Tensor  # population variance over tokens
    tokens: int

    @property
    def norm(self) -> torch.Tensor:
        """||X_j||_2 over all tokens."""
        return self.sum_sq.sqrt()


def _run_hooked(
    arch: Architecture,
    windows: Windows,
    pre: Sequence[tuple[nn.Module, PreHook]] = (),
    post: Sequence[tuple[nn.Module, PostHook]] = (),
) -> None:
    """One unpruned forward pass over ``windows`` with the given observing hooks installed."""
    with torch.no_grad(), observe(pre, post):
        for ids in batches(windows):
            arch.final_hidden(ids)


def o_proj_input_stats(arch: Architecture, windows: Windows) -> OProjStats:
    """Squared norm, mean and variance of every o_proj input channel over all calibration tokens.

    Sums of X_j and X_j^2 are accumulated in float64; the variance is ``E[X^2] - E[X]^2``, whose
    cancellation error in float64 is far below anything the scores can resolve.
    """
    shape = arch.shape
    channels = shape.num_heads * shape.head_dim
    sums = torch.zeros(shape.num_layers, channels, dtype=torch.float64)
    sum_sq = torch.zeros(shape.num_layers, channels, dtype=torch.float64)

    def record(layer: int) -> PreHook:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0].detach().flatten(0, -2).double()  # o_proj is called positionally
            sums[layer] += x.sum(dim=0).cpu()
            sum_sq[layer] += x.square().sum(dim=0).cpu()

        return hook

    _run_hooked(arch, windows, pre=arch.head_output_hooks(record))
    tokens = windows.input_ids.numel()
    mean = sums / tokens
    var = (sum_sq / tokens - mean.square()).clamp(min=0.0)
    return OProjStats(sum_sq=sum_sq, mean=mean, var=var, tokens=tokens)


def output_norm(arch: Architecture, windows: Windows) -> torch.Tensor:
    """Mean over tokens of ``||W_o[:, columns of head] x_head||_2``: how much each head writes to the residual.

    The head's own term of the o_proj output (before any post-attention norm); a head can have a
    large o_proj input yet write little if its value/output weights are small, so this is measured,
    not estimated from weights or inputs alone.
    """
    shape = arch.shape
    sums = torch.zeros(shape.num_layers, shape.num_heads, dtype=torch.float64)

    def record(layer: int) -> PreHook:
        o_heads = arch.output_projection(layer).weight.detach().view(-1, shape.num_heads, shape.head_dim)

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0].detach().flatten(0, -2).view(-1, shape.num_heads, shape.head_dim)
            written = torch.einsum("thd,ohd->tho", x, o_heads)
            sums[layer] += torch.linalg.vector_norm(written, dim=-1, dtype=torch.float64).sum(dim=0).cpu()

        return hook

    _run_hooked(arch, windows, pre=arch.head_output_hooks(record))
    return sums / windows.input_ids.numel()


def _per_head(arch: Architecture, channel_scores: torch.Tensor) -> torch.Tensor:
    """Sum ``[num_layers, num_heads * head_dim]`` channel scores over each head's channels."""
    shape = arch.shape
    return channel_scores.view(shape.num_layers, shape.num_heads, shape.head_dim).sum(dim=-1)


def wanda_sp(arch: Architecture, stats: OProjStats) -> torch.Tensor:
    """Wanda-sp head scores: ``sum_{j in head} mean_i |W_o[i, j]| * ||X_j||_2``.

    W_o is o_proj's weight ``[hidden, num_heads * head_dim]`` (i runs over its output rows), X_j the
    o_proj input channel j over all calibration tokens. This is the structured Wanda variant of An et
    al., "Fluctuation-based Adaptive Structured Pruning for Large Language Models" (FLAP, AAAI 2024),
    where it is the main baseline: Wanda's ``|W| * ||X||`` scored per input column of o_proj and
    summed per head. (FLAP's code normalises ``||X_j||^2`` by the number of calibration samples,
    a constant that changes no ranking.)
    """
    rows = []
    for layer in range(arch.shape.num_layers):
        weight = arch.output_projection(layer).weight.detach()
        rows.append(weight.abs().mean(dim=0, dtype=torch.float64).cpu())
    return _per_head(arch, torch.stack(rows) * stats.norm)


def magnitude(arch: Architecture) -> torch.Tensor:
    """Magnitude-sp head scores: ``sum_{j in head} ||W_o[:, j]||_2``, no data.

    Source: the magnitude-sp baseline of An et al., "Fluctuation-based Adaptive Structured Pruning
    for Large Language Models" (FLAP, AAAI 2024), as FLAP's code (``prune_magnitude_sp`` in
    CASIA-IVA-Lab/FLAP ``lib/prune.py``) and HARP's reference code score a head: the l2 norm of each
    o_proj input column, summed over the head's ``head_dim`` columns. W_o is o_proj's weight
    ``[hidden, num_heads * head_dim]``.
    """
    rows = [
        torch.linalg.vector_norm(arch.output_projection(layer).weight.detach(), dim=0, dtype=torch.float64).cpu()
        for layer in range(arch.shape.num_layers)
    ]
    return _per_head(arch, torch.stack(rows))


def flap_wifv(arch: Architecture, stats: OProjStats) -> torch.Tensor:
    """FLAP's head scores (WIFV metric, adaptive structure "AL-MM"), as FLAP's code computes them.

    Source: An et al., "Fluctuation-based Adaptive Structured Pruning for Large Language Models"
    (FLAP, AAAI 2024), code CASIA-IVA-Lab/FLAP ``lib/prune.py`` (``prune_flap``). Per o_proj input
    channel j the fluctuation metric ``s_j = (var(X_j) * sum_i W_o[i, j]^2)^2`` (the code squares the
    whole weighted variance); per layer the channel scores are standardised over that layer's channels,
    ``(s - mean) / std`` (``std`` the sample standard deviation, as ``torch.std``; a layer whose
    channels all score the same gets 0); a head's score is the mean of its ``head_dim`` standardised
    channel scores, so that one global threshold compares heads of all layers. FLAP's variance is a
    running estimate over calibration samples; here it is the population variance over all
    calibration tokens, which differs from it by a factor common to a layer's channels, cancelled by
    the standardisation. FLAP's bias compensation is :func:`analysis.baselines.flap_compensation`.
    """
    rows = []
    for layer in range(arch.shape.num_layers):
        weight = arch.output_projection(layer).weight.detach()
        rows.append(weight.double().square().sum(dim=0).cpu())
    channels = (stats.var * torch.stack(rows)).square()
    std = channels.std(dim=1, keepdim=True)
    std = torch.where(std > 0, std, torch.ones_like(std))
    standardised = (channels - channels.mean(dim=1, keepdim=True)) / std
    shape = arch.shape
    return standardised.view(shape.num_layers, shape.num_heads, shape.head_dim).mean(dim=-1)


def _mean_cosine(arch: Architecture, windows: Windows, outputs: Sequence[nn.Module], branch: bool) -> torch.Tensor:
    """Per layer, mean over tokens of cos(layer input h, y) where y is the output of ``outputs[layer]``.

    With ``branch`` the output is what is added to the residual stream and y = h + output. A token
    whose h or y is the zero vector (Gemma embeds its padding token to zero) counts as cos = 0.
    """
    cos_sum = torch.zeros(len(outputs), dtype=torch.float64)
    inputs: dict[int, torch.Tensor] = {}

    def keep_input(layer: int) -> PreHook:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            inputs[layer] = hidden_arg(args, kwargs).detach()

        return hook

    def compare(layer: int) -> PostHook:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            h = inputs.pop(layer).double()
            y = hidden_of(output).detach().double()
            cos_sum[layer] += F.cosine_similarity(h, h + y if branch else y, dim=-1).sum().cpu()

        return hook

    layers = range(len(outputs))
    _run_hooked(
        arch,
        windows,
        pre=[(arch.layers[i], keep_input(i)) for i in layers],
        post=[(outputs[i], compare(i)) for i in layers],
    )
    return cos_sum / windows.input_ids.numel()


def attention_block_influence(arch: Architecture, windows: Windows) -> torch.Tensor:
    """ShortGPT's Block Influence of each layer's attention branch: ``1 - mean_t cos(h_t, h_t + a_t)``.

    h is the residual stream entering the layer and a what the attention branch adds to it (after
    Gemma's post-attention norm, ``Architecture.branch_output``), so h + a is the residual right
    after attention. Block Influence is from Men et al., "ShortGPT: Layers in Large Language Models
    are More Redundant Than You Expect" (2024), there for whole blocks; applied to the attention
    branch it ranks layers for attention removal. In [0, 2]; low means the branch barely turns the
    residual stream.
    """
    outputs = [arch.branch_output(layer) for layer in range(arch.shape.num_layers)]
    return 1.0 - _mean_cosine(arch, windows, outputs, branch=True)


def block_influence(arch: Architecture, windows: Windows) -> torch.Tensor:
    """ShortGPT's Block Influence of whole decoder layers: ``1 - mean_t cos(layer input, layer output)``.

    Men et al., "ShortGPT" (2024). In [0, 2]; low means the layer barely changes the residual stream.
    """
    return 1.0 - _mean_cosine(arch, windows, list(arch.layers), branch=False)


def ablation(
    arch: Architecture, windows: Windows, layers: Sequence[int] | None = None, progress: Progress | None = None
) -> torch.Tensor:
    """Leave-one-out: increase in mean NLL when only query head (l, h) is pruned.

    ``score[l, h] = NLL(mask with head (l, h) pruned) - NLL(unpruned)``, mean next-token NLL over the
    windows' predicted tokens (Michel et al., "Are Sixteen Heads Really Better than One?", 2019,
    ablation study). Uses the incremental evaluator, so a head in layer l costs only layers l..L-1
    and the head. ``layers`` restricts the work to those layers; other rows are NaN.
    """
    shape = arch.shape
    chosen = sorted(set(layers)) if layers is not None else list(range(shape.num_layers))
    evaluator = IncrementalEvaluator(arch, windows)
    base = Mask.unpruned(shape, "")
    reference = evaluator.perplexity(base).mean_nll
    scores = torch.full((shape.num_layers, shape.num_heads), float("nan"), dtype=torch.float64)
    total = len(chosen) * shape.num_heads
    for i, (layer, head) in enumerate((layer, head) for layer in reversed(chosen) for head in range(shape.num_heads)):
        scores[layer, head] = evaluator.perplexity(base.with_head(layer, head, False)).mean_nll - reference
        if progress:
            progress(i + 1, total)
    return scores


def _gate_hooks(arch: Architecture, gates: Callable[[], torch.Tensor]) -> list[tuple[nn.Module, PreHook]]:
    """Pre-hooks multiplying each query head's slice of the o_proj input by ``gates()[layer, head]``."""
    head_dim = arch.shape.head_dim

    def gate(layer: int) -> PreHook:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple:
            x = args[0]
            g = gates()[layer].to(dtype=x.dtype, device=x.device).repeat_interleave(head_dim)
            return (x * g, *args[1:]), kwargs

        return hook

    return arch.head_output_hooks(gate)


def _loss(arch: Architecture, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL over the predicted tokens of ``ids``, differentiable, in at least float32."""
    logits = arch.logits(arch.final_hidden(ids)[:, :-1])
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].to(logits.device).flatten())


def gradient(arch: Architecture, windows: Windows, progress: Progress | None = None) -> torch.Tensor:
    """Head-gate gradient: ``score[l, h] = mean over windows of |dL_w / dg_(l,h)|`` at g = 1.

    A gate g multiplies each query head's output in front of o_proj; L_w is the mean next-token NLL
    of window w (Michel et al., 2019, eq. 2: the expected absolute sensitivity of the loss to
    masking the head, a first-order estimate of the ablation score). One forward and backward pass
    per window; the weights get no gradient.
    """
    shape = arch.shape
    gates = torch.ones(shape.num_layers, shape.num_heads, dtype=torch.float32, requires_grad=True)
    scores = torch.zeros(shape.num_layers, shape.num_heads, dtype=torch.float64)
    ids_all = windows.input_ids
    with torch.enable_grad(), observe(pre=_gate_hooks(arch, lambda: gates)):
        for w in range(ids_all.shape[0]):
            (grad,) = torch.autograd.grad(_loss(arch, ids_all[w : w + 1]), gates)
            scores += grad.abs().double()
            if progress:
                progress(w + 1, ids_all.shape[0])
    return scores / ids_all.shape[0]


def gradient_normalized(arch: Architecture, windows: Windows, progress: Progress | None = None) -> torch.Tensor:
    """Head-gate gradient (:func:`gradient`) divided by its l2 norm over each layer's heads.

    Source: Michel et al., "Are Sixteen Heads Really Better than One?" (NeurIPS 2019); their code
    (pmichel31415/are-16-heads-really-better-than-1) normalises the importance scores of every layer
    by their l2 norm by default before ranking heads across layers, which is what global allocation
    needs: raw gradients of different layers differ in scale. A layer whose heads all score 0 stays 0.
    """
    return per_layer_l2(gradient(arch, windows, progress))


def per_layer_l2(scores: torch.Tensor) -> torch.Tensor:
    """``[num_layers, num_heads]`` scores divided by each layer's l2 norm (a layer of zeros stays zeros)."""
    norm = torch.linalg.vector_norm(scores, dim=1, keepdim=True)
    return scores / torch.where(norm > 0, norm, torch.ones_like(norm))


IG_STEPS = 8  # Gauss-Legendre points from gates 0 to 1: accurate where the loss is smooth along the path


@dataclass(frozen=True, eq=False)
class GateAttribution:
    """Integrated gradients of the loss over the per-head gates, with its completeness check.

    ``scores[l, h] = -IG_(l,h)``: the part of the loss increase from removing every head (gates 1 -> 0)
    that the path integral attributes to head (l, h). Completeness (Sundararajan et al., 2017,
    axiom 1) says the scores sum to ``loss_no_heads - loss_all_heads``; ``completeness_error`` is how
    far the numerical integral is from that. It is worth showing: on a trained model the path passes
    through models far from anything seen in training, where the loss can be rough (SmolLM2-135M,
    one window: the loss moves by ~0.1 nats between gate scales 0.049 and 0.052 while it is smooth
    above ~0.7), and there no quadrature of a few points integrates it well.
    """

    scores: torch.Tensor
    loss_all_heads: float
    loss_no_heads: float
    steps: int

    @property
    def completeness_error(self) -> float:
        return float(self.scores.sum()) - (self.loss_no_heads - self.loss_all_heads)

    def details(self) -> dict[str, float]:
        return {
            "loss_all_heads": self.loss_all_heads,
            "loss_no_heads": self.loss_no_heads,
            "attribution_sum": float(self.scores.sum()),
            "completeness_error": self.completeness_error,
            "steps": self.steps,
        }


def integrated_gradients(
    arch: Architecture, windows: Windows, progress: Progress | None = None, steps: int = IG_STEPS
) -> GateAttribution:
    """Captum's integrated gradients of the mean NLL w.r.t. all head gates, from gates 0 to gates 1.

    IG is linear in the function, so the attribution of the mean loss is the mean of the per-window
    attributions: captum runs one window at a time (one step per backward pass), which bounds memory
    by one window's autograd graph. Cost per window: ``steps`` forward and backward passes, and two
    forward passes for the end points of the completeness check.

    Refused for families with a post-attention norm (Gemma): that norm is scale-invariant, so when
    all gates of a layer shrink together the loss does not change until they are within ~sqrt(eps)
    of 0, and the path integral is a spike no quadrature resolves.
    """
    from captum.attr import IntegratedGradients

    if arch.has_post_attention_norm:
        raise HeadroomError(
            f"integrated_gradients is not defined usefully for {arch.family}: its post-attention norm undoes "
            "the gates' scale, so the path integral is a spike at 0; use the gradient or ablation metric"
        )
    shape = arch.shape
    gates = torch.ones(1, shape.num_layers * shape.num_heads)
    current: list[torch.Tensor] = []
    ids_all = windows.input_ids
    total = torch.zeros(shape.num_layers * shape.num_heads, dtype=torch.float64)
    end_losses = torch.zeros(2, dtype=torch.float64)
    with torch.enable_grad(), observe(pre=_gate_hooks(arch, lambda: current[0].view(shape.num_layers, -1))):
        for w in range(ids_all.shape[0]):
            ids = ids_all[w : w + 1]

            def loss_at(g: torch.Tensor, ids: torch.Tensor = ids) -> torch.Tensor:
                current[:] = [g[0]]
                return _loss(arch, ids).reshape(1)

            attribution = IntegratedGradients(loss_at).attribute(
                gates,
                baselines=torch.zeros_like(gates),
                n_steps=steps,
                method="gausslegendre",
                internal_batch_size=1,
            )
            total += attribution[0].double()
            with torch.no_grad():
                end_losses += torch.tensor([loss_at(gates).item(), loss_at(torch.zeros_like(gates)).item()])
            if progress:
                progress(w + 1, ids_all.shape[0])
    n = ids_all.shape[0]
    loss_all, loss_none = (end_losses / n).tolist()
    return GateAttribution(-(total / n).view(shape.num_layers, -1), loss_all, loss_none, steps)


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
