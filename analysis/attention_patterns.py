"""What attention heads look at: one head's pattern on a window, and per-head pattern statistics.

The shared model keeps its attention implementation (sdpa returns no weights, and switching the
implementation would change every session's numbers); weights are recomputed from each attention
module's input by ``Architecture.attention_probabilities`` inside a forward pre-hook.

Statistics are over every query position except the first of each window (its distribution is
always all on itself) and over all windows, for the unpruned model. With ``p_ij`` the weight that
query i gives key j <= i:

- ``entropy``  = mean_i  -sum_j p_ij log p_ij          (nats; 0 = one key, log(i + 1) = uniform)
- ``distance`` = mean_i  sum_j p_ij (i - j)             (tokens back)
- ``sink``     = mean_i  p_i0                           (share on the window's first token)
- ``previous`` = mean_i  p_i,i-1                        (share on the previous token)

Heads that put most of their weight on the first token ("attention sinks", Xiao et al., 2023) often
write little to the residual stream; previous-token heads are the first half of induction circuits
(Olsson et al., 2022).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from analysis.architecture import Architecture
from analysis.cache import DiskCache
from analysis.corpus import Windows
from analysis.errors import HeadroomError
from analysis.evaluation import Progress, batches
from analysis.hooks import PreHook, hidden_arg, observe
from analysis.loading import LoadedModel

STATISTICS = ("entropy", "distance", "sink", "previous")


def _observing(arch: Architecture, layers: Sequence[int], seen: Callable[[int, torch.Tensor], None]) -> list:
    """Pre-hooks that hand each listed layer's attention weights to ``seen(layer, weights)``."""

    def hook(layer: int) -> PreHook:
        def watch(module: nn.Module, args: tuple, kwargs: dict) -> None:
            seen(layer, arch.attention_probabilities(layer, hidden_arg(args, kwargs), kwargs["position_embeddings"]))

        return watch

    return [(arch.attention(layer), hook(layer)) for layer in layers]


def attention_pattern(arch: Architecture, input_ids: torch.Tensor, layer: int, head: int) -> torch.Tensor:
    """Attention weights ``[seq, seq]`` (query x key, float32) of query head ``(layer, head)`` on one window."""
    shape = arch.shape
    if not (0 <= layer < shape.num_layers and 0 <= head < shape.num_heads):
        raise HeadroomError(
            f"head ({layer}, {head}) does not exist; the model has layers 0..{shape.num_layers - 1} "
            f"and heads 0..{shape.num_heads - 1}"
        )
    ids = input_ids.reshape(1, -1)
    found: list[torch.Tensor] = []
    with torch.no_grad(), observe(pre=_observing(arch, [layer], lambda _, w: found.append(w[0, head].cpu()))):
        arch.final_hidden(ids)
    return found[0]


@dataclass(frozen=True, eq=False)  # tensors have no single truth value, so no field-wise ==
class AttentionStats:
    """Per-head pattern statistics, float64 ``[num_layers, num_heads]`` each (see the module docstring)."""

    entropy: torch.Tensor
    distance: torch.Tensor
    sink: torch.Tensor
    previous: torch.Tensor

    def to_json(self) -> dict[str, Any]:
        return {name: getattr(self, name).tolist() for name in STATISTICS}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> AttentionStats:
        return cls(**{name: torch.tensor(obj[name], dtype=torch.float64) for name in STATISTICS})


def attention_stats(arch: Architecture, windows: Windows, progress: Progress | None = None) -> AttentionStats:
    """Every head's entropy, distance, sink and previous-token share over ``windows`` (one forward pass)."""
    shape = arch.shape
    sums = torch.zeros(len(STATISTICS), shape.num_layers, shape.num_heads, dtype=torch.float64)
    t = windows.input_ids.shape[1]
    back = torch.arange(t)[:, None] - torch.arange(t)[None, :]  # i - j

    def accumulate(layer: int, weights: torch.Tensor) -> None:
        p = weights[:, :, 1:].double()  # [batch, heads, query >= 1, key]
        entropy = -(p * p.clamp_min(torch.finfo(torch.float64).tiny).log()).sum(-1)
        distance = (p * back[1:].to(p.device, p.dtype)).sum(-1)
        previous = p.diagonal(dim1=-2, dim2=-1)  # row q is query q + 1; its key q is the previous token
        for i, stat in enumerate((entropy, distance, p[..., 0], previous)):
            sums[i, layer] += stat.sum(dim=(0, 2)).cpu()

    all_batches = batches(windows)
    with torch.no_grad(), observe(pre=_observing(arch, range(shape.num_layers), accumulate)):
        for i, ids in enumerate(all_batches):
            arch.final_hidden(ids)
            if progress:
                progress(i + 1, len(all_batches))
    queries = windows.num_windows * (t - 1)
    return AttentionStats(*(sums / queries))


def cached_attention_stats(
    lm: LoadedModel, windows: Windows, cache: DiskCache | None = None, progress: Progress | None = None
) -> AttentionStats:
    """``attention_stats`` through the disk cache."""
    parts = {**lm.cache_key(), **windows.cache_key()}
    value = (cache or DiskCache()).json(
        "attention_stats", parts, lambda: attention_stats(lm.arch, windows, progress).to_json()
    )
    return AttentionStats.from_json(value)
