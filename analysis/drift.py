"""Representation-norm drift: how far a mask moves the residual stream away from the unpruned model.

The paper's case for rescaling (method.md) is about magnitude: removing attention in a layer changes
the norm of the residual stream that layer writes, and every layer above reads that stream. This
module measures it for any mask. For each layer l, ``h_l`` is the residual stream at the layer's
output (the input of layer l + 1; for the last layer, before the final norm) of the unpruned model
and ``h'_l`` the same under the mask, at every token (every position of every window, BOS included
where there is one). Reported per layer:

* ``||h_l||_2`` and ``||h'_l||_2``: mean and 10 / 50 / 90 % quantiles over tokens (``torch.quantile``,
  linear interpolation, float64);
* ``cos(h_l, h'_l) = <h_l, h'_l> / (||h_l||_2 ||h'_l||_2)``, mean over tokens: 1 at every layer
  below the lowest one the mask changes;

and once per mask ``KL(p || q) = sum_v p_v (log p_v - log q_v)``, p the unpruned and q the masked
next-token distribution at a token, mean over tokens, in nats.

Both passes run the model's own forward; layer outputs are read by observing hooks, and the mask
reaches the model only inside ``apply_mask``. Per batch of windows the unpruned layer outputs are kept
(``layers * tokens * hidden`` elements) and every masked layer output is compared with them as it is
produced, so the masked ones are never stored.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from analysis.architecture import Architecture
from analysis.cache import DiskCache
from analysis.corpus import Windows
from analysis.errors import HeadroomError
from analysis.evaluation import Progress, batches
from analysis.hooks import hidden_of, observe
from analysis.intervention import apply_mask
from analysis.loading import LoadedModel
from analysis.masks import Mask

KL_LOGITS_PER_CHUNK = 1 << 24  # logits per side turned into float64 log-probabilities at once (128 MiB)
QUANTILES = (0.1, 0.5, 0.9)
_TINY = torch.finfo(torch.float64).tiny  # guards the cosine of an all-zero vector (then 0)


@dataclass(frozen=True)
class NormStats:
    """The L2 norm of the residual stream over tokens: mean and 10 / 50 / 90 % quantiles."""

    l2_mean: float
    l2_q10: float
    l2_q50: float
    l2_q90: float

    @classmethod
    def of(cls, norms: torch.Tensor) -> NormStats:
        """Statistics of a float64 vector of per-token norms."""
        q = torch.quantile(norms, torch.tensor(QUANTILES, dtype=torch.float64))
        return cls(norms.mean().item(), *q.tolist())


@dataclass(frozen=True)
class LayerDrift:
    """One layer's output under the unpruned model and under the mask."""

    layer: int
    unpruned: NormStats
    masked: NormStats
    cosine_mean: float  # mean over tokens of cos(unpruned, masked)

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> LayerDrift:
        return cls(
            layer=obj["layer"],
            unpruned=NormStats(**obj["unpruned"]),
            masked=NormStats(**obj["masked"]),
            cosine_mean=obj["cosine_mean"],
        )


@dataclass(frozen=True)
class DriftReport:
    """Residual-stream drift of a mask at every layer, and the KL of its next-token distribution."""

    layers: tuple[LayerDrift, ...]
    kl_nats_per_token: float  # KL(unpruned || masked), mean over tokens
    tokens: int
    seqlen: int
    text: str
    text_sha256: str
    mask: Any  # Mask.summary()

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "layers": [asdict(layer) for layer in self.layers]}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> DriftReport:
        return cls(**{**obj, "layers": tuple(LayerDrift.from_json(layer) for layer in obj["layers"])})


@dataclass(frozen=True, eq=False)  # tensors have no single truth value, so no field-wise ==
class PositionDrift:
    """Drift of one window, per layer and token position; float64 tensors ``[num_layers, seqlen]``."""

    window: int
    input_ids: tuple[int, ...]
    unpruned_l2: torch.Tensor
    masked_l2: torch.Tensor
    cosine: torch.Tensor
    mask: Any  # Mask.summary()

    def to_json(self) -> dict[str, Any]:
        return {
            "window": self.window,
            "input_ids": list(self.input_ids),
            "unpruned_l2": self.unpruned_l2.tolist(),
            "masked_l2": self.masked_l2.tolist(),
            "cosine": self.cosine.tolist(),
            "mask": self.mask,
        }


