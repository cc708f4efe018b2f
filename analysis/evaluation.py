"""Perplexity per the protocol, full and incremental.

``perplexity`` runs every window through the model. ``IncrementalEvaluator`` is the hot path of the
mask editor: it keeps the residual stream at every layer's input for its windows, and when the mask
changes it reruns only the layers from the lowest one whose masking changed, then the head. Layers
are called exactly as the model's own forward calls them (their arguments are captured during the
first full pass), so the numbers are the ones plain transformers gives.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from analysis.architecture import Architecture
from analysis.cache import DiskCache, model_key
from analysis.corpus import Windows
from analysis.hooks import hidden_arg, hidden_of, observe
from analysis.intervention import apply_mask
from analysis.masks import LayerSpec, Mask
from analysis.memory import require

Progress = Callable[[int, int], None]  # (done, total)

TOKENS_PER_BATCH = 2048  # bounds activation memory (at least one window); the default model peaks near 1.6 GB RSS
LOGITS_PER_CHUNK = 1 << 26  # float32 logits computed at once (256 MiB)
ATTENTION_BLOCK = 1024  # key positions whose scores SDPA holds at once per query (measured, PyTorch 2.13 CPU)
REMEMBERED_MASKS = 256  # perplexities an incremental evaluator keeps by mask


@dataclass(frozen=True)
class PerplexityResult:
    """A protocol perplexity with the metadata that must always accompany it."""

    perplexity: float
    mean_nll: float
    predicted_tokens: int
    seqlen: int
    text: str
    text_sha256: str
    mask: Any  # Mask.summary()

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _result(nll_sum: float, windows: Windows, mask: Mask | None) -> PerplexityResult:
    mean = nll_sum / windows.predicted_tokens
    return PerplexityResult(
        perplexity=math.exp(mean),
        mean_nll=mean,
        predicted_tokens=windows.predicted_tokens,
        seqlen=windows.seqlen,
        text=windows.text_name,
        text_sha256=windows.text_sha256,
        mask=mask.summary() if mask is not None else "unpruned",
    )


def _windows_per_batch(windows: Windows, tokens_per_batch: int) -> int:
    return min(windows.num_windows, max(1, tokens_per_batch // windows.input_ids.shape[1]))


def batches(windows: Windows, tokens_per_batch: int = TOKENS_PER_BATCH) -> list[torch.Tensor]:
    return list(windows.input_ids.split(_windows_per_batch(windows, tokens_per_batch)))


def working_bytes(arch: Architecture, windows: Windows) -> int:
    """Upper estimate of the memory one batch's forward pass and NLL take, beyond the weights.

    Per token and layer: the residual stream, norms and projections (8 x hidden), the MLP
    (4 x intermediate) and five copies of the attention scores (scores, mask, softmax, their
    temporaries) over the keys held at once: every position with eager attention, a block with
    SDPA. Then one chunk of float32 logits (:func:`head_nll`) and half as much again for the
    log-sum-exp. On the default model: 0.56 GB for 8 windows of 256 tokens, 4.3 GB for one window of 8,192 tokens,
    where the measured peaks above the loaded model are 0.42 and 1.8 GB.
    """
    config, shape = arch.model.config, arch.shape
    width = windows.input_ids.shape[1]
    per_batch = _windows_per_batch(windows, TOKENS_PER_BATCH)
    keys = width if config._attn_implementation == "eager" else min(width, ATTENTION_BLOCK)
    per_token = 8 * shape.hidden_size + 4 * config.intermediate_size + 5 * shape.num_heads * keys
    window_logits = (width - 1) * config.vocab_size
    logits = min(per_batch, max(1, LOGITS_PER_CHUNK // window_logits)) * window_logits
    return shape.bytes_per_element * per_batch * width * per_token + 6 * logits


def head_nll(arch: Architecture, hidden: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Sum of next-token NLL (float64) from final-normed hidden states ``[b, t, d]``.

    Logits are made a few windows at a time and upcast to float32, as transformers' own causal-LM
    loss does. The log-sum-exp runs in place on the logits (``NLL = logsumexp(z) - z[target]``):
    the same numbers as ``cross_entropy`` to float rounding, without a second vocabulary-sized
    tensor. On the hot path the head is most of the cost of a toggle in a high layer. Not
    differentiable (in-place), which is why it runs under ``no_grad`` callers only.
    """
    hidden = hidden[:, :-1]
    targets = input_ids[:, 1:].to(hidden.device)
    per_window = max(1, LOGITS_PER_CHUNK // (hidden.shape[1] * arch.model.config.vocab_size))
    total = torch.zeros((), dtype=torch.float64)
    for h, t in zip(hidden.split(per_window), targets.split(per_window), strict=True):
        z = arch.logits(h).float().flatten(0, 1)
        target = z.gather(-1, t.reshape(-1, 1)).squeeze(-1)
        top = z.amax(-1, keepdim=True)
        lse = z.sub_(top).exp_().sum(-1).log_() + top.squeeze(-1)
        total += (lse - target).double().sum().cpu()
    return total


def cached_perplexity(
    arch: Architecture,
    fingerprint: str,
    windows: Windows,
    mask: Mask | None = None,
    cache: DiskCache | None = None,
    progress: Progress | None = None,
    refresh: bool = False,
) -> PerplexityResult:
    """:func:`perplexity`, read from the disk cache when this model, text, windowing and mask were seen."""
    mask = mask or Mask.unpruned(arch.shape, "")
    parts = {**model_key(fingerprint, arch.model.dtype), **windows.cache_key(), "mask": mask.cache_key()}
    value = (cache or DiskCache()).json(
        "perplexity", parts, lambda: perplexity(arch, windows, mask, progress).to_json(), refresh
    )
    return PerplexityResult(**{**value, "text": windows.text_name})  # the key is the content; keep this run's name


@torch.no_grad()
def perplexity(
    arch: Architecture, windows: Windows, mask: Mask | None = None, progress: Progress | None = None
) -> PerplexityResult:
    """Full-recompute protocol perplexity of the model under ``mask``."""
    require(working_bytes(arch, windows), f"evaluating {windows.num_windows} windows of {windows.seqlen} tokens")
    parts = batches(windows)
    total = 0.0
    with apply_mask(arch, mask):
        for i, ids in enumerate(parts):
            hidden = arch.final_hidden(ids)
            total += head_nll(arch, hidden, ids).item()
            if progress:
                progress(i + 1, len(parts))
    return _result(total, windows, mask)


def _run_capturing(
    arch: Architecture, ids: torch.Tensor
) -> tuple[list[torch.Tensor], list[tuple[tuple, dict]], torch.Tensor]:
    """Full forward that records each layer's input and the other arguments the model passed it."""
    inputs: list[torch.Tensor] = []
    args: list[tuple[tuple, dict]] = []

    def grab(module: torch.nn.Module, a: tuple, kw: dict) -> None:
        inputs.append(hidden_arg(a, kw))
        args.append((a[1:], {k: v for k, v in kw.items() if k != "hidden_states"}))

    with observe(pre=[(layer, grab) for layer in arch.layers]):
        hidden = arch.final_hidden(ids)
    return inputs, args, hidden


class IncrementalEvaluator:
    """Perplexity under changing masks, recomputing only from the lowest changed layer.

    Holds, per batch of windows, each layer's input residual stream under the current mask (about
    ``layers * tokens * hidden * 4`` bytes: 141 MB for the default model on 2,048 tokens) and the
    arguments the model passed to each layer. Not thread-safe: give each session its own.
    """

    def __init__(self, arch: Architecture, windows: Windows, progress: Progress | None = None) -> None:
        tokens = windows.input_ids.numel()
        stored = arch.shape.num_layers * tokens * arch.shape.hidden_size * arch.shape.bytes_per_element
        require(stored + working_bytes(arch, windows), f"keeping every layer's input for {tokens} tokens")
        self.arch = arch
        self.windows = windows
        self.mask = Mask.unpruned(arch.shape, "")
        self._inputs: list[list[torch.Tensor]] = []  # [batch][layer] residual at the layer's input
        self._layer_args: list[list[tuple[tuple, dict]]] = []  # [batch][layer] other args of that call
        self._nll: list[float] = []
        self._capture(progress)
        self.last_recomputed_from: int | None = 0  # lowest layer recomputed by the last call
        self._seen: OrderedDict[tuple[LayerSpec, ...], float] = OrderedDict()  # mask -> NLL sum, recent last
        self._stale_from: int | None = None  # set while a recompute is under way or was interrupted

    @torch.no_grad()
    def _capture(self, progress: Progress | None) -> None:
        parts = batches(self.windows)
        for b, ids in enumerate(parts):
            inputs, args, hidden = _run_capturing(self.arch, ids)
            self._inputs.append(inputs)
            self._layer_args.append(args)
            self._nll.append(head_nll(self.arch, hidden, ids).item())
            if progress:
                progress(b + 1, len(parts))

    def layer_inputs(self, layer: int) -> list[torch.Tensor]:
        """The residual stream entering ``layer``, per batch, under the last evaluated mask."""
        return [inputs[layer] for inputs in self._inputs]

    def run_layer(self, batch: int, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """Call ``layer`` on ``hidden`` with the arguments the model passes it for ``batch``."""
        args, kwargs = self._layer_args[batch][layer]
        return hidden_of(self.arch.layers[layer](hidden, *args, **kwargs))

    def _first_stale(self, mask: Mask) -> int | None:
        """Lowest layer whose stored input may not match ``mask``; None if everything does."""
        start = self.mask.first_difference(mask)
        if self._stale_from is not None:
            start = self._stale_from if start is None else min(start, self._stale_from)
        return start

    def _recompute(self, mask: Mask, start: int, stop: int) -> None:
        """Rerun layers ``start..stop-1`` under ``mask``, and the head if ``stop`` is the last layer.

        Until it finishes, everything from ``start`` up is marked stale, so an interruption (an
        exception, a cancelled page run) is repaired by the next call rather than read as valid.
        """
        num_layers = len(self.arch.layers)
        self._stale_from = start
        with apply_mask(self.arch, mask):
            for b, ids in enumerate(batches(self.windows)):
                inputs = self._inputs[b]
                hidden = inputs[start]
                for i in range(start, stop):
                    hidden = self.run_layer(b, i, hidden)
                    if i + 1 < num_layers:
                        inputs[i + 1] = hidden
                if stop == num_layers:
                    self._nll[b] = head_nll(self.arch, self.arch.final_norm()(hidden), ids).item()
        self.mask = mask
        self._stale_from = None if stop == num_layers else stop

    @torch.no_grad()
    def advance(self, mask: Mask, layer: int) -> None:
        """Bring the residual stream entering ``layer`` up to date with ``mask``, skipping the rest.

        Cheaper than :meth:`perplexity` when only :meth:`layer_inputs` is needed.
        """
        start = self._first_stale(mask)
        if start is not None and start < layer:
            self._recompute(mask, start, layer)
        elif start is not None:  # nothing below `layer` changes; remember what above it is stale
            self.mask, self._stale_from = mask, start

    @torch.no_grad()
    def perplexity(self, mask: Mask) -> PerplexityResult:
        """Protocol perplexity under ``mask``; equal to :func:`perplexity` to float rounding.

        A mask evaluated recently (undo, or a search revisiting a candidate) is answered from memory.
        """
        key = tuple(mask.layer(i) for i in range(mask.num_layers))
        if key in self._seen:
            self._seen.move_to_end(key)
            self.last_recomputed_from = None
            return _result(self._seen[key], self.windows, mask)
        start = self._first_stale(mask)
        self.last_recomputed_from = start
        if start is not None:
            self._recompute(mask, start, len(self.arch.layers))
        self._seen[key] = sum(self._nll)
        if len(self._seen) > REMEMBERED_MASKS:
            self._seen.popitem(last=False)
        return _result(self._seen[key], self.windows, mask)
