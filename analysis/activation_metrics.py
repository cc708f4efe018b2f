"""Head and layer scores read from one unpruned forward pass (and magnitude, from o_proj's weights alone).

Measured on calibration windows with the model as loaded (no mask): call these functions outside
``apply_mask``. Hooks are installed for the duration of one pass only and only read activations.
Head scores are float64 tensors ``[num_layers, num_heads]``, layer scores ``[num_layers]``; a *low*
score means "cheap to remove". The registry that names them is :mod:`analysis.importance`.

X below is the input of ``o_proj``: the concatenated outputs of the query heads, ``num_heads *
head_dim`` channels, head h owning channels ``h * head_dim ... (h + 1) * head_dim - 1``. Its
statistics are over every token of every window (each window position counts as one token).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from analysis.architecture import Architecture
from analysis.corpus import Windows
from analysis.evaluation import batches
from analysis.hooks import PostHook, PreHook, hidden_arg, hidden_of, observe


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