def _forward(arch: Architecture, ids: torch.Tensor, on_output: Callable[[int, torch.Tensor], None]) -> torch.Tensor:
    """Forward ``ids``; ``on_output(l, h)`` sees layer l's output. Returns the final-normed hidden state."""

    def hook(layer: int) -> Callable[[nn.Module, tuple, Any], None]:
        return lambda module, args, output: on_output(layer, hidden_of(output))

    with observe(post=[(block, hook(i)) for i, block in enumerate(arch.layers)]):
        return arch.final_hidden(ids)


def _unpruned_pass(arch: Architecture, ids: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Every layer's output of the unpruned model (even inside an outer ``apply_mask``), and the final state."""
    outputs: list[torch.Tensor] = [torch.empty(0)] * arch.shape.num_layers
    with apply_mask(arch, None):
        last = _forward(arch, ids, outputs.__setitem__)
    return outputs, last


def _l2(reference: list[torch.Tensor]) -> torch.Tensor:
    """Per-token L2 norms of layer outputs, float64 ``[num_layers, batch, seqlen]`` on the CPU."""
    return torch.stack([torch.linalg.vector_norm(h.double(), dim=-1).cpu() for h in reference])


def _masked_pass(
    arch: Architecture, ids: torch.Tensor, mask: Mask, reference: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token norm of every masked layer output and its cosine with ``reference`` (both float64
    ``[num_layers, batch, seqlen]`` on the CPU), and the masked final-normed hidden state."""
    l2 = torch.empty(arch.shape.num_layers, *ids.shape, dtype=torch.float64)
    cosine = torch.empty_like(l2)

    def compare(layer: int, hidden: torch.Tensor) -> None:
        h, ref = hidden.double(), reference[layer].double()
        norm = torch.linalg.vector_norm(h, dim=-1)
        dot = (h * ref).sum(dim=-1)
        l2[layer] = norm.cpu()
        cosine[layer] = (dot / (norm * torch.linalg.vector_norm(ref, dim=-1)).clamp_min(_TINY)).cpu()

    with apply_mask(arch, mask):
        last = _forward(arch, ids, compare)
    return l2, cosine, last


def _kl_sum(arch: Architecture, unpruned: torch.Tensor, masked: torch.Tensor) -> float:
    """``sum over tokens of KL(p || q)`` from final-normed hidden states ``[b, t, d]``, a few windows at a time.

    ``log p = log_softmax(z)`` with the logits z upcast to float64, the same for q; then
    ``KL = sum_v exp(log p_v) (log p_v - log q_v)``.
    """
    per_chunk = max(1, KL_LOGITS_PER_CHUNK // (unpruned.shape[1] * arch.model.config.vocab_size))
    total = 0.0
    for hp, hq in zip(unpruned.split(per_chunk), masked.split(per_chunk), strict=True):
        log_p = torch.log_softmax(arch.logits(hp).double(), dim=-1)
        log_q = torch.log_softmax(arch.logits(hq).double(), dim=-1)
        total += (log_p.exp() * (log_p - log_q)).sum().item()
    return total


@torch.no_grad()
def _reports(
    arch: Architecture, windows: Windows, masks: Sequence[Mask], progress: Progress | None = None
) -> list[DriftReport]:
    """Drift of each mask against one unpruned pass per batch; ``progress`` counts windows done."""
    unpruned_l2: list[torch.Tensor] = []  # per batch, [num_layers, tokens of the batch]
    masked_l2: list[list[torch.Tensor]] = [[] for _ in masks]
    cosine: list[list[torch.Tensor]] = [[] for _ in masks]
    kl = [0.0 for _ in masks]
    done = 0
    for ids in batches(windows):
        reference, last = _unpruned_pass(arch, ids)
        unpruned_l2.append(_l2(reference).flatten(1))
        for k, mask in enumerate(masks):
            l2, cos, masked_last = _masked_pass(arch, ids, mask, reference)
            masked_l2[k].append(l2.flatten(1))
            cosine[k].append(cos.flatten(1))
            kl[k] += _kl_sum(arch, last, masked_last)
        del reference, last  # free this batch before the next one is captured
        done += ids.shape[0]
        if progress:
            progress(done, windows.num_windows)

    tokens = windows.input_ids.numel()
    base = torch.cat(unpruned_l2, dim=1)
    reports = []
    for k, mask in enumerate(masks):
        l2, cos = torch.cat(masked_l2[k], dim=1), torch.cat(cosine[k], dim=1)
        layers = tuple(
            LayerDrift(layer, NormStats.of(base[layer]), NormStats.of(l2[layer]), cos[layer].mean().item())
            for layer in range(arch.shape.num_layers)
        )
        reports.append(
            DriftReport(
                layers=layers,
                kl_nats_per_token=kl[k] / tokens,
                tokens=tokens,
                seqlen=windows.seqlen,
                text=windows.text_name,
                text_sha256=windows.text_sha256,
                mask=mask.summary(),
            )
        )
    return reports


def layer_drift(arch: Architecture, windows: Windows, mask: Mask, progress: Progress | None = None) -> DriftReport:
    """Residual-stream norm and cosine drift of ``mask`` at every layer over all tokens of ``windows``."""
    return _reports(arch, windows, [mask], progress)[0]


@torch.no_grad()
def position_drift(arch: Architecture, windows: Windows, mask: Mask, window: int) -> PositionDrift:
    """Per-position drift of ``mask`` in window ``window`` (run on its own, as a batch of one)."""
    if not 0 <= window < windows.num_windows:
        raise HeadroomError(f"window {window} does not exist; the text has windows 0..{windows.num_windows - 1}")
    ids = windows.input_ids[window : window + 1]
    reference, _ = _unpruned_pass(arch, ids)
    l2, cosine, _ = _masked_pass(arch, ids, mask, reference)
    return PositionDrift(
        window=window,
        input_ids=tuple(ids[0].tolist()),
        unpruned_l2=_l2(reference)[:, 0],
        masked_l2=l2[:, 0],
        cosine=cosine[:, 0],
        mask=mask.summary(),
    )


def alpha_one(mask: Mask) -> Mask:
    """The same mask with alpha = 1 on every drop-QK layer."""
    return mask.with_drop_qk(sorted(mask.drop_qk))


@dataclass(frozen=True)
class MaskDrift:
    """Drift of a mask and, for a mask with drop-QK layers, of the same mask at alpha = 1 there.

    The two differ only by the rescaling, so comparing them shows what the alphas do to the norm.
    """

    mask: DriftReport
    without_rescaling: DriftReport | None  # None for a mask without drop-QK layers: nothing to rescale

    def to_json(self) -> dict[str, Any]:
        obj = {"mask": self.mask.to_json()}
        if self.without_rescaling is not None:
            obj["without_rescaling"] = self.without_rescaling.to_json()
        return obj


def _compared(mask: Mask) -> list[Mask]:
    return [mask, alpha_one(mask)] if mask.drop_qk else [mask]


def _pair(reports: Sequence[DriftReport]) -> MaskDrift:
    return MaskDrift(reports[0], reports[1] if len(reports) > 1 else None)


def mask_drift(arch: Architecture, windows: Windows, mask: Mask, progress: Progress | None = None) -> MaskDrift:
    """:class:`MaskDrift` of ``mask``; both reports come from one unpruned pass (``progress`` counts windows)."""
    return _pair(_reports(arch, windows, _compared(mask), progress))


def _drift_parts(lm: LoadedModel, windows: Windows, mask: Mask) -> dict[str, Any]:
    return {**lm.cache_key(), **windows.cache_key(), "mask": mask.cache_key()}


def _named(value: dict[str, Any], windows: Windows) -> DriftReport:
    return DriftReport.from_json({**value, "text": windows.text_name})  # the key is the content; keep this run's name


def cached_layer_drift(
    lm: LoadedModel,
    windows: Windows,
    mask: Mask,
    cache: DiskCache | None = None,
    refresh: bool = False,
    progress: Progress | None = None,
) -> DriftReport:
    """:func:`layer_drift`, read from the disk cache when this model, text, windowing and mask were seen."""
    parts = _drift_parts(lm, windows, mask)

    def compute() -> dict[str, Any]:
        return layer_drift(lm.arch, windows, mask, progress).to_json()

    value = (cache or DiskCache()).json("drift", parts, compute, refresh)
    return _named(value, windows)


def cached_mask_drift(
    lm: LoadedModel, windows: Windows, mask: Mask, cache: DiskCache | None = None, progress: Progress | None = None
) -> MaskDrift:
    """:func:`mask_drift` through the same cache entries as :func:`cached_layer_drift` (one per mask).

    When a report is missing all are computed together, on one unpruned pass.
    """
    cache = cache or DiskCache()
    parts = [_drift_parts(lm, windows, m) for m in _compared(mask)]
    if any(cache.get_json("drift", p) is None for p in parts):
        for p, report in zip(parts, _reports(lm.arch, windows, _compared(mask), progress), strict=True):
            cache.put_json("drift", p, report.to_json())
    return _pair([_named(cache.get_json("drift", p), windows) for p in parts])
