"""Long-context perplexity: protocol perplexity at long window lengths and the mean loss by token position.

The loss-by-position curve is where a mask that cuts long-range attention (drop-QK layers attend
to nothing but their own token) shows: the unpruned curve falls as the context grows, a mask that
hurts long-range prediction flattens it. The perplexity of each row is the protocol perplexity
(:func:`analysis.evaluation.perplexity`) of the same windows; only the logits are made a slice of
positions at a time, so that an 8k-token window never holds 8k vocabulary-sized rows at once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from analysis.corpus import adds_bos, default_text, make_windows
from analysis.evaluation import Progress, head_token_nll
from analysis.intervention import apply_mask
from analysis.loading import LoadedModel
from analysis.masks import Mask
from analysis.task_scoring import JsonResult, mask_summary, progress_steps

LONG_SEQLENS = (1024, 2048, 4096, 8192)
POSITION_BINS = 32
LOGIT_POSITIONS = 1024  # positions whose float32 logits are made at once (200 MB for a 49k vocabulary)


@dataclass(frozen=True)
class LongContextRow(JsonResult):
    seqlen: int
    windows: int
    predicted_tokens: int
    perplexity: float
    mean_nll: float
    bin_tokens: int  # width of each loss_by_position bin
    loss_by_position: tuple[float, ...]  # mean NLL of the targets in each bin of window positions


@dataclass(frozen=True)
class LongContextResult(JsonResult):
    rows: tuple[LongContextRow, ...]
    skipped_seqlens: tuple[int, ...]  # longer than the model's context or the text
    tokens_per_seqlen: int
    text: str
    text_sha256: str
    mask: Any

    def headline(self) -> dict[str, float]:
        return {f"perplexity at {row.seqlen}": row.perplexity for row in self.rows}


def token_nll(lm: LoadedModel, input_ids: torch.Tensor) -> torch.Tensor:
    """Next-token NLL ``[b, t - 1]`` (float64), under the active mask, :data:`LOGIT_POSITIONS` positions at a time."""
    hidden = lm.arch.final_hidden(input_ids)
    ids = input_ids.to(hidden.device)
    last = hidden.shape[1] - 1  # positions that predict a token
    return torch.cat(
        [
            head_token_nll(lm.arch, hidden[:, s : s + LOGIT_POSITIONS + 1], ids[:, s : s + LOGIT_POSITIONS + 1])
            for s in range(0, last, LOGIT_POSITIONS)
        ],
        1,
    )


def position_bins(nll: torch.Tensor, bins: int) -> tuple[int, list[float]]:
    """Mean of ``nll [windows, positions]`` over windows and over consecutive position bins of equal width."""
    width = math.ceil(nll.shape[1] / bins)
    per_position = nll.double().mean(0)
    return width, [float(chunk.mean()) for chunk in per_position.split(width)]


@torch.no_grad()
def long_ppl(
    lm: LoadedModel,
    mask: Mask | None = None,
    seqlens: Sequence[int] = LONG_SEQLENS,
    tokens_per_seqlen: int = 8192,
    progress: Progress | None = None,
) -> LongContextResult:
    """Protocol perplexity of ``default-eval`` at each window length, the first ``tokens_per_seqlen`` tokens each.

    Lengths longer than the model's context, than ``tokens_per_seqlen`` or than the text are skipped
    (and listed as such).
    """
    text = default_text("default-eval")
    available = len(lm.tokenizer(text.text, add_special_tokens=False, verbose=False).input_ids)
    limit = lm.max_positions
    bos = adds_bos(lm.tokenizer)
    fit = [n for n in seqlens if (limit is None or n + bos <= limit) and n <= min(available, tokens_per_seqlen)]
    windows = {n: make_windows(lm.tokenizer, text, n, tokens_per_seqlen, limit) for n in fit}
    step = progress_steps(progress, sum(w.num_windows for w in windows.values()))
    rows = []
    with apply_mask(lm.arch, mask):
        for n, w in windows.items():
            parts = []
            for ids in w.input_ids:
                parts.append(token_nll(lm, ids.unsqueeze(0)))
                step()
            nll = torch.cat(parts)
            mean = float(nll.mean())
            width, curve = position_bins(nll, POSITION_BINS)
            rows.append(LongContextRow(n, w.num_windows, w.predicted_tokens, math.exp(mean), mean, width, tuple(curve)))
    return LongContextResult(
        rows=tuple(rows),
        skipped_seqlens=tuple(n for n in seqlens if n not in fit),
        tokens_per_seqlen=tokens_per_seqlen,
        text=text.name,
        text_sha256=text.sha256,
        mask=mask_summary(mask),
    )
