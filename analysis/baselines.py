"""Baselines at a matched budget: masks that save as much as a reference mask, chosen by classic scores.

A comparison is only fair at the same cost, so every baseline is matched on one budget axis of
:func:`analysis.budget.budget`: attention parameters removed, KV-cache bytes per token saved, or
attention FLOPs per token saved. Pruning walks from the least important structure upwards and stops
at the first mask that saves at least the target; that mask therefore saves the target or slightly
more, never less.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import replace

import torch

from analysis.activation_metrics import OProjStats, attention_block_influence, o_proj_input_stats
from analysis.architecture import Architecture, ModelShape
from analysis.budget import Budget, budget
from analysis.corpus import Windows
from analysis.errors import HeadroomError
from analysis.importance import HEAD_METRICS, ranking_metrics
from analysis.masks import Mask

log = logging.getLogger(__name__)

AXES = ("params", "kv", "flops")
ALLOCATIONS = ("global", "uniform")
_UNITS = {"params": "attention parameters", "kv": "KV-cache bytes per token", "flops": "attention FLOPs per token"}
# Head metrics the matched baselines prune by: those that rank heads at no more than a backward pass per
# window (the leave-one-out ablation, at minutes per model, belongs to an explicit request).
BASELINE_METRICS = ranking_metrics("backward")
COMPENSATED = "flap_wifv-global-compensated"  # FLAP as published: its adaptive allocation with bias compensation


def flap_compensation(arch: Architecture, mask: Mask, stats: OProjStats) -> Mask:
    """``mask`` with FLAP's bias compensation in every layer where it prunes query heads.

    Source: An et al., FLAP (AAAI 2024), code CASIA-IVA-Lab/FLAP ``lib/prune.py`` (``compress``): the
    pruned o_proj input channels P of a layer contribute ``W_o[:, P] @ mean(X_P)`` on average over the
    calibration tokens; adding that as an o_proj bias (mask v2 ``bias``) keeps the layer's mean output
    on calibration data what it was unpruned. ``stats`` are o_proj input statistics of the unpruned
    model, as FLAP measures them. Drop-QK layers and removed branches (alpha = 0) get no bias: their
    o_proj input is not the one measured, or there is no branch left. A layer without pruned heads
    keeps whatever bias the mask had.
    """
    shape = arch.shape
    for layer, row in enumerate(mask.heads):
        if all(row) or layer in mask.drop_qk or mask.alpha[layer] == 0.0:
            continue
        pruned = torch.tensor([not keep for keep in row]).repeat_interleave(shape.head_dim)
        weight = arch.output_projection(layer).weight.detach().to("cpu", torch.float64)
        mask = mask.with_bias(layer, (weight @ (stats.mean[layer] * pruned)).tolist())
    return mask


def saved(b: Budget, axis: str) -> int:
    """What ``b`` saves on ``axis``: parameters removed, KV bytes per token or attention FLOPs per token."""
    if axis == "params":
        return b.params_removed
    if axis == "kv":
        return b.kv_bytes_per_token_saved
    if axis == "flops":
        return b.attention_flops_per_token_saved
    raise HeadroomError(f"unknown budget axis '{axis}'; use one of {', '.join(AXES)}")


def _first_reaching(
    masks: Iterator[Mask], shape: ModelShape, target: int, axis: str, seqlen: int, how: str, limit: str
) -> Mask:
    """The first of ``masks`` (each pruning more than the one before) that saves ``target`` on ``axis``."""
    most = 0
    for mask in masks:
        most = saved(budget(mask, shape, seqlen), axis)
        if most >= target:
            return mask
    raise HeadroomError(
        f"{how} cannot save {target:,} {_UNITS[axis]} (sequence length {seqlen}): the most it can save is "
        f"{most:,}, {limit}. Choose a smaller budget or another axis"
    )


def _ranked(values: list[float], what: str) -> list[int]:
    """Indices from the lowest value up, ties by index; refuses NaN or infinite values."""
    if not all(math.isfinite(v) for v in values):
        raise HeadroomError(f"{what} are not all finite numbers, so they cannot be ranked")
    return sorted(range(len(values)), key=lambda i: (values[i], i))


def prune_heads(
    scores: torch.Tensor,
    shape: ModelShape,
    model_name: str,
    target: int,
    axis: str,
    seqlen: int,
    allocation: str = "global",
    finish: Callable[[Mask], Mask] | None = None,
) -> Mask:
    """Prune the lowest-scored query heads until the mask saves at least ``target`` on ``axis``.

    ``global`` walks all heads of the model in ascending score order (ties by layer, then head) and
    stops at the first prefix that reaches the target. ``uniform`` prunes the k lowest-scored heads of
    every layer, for the smallest k that reaches it. Neither ever prunes every head of the model.

    On the ``kv`` axis a head saves KV cache only once every query head of its KV group is pruned
    (grouped-query attention is counted exactly by ``budget.budget``), so the walk goes on past heads
    that save nothing by themselves until whole groups are gone; the result is the cheapest prefix
    that reaches the target, which is what a matched budget means.

    ``finish`` completes each candidate before its budget is counted (FLAP's compensation adds an
    o_proj bias, which costs parameters where the family has none).
    """
    if tuple(scores.shape) != (shape.num_layers, shape.num_heads):
        raise ValueError(f"scores are {tuple(scores.shape)}, the model is {shape.num_layers} x {shape.num_heads}")
    rows = scores.tolist()
    if allocation == "global":
        flat = [s for row in rows for s in row]
        order = [divmod(i, shape.num_heads) for i in _ranked(flat, "head scores")]

        def walk() -> Iterator[Mask]:
            mask = Mask.unpruned(shape, model_name)
            yield mask
            for layer, head in order[:-1]:
                mask = mask.with_head(layer, head, False)
                yield mask

        limit = "with every head pruned but the highest-scored one"
    elif allocation == "uniform":
        ranked = [_ranked(row, "head scores") for row in rows]

        def walk() -> Iterator[Mask]:
            mask = Mask.unpruned(shape, model_name)
            yield mask
            for k in range(shape.num_heads - 1):
                for layer, heads in enumerate(ranked):
                    mask = mask.with_head(layer, heads[k], False)
                yield mask

        limit = f"with {shape.num_heads - 1} of {shape.num_heads} heads pruned in every layer"
    else:
        raise HeadroomError(f"unknown allocation '{allocation}'; use one of {', '.join(ALLOCATIONS)}")
    masks = walk() if finish is None else map(finish, walk())
    return _first_reaching(masks, shape, target, axis, seqlen, f"{allocation} head pruning", limit)


def remove_attention_layers(
    influence: torch.Tensor, shape: ModelShape, model_name: str, target: int, axis: str, seqlen: int
) -> Mask:
    """Remove attention branches (alpha = 0) in ascending ``influence`` order until ``target`` is saved.

    Ties go to the lower layer. At least one layer keeps its attention.
    """
    if tuple(influence.shape) != (shape.num_layers,):
        raise ValueError(f"influence is {tuple(influence.shape)}, the model has {shape.num_layers} layers")
    order = _ranked(influence.tolist(), "layer influences")

    def walk() -> Iterator[Mask]:
        mask = Mask.unpruned(shape, model_name)
        yield mask
        for layer in order[:-1]:
            mask = mask.with_layer(layer, alpha=0.0)
            yield mask

    limit = f"with the attention of {shape.num_layers - 1} of {shape.num_layers} layers removed"
    return _first_reaching(walk(), shape, target, axis, seqlen, "attention layer removal", limit)


def matched_baselines(
    arch: Architecture,
    model_name: str,
    calib: Windows,
    reference: Mask,
    axis: str,
    seqlen: int,
    stats: OProjStats | None = None,
    measured: dict[str, torch.Tensor] | None = None,
) -> dict[str, Mask]:
    """Every baseline, matched to what ``reference`` saves on ``axis`` at ``seqlen``.

    Head pruning by each metric of :data:`BASELINE_METRICS` with global and uniform allocation
    (``"gradient-global"``, ..., ``"flap_wifv-uniform"``; a metric that only rescales another per layer,
    such as ``gradient_normalized``, gets global allocation only, its uniform one being the other's),
    FLAP with its bias compensation (``"flap_wifv-global-compensated"``, matched with the bias counted),
    and attention-layer removal by attention Block Influence (``"block_influence-attention"``); all
    scores come from ``calib`` on the unpruned model (``stats`` reuses o_proj input statistics already
    measured on it, ``measured`` head scores by metric already measured on it, e.g. read from the
    importance cache). A baseline that cannot reach the target without pruning every head (or every
    layer's attention) is left out with a warning, since large KV savings are often out of reach of
    head pruning.

    ``"drop_qk-alpha1"`` and ``"drop_qk-alpha0"`` are reference points rather than matched
    baselines: the top ``len(reference.drop_qk)`` layers in drop-QK mode without rescaling and with
    their attention removed. They are left out when the reference has no drop-QK layer.
    """
    shape = arch.shape
    target = saved(budget(reference, shape, seqlen), axis)
    if stats is None:
        stats = o_proj_input_stats(arch, calib)
    matched_note = f"matched on {axis}: saves at least {target:,} {_UNITS[axis]} at sequence length {seqlen}"
    found: dict[str, Mask] = {}

    def add(name: str, make: Callable[[], Mask], what: str) -> None:
        try:
            found[name] = replace(make(), note=f"{what}, {matched_note}")
        except HeadroomError as e:
            log.warning("baseline %s left out: %s", name, e)

    known: dict[str, torch.Tensor] = dict(measured or {})
    for metric in BASELINE_METRICS:
        if metric not in known:
            known[metric] = HEAD_METRICS[metric].scores(arch, calib, stats, known)
        scores = known[metric]
        allocations = ("global",) if HEAD_METRICS[metric].rescales else ALLOCATIONS
        for allocation in allocations:
            name = f"{metric}-{allocation}"
            add(
                name,
                lambda s=scores, a=allocation: prune_heads(s, shape, model_name, target, axis, seqlen, a),
                f"{name} head pruning",
            )
        if metric == "flap_wifv":
            add(
                COMPENSATED,
                lambda s=scores: prune_heads(
                    s, shape, model_name, target, axis, seqlen, "global", lambda m: flap_compensation(arch, m, stats)
                ),
                "FLAP: flap_wifv-global head pruning with bias compensation",
            )
    add(
        "block_influence-attention",
        lambda: remove_attention_layers(
            attention_block_influence(arch, calib), shape, model_name, target, axis, seqlen
        ),
        "attention removed in the lowest-Block-Influence layers",
    )
    n = len(reference.drop_qk)
    if n:
        for alpha in (1, 0):
            note = f"top {n} layers drop-QK with alpha {alpha} (a reference point, not matched)"
            found[f"drop_qk-alpha{alpha}"] = replace(Mask.drop_qk_top(shape, model_name, n, alpha), note=note)
    return {name: replace(mask, fingerprint=reference.fingerprint) for name, mask in found.items()}
