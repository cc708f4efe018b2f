"""An offline task suite: what a mask keeps beyond short-context perplexity.

Every task is deterministic under its seed, downloads nothing (filler and prompts come from the
default corpus, :mod:`analysis.corpus`), runs under any mask through ``apply_mask`` and reports
``(done, total)`` progress. Each returns a small frozen dataclass whose ``to_json`` is what the CLI
prints and the cache stores.

* ``passkey``: a five-digit number hidden at several depths of filler text, asked for at the end;
  greedy exact match at context lengths up to the model's context (longer ones are listed as skipped).
* ``induction``: random token sequences repeated once; next-token accuracy on the second copy (the
  classic probe of induction heads; the first copy's accuracy is the chance-level reference).
* ``last_word``: LAMBADA-style greedy prediction of the last word of each ``default-eval`` article.
* ``continuation``: greedy continuations of prompts from ``default-eval``, compared token by token
  with the unpruned model's (match rate, position of first divergence).
* ``long_ppl``: protocol perplexity at long window lengths and the mean loss by token position
  (:mod:`analysis.long_context`).

:mod:`analysis.task_suite` names them, caches them and runs several at once.

How targets are scored (greedy exact match by teacher forcing, as lm-evaluation-harness's ``acc``)
is in :mod:`analysis.task_scoring`.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from analysis.corpus import EVALUATION_ARTICLES, adds_bos, default_text, lee_articles
from analysis.errors import HeadroomError
from analysis.evaluation import Progress
from analysis.intervention import apply_mask
from analysis.loading import LoadedModel
from analysis.masks import Mask
from analysis.task_scoring import (
    Item,
    JsonResult,
    device_of,
    exact_match,
    mask_summary,
    progress_steps,
)

PASSKEY_LENGTHS = (512, 1024, 2048, 4096, 8192)
PASSKEY_DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)
CONTINUATION = {"prompts": 8, "prompt_tokens": 64, "new_tokens": 32}  # defaults of the continuation task

PASSKEY_INTRO = "There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it.\n\n"
PASSKEY_NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key. "
PASSKEY_QUESTION = "\n\nWhat is the pass key? The pass key is"


# --- results ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PasskeyCell(JsonResult):
    context_tokens: int
    depth: float
    samples: int
    correct: int
    accuracy: float


@dataclass(frozen=True)
class PasskeyResult(JsonResult):
    accuracy: float  # over every sample of every cell
    cells: tuple[PasskeyCell, ...]
    skipped_lengths: tuple[int, ...]  # longer than the model's context
    max_positions: int | None
    samples_per_cell: int
    seed: int
    mask: Any

    def headline(self) -> dict[str, float]:
        return {"passkey accuracy": self.accuracy}

    def grid(self) -> tuple[list[int], list[float], list[list[float]]]:
        """Context lengths, depths and the accuracy of each (length, depth) cell, one row per depth."""
        lengths = sorted({c.context_tokens for c in self.cells})
        depths = sorted({c.depth for c in self.cells})
        at = {(c.context_tokens, c.depth): c.accuracy for c in self.cells}
        return lengths, depths, [[at[n, d] for n in lengths] for d in depths]


@dataclass(frozen=True)
class InductionResult(JsonResult):
    accuracy: float  # second copy, tokens 2..length (the first token of a copy cannot be inferred)
    first_copy_accuracy: float  # the same positions of the first copy: chance-level reference
    second_copy_mean_nll: float
    sequences: int
    sequence_tokens: int
    predicted_tokens: int
    seed: int
    mask: Any

    def headline(self) -> dict[str, float]:
        return {"induction accuracy": self.accuracy}


@dataclass(frozen=True)
class LastWordResult(JsonResult):
    accuracy: float
    samples: int
    correct: int
    max_context_tokens: int
    text: str
    text_sha256: str
    mask: Any

    def headline(self) -> dict[str, float]:
        return {"last-word accuracy": self.accuracy}


@dataclass(frozen=True)
class ContinuationResult(JsonResult):
    token_match_rate: float  # same token at the same position as the unpruned model's continuation
    mean_first_divergence: float  # tokens before the first difference (new_tokens when none)
    first_divergence: tuple[int, ...]
    identical_continuations: int
    prompts: int
    prompt_tokens: int
    new_tokens: int
    text: str
    text_sha256: str
    mask: Any

    def headline(self) -> dict[str, float]:
        return {"continuation token match": self.token_match_rate}


# --- the items of the text tasks --------------------------------------------------------------------


def filler_tokens(lm: LoadedModel) -> list[int]:
    return lm.tokenizer(default_text("default-calib").text, add_special_tokens=False, verbose=False).input_ids


def passkey_items(
    lm: LoadedModel, length: int, depth: float, samples: int, seed: int, filler: list[int] | None = None
) -> list[Item]:
    """``samples`` passkey prompts of about ``length`` tokens in all (answer included), key at ``depth``.

    The filler is a stretch of ``default-calib`` starting at a seeded offset, cut in token space and
    decoded; the prompt is re-tokenized when scored, so its length can differ from ``length`` by a token or two.
    """
    filler = filler if filler is not None else filler_tokens(lm)
    rng = random.Random(f"passkey:{seed}:{length}:{depth}")
    tok = lm.tokenizer
    fixed = len(tok(PASSKEY_INTRO + PASSKEY_NEEDLE.format(key=12345) + PASSKEY_QUESTION + " 12345").input_ids)
    room = length - fixed - 4 - adds_bos(tok)  # a few tokens of slack for re-tokenization at the seams
    if room < 16 or room > len(filler):
        raise HeadroomError(f"a passkey context of {length} tokens leaves {room} tokens of filler; use 256 to 32768")
    items = []
    for _ in range(samples):
        key = rng.randrange(10000, 100000)
        start = rng.randrange(0, len(filler) - room + 1)
        cut = round(depth * room)
        before, after = filler[start : start + cut], filler[start + cut : start + room]
        prompt = PASSKEY_INTRO + tok.decode(before) + PASSKEY_NEEDLE.format(key=key) + tok.decode(after)
        items.append(Item(prompt + PASSKEY_QUESTION, f" {key}"))
    return items


_LAST_WORD = re.compile(r"^(.*\S)\s+([A-Za-z]{3,})([.!?]?[\"']?)$", re.S)


def _tail(lm: LoadedModel, text: str, max_tokens: int) -> str:
    """The end of ``text``: its last ``max_tokens`` tokens, cut at a space."""
    ids = lm.tokenizer(text, add_special_tokens=False, verbose=False).input_ids
    if len(ids) <= max_tokens:
        return text
    tail = lm.tokenizer.decode(ids[-max_tokens:])
    return tail[tail.find(" ") + 1 :] if " " in tail else tail


def eval_articles() -> list[str]:
    articles = lee_articles()
    return [articles[i] for i in EVALUATION_ARTICLES]


def last_word_items(lm: LoadedModel, samples: int = 100, max_context_tokens: int = 256) -> list[Item]:
    """Up to ``samples`` items: a ``default-eval`` article up to its last word (at most
    ``max_context_tokens`` tokens of it), and that word; articles not ending in a word are skipped."""
    items = []
    for article in eval_articles():
        match = _LAST_WORD.match(article.strip())
        if match:
            items.append(Item(_tail(lm, match.group(1), max_context_tokens), " " + match.group(2)))
        if len(items) == samples:
            break
    return items


# --- the tasks --------------------------------------------------------------------------------------


@torch.no_grad()
def passkey(
    lm: LoadedModel,
    mask: Mask | None = None,
    lengths: Sequence[int] = PASSKEY_LENGTHS,
    depths: Sequence[float] = PASSKEY_DEPTHS,
    samples: int = 1,
    seed: int = 0,
    progress: Progress | None = None,
) -> PasskeyResult:
    limit = lm.max_positions
    fit = [n for n in lengths if limit is None or n <= limit]
    if not fit:
        raise HeadroomError(
            f"every passkey length ({', '.join(map(str, lengths))} tokens) exceeds the model's context of "
            f"{limit} positions; leave passkey out or give shorter lengths"
        )
    filler = filler_tokens(lm)
    step = progress_steps(progress, len(fit) * len(depths) * samples)
    cells = []
    with apply_mask(lm.arch, mask):
        for length in fit:
            for depth in depths:
                correct = 0
                for item in passkey_items(lm, length, depth, samples, seed, filler):
                    correct += exact_match(lm, item.prompt, item.target)
                    step()
                cells.append(PasskeyCell(length, depth, samples, correct, correct / samples))
    return PasskeyResult(
        accuracy=sum(c.correct for c in cells) / sum(c.samples for c in cells),
        cells=tuple(cells),
        skipped_lengths=tuple(n for n in lengths if n not in fit),
        max_positions=limit,
        samples_per_cell=samples,
        seed=seed,
        mask=mask_summary(mask),
    )


def induction_ids(lm: LoadedModel, sequences: int, length: int, seed: int) -> torch.Tensor:
    """``[sequences, 2 * length (+ BOS)]``: random ordinary tokens (no special ones), each sequence twice."""
    special = set(lm.tokenizer.all_special_ids)
    vocab = [i for i in range(min(len(lm.tokenizer), lm.model.config.vocab_size)) if i not in special]
    g = torch.Generator().manual_seed(seed)
    picks = torch.tensor(vocab)[torch.randint(0, len(vocab), (sequences, length), generator=g)]
    ids = torch.cat([picks, picks], 1)
    if adds_bos(lm.tokenizer):
        ids = torch.cat([torch.full((sequences, 1), lm.tokenizer.bos_token_id), ids], 1)
    return ids


@torch.no_grad()
def induction(
    lm: LoadedModel,
    mask: Mask | None = None,
    sequences: int = 8,
    length: int = 256,
    seed: int = 0,
    progress: Progress | None = None,
) -> InductionResult:
    ids = induction_ids(lm, sequences, length, seed)
    offset = ids.shape[1] - 2 * length  # 1 with a BOS column
    step = progress_steps(progress, sequences)
    first = second = 0
    nll = 0.0
    with apply_mask(lm.arch, mask):
        for row in ids:
            hidden = lm.arch.final_hidden(row.unsqueeze(0))[0]
            # logits at position p predict token p + 1; copy tokens 1..length-1 of each copy
            for copy in (0, 1):
                at = offset + copy * length + torch.arange(length - 1)
                logits = lm.arch.logits(hidden[at]).float().cpu()
                hits = int((logits.argmax(-1) == row[at + 1]).sum())
                if copy:
                    second += hits
                    nll += float(F.cross_entropy(logits, row[at + 1], reduction="sum"))
                else:
                    first += hits
            step()
    predicted = sequences * (length - 1)
    return InductionResult(
        accuracy=second / predicted,
        first_copy_accuracy=first / predicted,
        second_copy_mean_nll=nll / predicted,
        sequences=sequences,
        sequence_tokens=length,
        predicted_tokens=predicted,
        seed=seed,
        mask=mask_summary(mask),
    )


@torch.no_grad()
def last_word(
    lm: LoadedModel,
    mask: Mask | None = None,
    samples: int = 100,
    max_context_tokens: int = 256,
    progress: Progress | None = None,
) -> LastWordResult:
    items = last_word_items(lm, samples, max_context_tokens)
    step = progress_steps(progress, len(items))
    correct = 0
    with apply_mask(lm.arch, mask):
        for item in items:
            correct += exact_match(lm, item.prompt, item.target)
            step()
    text = default_text("default-eval")
    return LastWordResult(
        accuracy=correct / len(items),
        samples=len(items),
        correct=correct,
        max_context_tokens=max_context_tokens,
        text=text.name,
        text_sha256=text.sha256,
        mask=mask_summary(mask),
    )


def continuation_prompts(lm: LoadedModel, prompts: int, prompt_tokens: int) -> torch.Tensor:
    """The first ``prompt_tokens`` tokens of the first ``prompts`` ``default-eval`` articles long enough."""
    rows = []
    for article in eval_articles():
        ids = lm.tokenizer(article, add_special_tokens=False, verbose=False).input_ids
        if len(ids) >= prompt_tokens:
            rows.append(ids[:prompt_tokens])
        if len(rows) == prompts:
            break
    ids = torch.tensor(rows)
    if adds_bos(lm.tokenizer):
        ids = torch.cat([torch.full((len(rows), 1), lm.tokenizer.bos_token_id), ids], 1)
    return ids


@torch.no_grad()
def greedy_tokens(lm: LoadedModel, prompts: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy continuations ``[b, new_tokens]`` of equal-length prompts, full recompute per token, no cache.

    The drop-QK hooks never write a KV cache, so every step reruns the whole sequence (cheap for the
    short prompts of the continuation task).
    """
    ids = prompts.to(device_of(lm))
    for _ in range(new_tokens):
        last = lm.arch.logits(lm.arch.final_hidden(ids)[:, -1:]).float()
        ids = torch.cat([ids, last.argmax(-1)], 1)
    return ids[:, prompts.shape[1] :].cpu()


