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
from dataclasses import asdict, dataclass
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
        return asdict(self)


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
    SDPA. Then one chunk of float32 logits (:func:`head_token_nll`) and half as much again for the
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


def _logit_windows(predicted: int, vocab_size: int) -> int:
    """Windows whose float32 logits are made at once (:data:`LOGITS_PER_CHUNK`)."""
    return max(1, LOGITS_PER_CHUNK // (predicted * vocab_size))


def head_token_nll(arch: Architecture, hidden: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Next-token NLL of every predicted token, ``[b, t - 1]`` float64, from final-normed hidden states ``[b, t, d]``.

    Logits are made a few windows at a time and upcast to float32, as transformers' own causal-LM
    loss does. The log-sum-exp runs in place on the logits (``NLL = logsumexp(z) - z[target]``):
    the same numbers as ``cross_entropy`` to float rounding, without a second vocabulary-sized
    tensor. On the hot path the head is most of the cost of a toggle in a high layer. Not
    differentiable (in-place), which is why it runs under ``no_grad`` callers only.
    """
    hidden = hidden[:, :-1]
    targets = input_ids[:, 1:].to(hidden.device)
    per_window = _logit_windows(hidden.shape[1], arch.model.config.vocab_size)
    parts = []
    for h, t in zip(hidden.split(per_window), targets.split(per_window), strict=True):
        z = arch.logits(h).float().flatten(0, 1)
        target = z.gather(-1, t.reshape(-1, 1)).squeeze(-1)
        top = z.amax(-1, keepdim=True)
        lse = z.sub_(top).exp_().sum(-1).log_() + top.squeeze(-1)
        parts.append((lse - target).double().view(t.shape).cpu())
    return torch.cat(parts)


def nll_total(token_nll: torch.Tensor, vocab_size: int) -> float:
    """Sum of the per-token NLL ``[windows, t - 1]`` of a whole window set, always added in one order.

    Per batch of :data:`TOKENS_PER_BATCH` tokens, per chunk of logits, as :func:`perplexity` makes
    them: so a number is the same to the last digit whatever batches the windows were computed in
    (the full pass, the incremental evaluator, the live one window at a time).
    """
    per_batch = min(token_nll.shape[0], max(1, TOKENS_PER_BATCH // (token_nll.shape[1] + 1)))
    per_chunk = _logit_windows(token_nll.shape[1], vocab_size)
    total = 0.0
    for batch in token_nll.split(per_batch):
        batch_total = torch.zeros((), dtype=torch.float64)
        for chunk in batch.split(per_chunk):
            batch_total += chunk.sum()
        total += batch_total.item()
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
    token_nll = []
    with apply_mask(arch, mask):
        for i, ids in enumerate(parts):
            token_nll.append(head_token_nll(arch, arch.final_hidden(ids), ids))
            if progress:
                progress(i + 1, len(parts))
    return _result(nll_total(torch.cat(token_nll), arch.model.config.vocab_size), windows, mask)


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

    Holds, per batch of windows, each layer's input residual stream (about ``layers * tokens *
    hidden * 4`` bytes: 141 MB for the default model on 2,048 tokens), the arguments the model
    passed to each layer, and the per-token NLL. Each batch remembers the mask its stream belongs
    to, so batches may be brought up to date one at a time (``tokens_per_batch`` of one window
    gives the live evaluator its window-by-window answers) and a refresh can be cancelled between
    layers. One call at a time: the methods change that state, so an evaluator shared by several
    sessions is used under a lock (``analysis.live.LivePerplexity`` holds one), which makes
    concurrent callers take turns on it.
    """

    def __init__(
        self,
        arch: Architecture,
        windows: Windows,
        progress: Progress | None = None,
        tokens_per_batch: int = TOKENS_PER_BATCH,
    ) -> None:
        tokens = windows.input_ids.numel()
        stored = arch.shape.num_layers * tokens * arch.shape.hidden_size * arch.shape.bytes_per_element
        require(stored + working_bytes(arch, windows), f"keeping every layer's input for {tokens} tokens")
        self.arch = arch
        self.windows = windows
        self._ids = batches(windows, tokens_per_batch)
        self._inputs: list[list[torch.Tensor]] = []  # [batch][layer] residual at the layer's input
        self._layer_args: list[list[tuple[tuple, dict]]] = []  # [batch][layer] other args of that call
        self._token_nll: list[torch.Tensor] = []  # [batch] per-token NLL [windows, t - 1] under the batch's mask
        self._capture(progress)
        self.unpruned_token_nll = torch.cat(self._token_nll)  # [window, t - 1], from the capturing pass
        unpruned = Mask.unpruned(arch.shape, "")
        self._masks = [unpruned] * len(self._ids)  # [batch] the mask its stored stream belongs to
        self._stale: list[int | None] = [None] * len(self._ids)  # [batch] lowest layer not yet brought up to it
        self.last_recomputed_from: int | None = 0  # lowest layer recomputed by the last call
        self._seen: OrderedDict[tuple[LayerSpec, ...], float] = OrderedDict()  # mask -> NLL sum, recent last

    @torch.no_grad()
    def _capture(self, progress: Progress | None) -> None:
        for b, ids in enumerate(self._ids):
            inputs, args, hidden = _run_capturing(self.arch, ids)
            self._inputs.append(inputs)
            self._layer_args.append(args)
            self._token_nll.append(head_token_nll(self.arch, hidden, ids))
            if progress:
                progress(b + 1, len(self._ids))

    @property
    def num_batches(self) -> int:
        return len(self._ids)

    def batch_windows(self, batch: int) -> range:
        """The window indices (rows of :attr:`unpruned_token_nll`) of ``batch``."""
        first = sum(len(ids) for ids in self._ids[:batch])
        return range(first, first + len(self._ids[batch]))

    def token_nll(self, batch: int) -> torch.Tensor:
        """Per-token NLL of ``batch`` under the mask its last completed :meth:`refresh` brought it to."""
        return self._token_nll[batch]

    def layer_inputs(self, layer: int) -> list[torch.Tensor]:
        """The residual stream entering ``layer``, per batch, under the last evaluated mask."""
        return [inputs[layer] for inputs in self._inputs]

    def run_layer(self, batch: int, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """Call ``layer`` on ``hidden`` with the arguments the model passes it for ``batch``."""
        args, kwargs = self._layer_args[batch][layer]
        return hidden_of(self.arch.layers[layer](hidden, *args, **kwargs))

    def _first_stale(self, batch: int, mask: Mask) -> int | None:
        """Lowest layer whose stored input of ``batch`` may not match ``mask``; None if everything does."""
        start, stale = self._masks[batch].first_difference(mask), self._stale[batch]
        if stale is not None:
            start = stale if start is None else min(start, stale)
        return start

    def _recompute(
        self, batch: int, mask: Mask, start: int, stop: int, cancelled: Callable[[], bool] | None = None
    ) -> bool:
        """Rerun layers ``start..stop-1`` of ``batch`` under ``mask``, and the head if ``stop`` is the last layer.

        Until it finishes, everything from ``start`` up is marked stale, so an interruption (an
        exception, a cancelled page run) is repaired by the next call rather than read as valid.
        ``cancelled`` is asked before each layer; when it says so, the batch keeps what is done
        (its stream up to the current layer belongs to ``mask``) and False is returned.
        """
        num_layers = len(self.arch.layers)
        self._stale[batch] = start
        inputs = self._inputs[batch]
        hidden = inputs[start]
        with apply_mask(self.arch, mask):
            for i in range(start, stop):
                if cancelled is not None and cancelled():
                    self._masks[batch], self._stale[batch] = mask, i
                    return False
                hidden = self.run_layer(batch, i, hidden)
                if i + 1 < num_layers:
                    inputs[i + 1] = hidden
            if stop == num_layers:
                ids = self._ids[batch]
                self._token_nll[batch] = head_token_nll(self.arch, self.arch.final_norm()(hidden), ids)
        self._masks[batch] = mask
        self._stale[batch] = None if stop == num_layers else stop
        return True

    @torch.no_grad()
    def refresh(self, batch: int, mask: Mask, cancelled: Callable[[], bool] | None = None) -> bool:
        """Bring ``batch`` (stream and per-token NLL) up to date with ``mask``; False if ``cancelled`` stopped it."""
        start = self._first_stale(batch, mask)
        if start is None:
            return True
        done = self._recompute(batch, mask, start, len(self.arch.layers), cancelled)
        self.last_recomputed_from = (
            start if self.last_recomputed_from is None else min(self.last_recomputed_from, start)
        )
        return done

    @torch.no_grad()
    def advance(self, mask: Mask, layer: int) -> None:
        """Bring the residual stream entering ``layer`` up to date with ``mask``, skipping the rest.

        Cheaper than :meth:`perplexity` when only :meth:`layer_inputs` is needed.
        """
        for b in range(self.num_batches):
            start = self._first_stale(b, mask)
            if start is not None and start < layer:
                self._recompute(b, mask, start, layer)
            elif start is not None:  # nothing below `layer` changes; remember what above it is stale
                self._masks[b], self._stale[b] = mask, start

    def remembered(self, mask: Mask) -> PerplexityResult | None:
        """The perplexity of ``mask`` if it was evaluated recently (undo, or a search revisiting a candidate)."""
        key = _key(mask)
        if key not in self._seen:
            return None
        self._seen.move_to_end(key)
        return _result(self._seen[key], self.windows, mask)

    @torch.no_grad()
    def perplexity(self, mask: Mask) -> PerplexityResult:
        """Protocol perplexity under ``mask``; equal to :func:`perplexity` to float rounding.

        A mask evaluated recently is answered from memory.
        """
        known = self.remembered(mask)
        self.last_recomputed_from = None
        if known is not None:
            return known
        for b in range(self.num_batches):
            self.refresh(b, mask)
        key = _key(mask)
        self._seen[key] = nll_total(torch.cat(self._token_nll), self.arch.model.config.vocab_size)
        if len(self._seen) > REMEMBERED_MASKS:
            self._seen.popitem(last=False)
        return _result(self._seen[key], self.windows, mask)


def _key(mask: Mask) -> tuple[LayerSpec, ...]:
    return tuple(mask.layer(i) for i in range(mask.num_layers))
