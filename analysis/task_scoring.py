"""How the task suite scores a model: greedy exact match and log-likelihood by teacher forcing.

A target counts as greedily produced when, fed the prompt and the target, the model's argmax at
every target position is the target's token. That is exactly "greedy decoding of ``len(target)``
tokens reproduces the target", and it is lm-evaluation-harness's ``acc`` of a ``loglikelihood`` task
(``is_greedy``), which is what :mod:`analysis.lm_eval_tasks` exports. Prompt and target are split
into tokens as lm-eval splits them (:func:`encode_pair`), so both harnesses score the same tokens.

Also here: what every task result shares (:class:`JsonResult`), the item of an exact-match task and
the progress helper of the tasks.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from analysis.corpus import adds_bos
from analysis.errors import HeadroomError
from analysis.evaluation import Progress
from analysis.loading import LoadedModel
from analysis.masks import Mask

TASK_VERSION = 1  # part of every cache key and lm-eval task version; bump when a task's definition changes


class JsonResult:
    """JSON round trip of the result dataclasses (nested dataclasses in tuples included)."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Any:
        hints = typing.get_type_hints(cls)
        values = {}
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            value, hint = obj[f.name], hints[f.name]
            item = typing.get_args(hint)[0] if typing.get_origin(hint) is tuple else None
            if isinstance(item, type) and issubclass(item, JsonResult):
                value = tuple(item.from_json(v) for v in value)
            elif typing.get_origin(hint) is tuple:
                value = tuple(value)
            values[f.name] = value
        return cls(**values)


@dataclass(frozen=True)
class Item:
    """One exact-match item: greedy decoding after ``prompt`` must give ``target``."""

    prompt: str
    target: str


def mask_summary(mask: Mask | None) -> Any:
    return mask.summary() if mask is not None else "unpruned"


def progress_steps(progress: Progress | None, total: int) -> Callable[[], None]:
    """A function to call once per step that reports ``(steps so far, total)`` to ``progress``."""
    done = [0]

    def step() -> None:
        done[0] += 1
        if progress:
            progress(done[0], total)

    return step


def device_of(lm: LoadedModel) -> torch.device:
    return lm.model.get_input_embeddings().weight.device


def encode_pair(lm: LoadedModel, prompt: str, target: str) -> tuple[list[int], list[int]]:
    """Prompt and target token ids, split as lm-evaluation-harness splits them.

    Trailing whitespace of the prompt moves to the target, the pair is tokenized whole, and the
    target is what follows the prompt's own tokens; a BOS token leads when the tokenizer adds one.
    """
    spaces = len(prompt) - len(prompt.rstrip())
    if spaces:
        prompt, target = prompt[:-spaces], prompt[-spaces:] + target
    tok = lm.tokenizer
    whole = tok(prompt + target, add_special_tokens=False, verbose=False).input_ids
    context = tok(prompt, add_special_tokens=False, verbose=False).input_ids
    bos = [tok.bos_token_id] if adds_bos(tok) else []
    return bos + context, whole[len(context) :]


def target_logits(lm: LoadedModel, context: list[int], target: list[int]) -> torch.Tensor:
    """float32 logits ``[len(target), vocab]`` predicting each target after ``context``, under the active mask."""
    if not target:
        raise HeadroomError("a target is empty after tokenization; give every item a non-empty target")
    ids = torch.tensor([context + target[:-1]], device=device_of(lm))
    hidden = lm.arch.final_hidden(ids)[:, -len(target) :]
    return lm.arch.logits(hidden)[0].float()


def greedy_match(logits: torch.Tensor, target: Sequence[int]) -> bool:
    """Whether the argmax of every row of ``logits`` is the matching target token."""
    return bool((logits.argmax(-1).cpu() == torch.tensor(list(target))).all())


def target_loglik(logits: torch.Tensor, target: Sequence[int]) -> float:
    """Sum of the log-probabilities of the target tokens."""
    logp = logits.log_softmax(-1).cpu()
    return float(logp.gather(-1, torch.tensor(list(target)).unsqueeze(-1)).sum())


def exact_match(lm: LoadedModel, prompt: str, target: str) -> bool:
    """Greedy decoding after ``prompt`` reproduces ``target`` (by teacher forcing, under the active mask)."""
    context, target_ids = encode_pair(lm, prompt, target)
    return greedy_match(target_logits(lm, context, target_ids), target_ids)


def choice_logliks(lm: LoadedModel, prompt: str, choices: Sequence[str]) -> list[float]:
    """Log-likelihood of each choice as the continuation of ``prompt`` (under the active mask)."""
    out = []
    for choice in choices:
        context, target_ids = encode_pair(lm, prompt, choice)
        out.append(target_loglik(target_logits(lm, context, target_ids), target_ids))
    return out