def greedy_continuations(
    lm: LoadedModel, mask: Mask | None, prompts: int, prompt_tokens: int, new_tokens: int
) -> torch.Tensor:
    with apply_mask(lm.arch, mask):
        return greedy_tokens(lm, continuation_prompts(lm, prompts, prompt_tokens), new_tokens)


def agreement(reference: torch.Tensor, other: torch.Tensor) -> tuple[float, list[int]]:
    """Token match rate and, per row, the number of tokens before the first difference."""
    same = reference == other
    first = [int(row.logical_not().nonzero()[0]) if not row.all() else row.numel() for row in same]
    return float(same.double().mean()), first


def continuation(
    lm: LoadedModel,
    mask: Mask | None = None,
    prompts: int = CONTINUATION["prompts"],
    prompt_tokens: int = CONTINUATION["prompt_tokens"],
    new_tokens: int = CONTINUATION["new_tokens"],
    progress: Progress | None = None,
    reference: torch.Tensor | None = None,
) -> ContinuationResult:
    """Greedy continuations under ``mask`` against ``reference`` (the unpruned ones, computed if not given)."""
    if reference is None:
        reference = greedy_continuations(lm, None, prompts, prompt_tokens, new_tokens)
    if progress:
        progress(1, 2)
    tokens = greedy_continuations(lm, mask, prompts, prompt_tokens, new_tokens)
    if progress:
        progress(2, 2)
    rate, first = agreement(reference, tokens)
    text = default_text("default-eval")
    return ContinuationResult(
        token_match_rate=rate,
        mean_first_divergence=sum(first) / len(first),
        first_divergence=tuple(first),
        identical_continuations=sum(f == new_tokens for f in first),
        prompts=tokens.shape[0],
        prompt_tokens=prompt_tokens,
        new_tokens=new_tokens,
        text=text.name,
        text_sha256=text.sha256,
        mask=mask_summary(mask),
    )
