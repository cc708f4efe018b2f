"""User tasks from JSONL files: validated with clear errors, scored under a mask, cached by content.

A task file has one JSON object per line, all of one kind:

* ``{"prompt": "...", "target": "..."}``: scored by greedy exact match (the target is produced
  verbatim right after the prompt, by teacher forcing; see :mod:`analysis.tasks`);
* ``{"prompt": "...", "choices": ["...", "..."], "answer": 1}``: the choice with the highest
  log-likelihood as the prompt's continuation must be ``choices[answer]``.

The prompt and the target (or choice) are concatenated as they are: put the space in front of the
target (``" Paris"``), as lm-evaluation-harness does with ``target_delimiter: ""``.
:mod:`analysis.lm_eval_tasks` writes a task file out for lm-evaluation-harness.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from analysis.cache import DiskCache
from analysis.errors import HeadroomError
from analysis.evaluation import Progress
from analysis.intervention import apply_mask
from analysis.loading import LoadedModel
from analysis.masks import Mask
from analysis.task_scoring import (
    TASK_VERSION,
    Item,
    JsonResult,
    choice_logliks,
    exact_match,
    mask_summary,
    progress_steps,
)

MAX_TASK_BYTES = 16 * 2**20
MAX_ERRORS = 5  # problems listed in one message
EXACT, CHOICE = "exact_match", "choice"
_NAME = re.compile(r"[^a-z0-9_]+")


@dataclass(frozen=True)
class UserTask:
    """A validated task file: its items are :class:`Item` (exact match) or ``(prompt, choices, answer)``."""

    name: str
    sha256: str
    kind: str  # EXACT or CHOICE
    items: tuple[Any, ...]


@dataclass(frozen=True)
class UserTaskResult(JsonResult):
    name: str
    file_sha256: str
    kind: str
    items: int
    correct: int
    accuracy: float
    item_correct: tuple[bool, ...]
    mask: Any

    def headline(self) -> dict[str, float]:
        return {f"{self.name} accuracy": self.accuracy}


def _item(obj: Any) -> tuple[str | None, Any, str | None]:
    """(kind, item, problem) of one parsed line."""
    if not isinstance(obj, dict):
        return None, None, f"is a JSON {type(obj).__name__}, not an object"
    keys = set(obj)
    if keys == {"prompt", "target"}:
        kind = EXACT
    elif keys == {"prompt", "choices", "answer"}:
        kind = CHOICE
    else:
        return None, None, (f"has keys {sorted(keys)}; give either prompt and target, or prompt, choices and answer")
    prompt = obj["prompt"]
    if not isinstance(prompt, str) or not prompt.strip():
        return None, None, "has an empty or non-string prompt"
    if kind == EXACT:
        if not isinstance(obj["target"], str) or not obj["target"].strip():
            return None, None, "has an empty or non-string target"
        return kind, Item(prompt, obj["target"]), None
    choices, answer = obj["choices"], obj["answer"]
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        return None, None, "needs choices as a list of at least two non-empty strings"
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        return None, None, f"has answer {answer!r}; give the index of the right choice, 0 to {len(choices) - 1}"
    return kind, (prompt, tuple(choices), answer), None


def parse_task_file(name: str, data: bytes) -> UserTask:
    """Validate a JSONL task file; every problem (the first few) is reported with its line number."""
    if len(data) > MAX_TASK_BYTES:
        raise HeadroomError(f"task file {name} is {len(data) / 2**20:.1f} MiB; the limit is {MAX_TASK_BYTES >> 20} MiB")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise HeadroomError(f"task file {name} is not UTF-8 (line {line}); save it as UTF-8") from None
    problems: list[str] = []
    items: list[Any] = []
    kinds: dict[str, int] = {}  # kind -> first line
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"line {number} is not valid JSON ({e.msg}, column {e.colno})")
            continue
        kind, item, problem = _item(obj)
        if problem:
            problems.append(f"line {number} {problem}")
            continue
        kinds.setdefault(kind, number)
        items.append(item)
    if len(kinds) > 1:
        problems.append(
            f"line {kinds[CHOICE]} is a multiple-choice item but line {kinds[EXACT]} is an exact-match item; "
            "put each kind in its own file"
        )
    if problems:
        more = f" (and {len(problems) - MAX_ERRORS} more)" if len(problems) > MAX_ERRORS else ""
        raise HeadroomError(f"task file {name}: " + "; ".join(problems[:MAX_ERRORS]) + more)
    if not items:
        raise HeadroomError(f"task file {name} has no items; give one JSON object per line")
    stem = _NAME.sub("_", Path(name).stem.lower()).strip("_") or "task"
    return UserTask(stem, hashlib.sha256(data).hexdigest(), next(iter(kinds)), tuple(items))


def load_task_file(path: str | Path) -> UserTask:
    path = Path(path)
    if not path.is_file():
        raise HeadroomError(f"task file {path} does not exist; give a JSONL file of prompt/target items")
    if path.stat().st_size > MAX_TASK_BYTES:
        raise HeadroomError(f"task file {path.name} is larger than {MAX_TASK_BYTES >> 20} MiB; split it")
    return parse_task_file(path.name, path.read_bytes())


def score_user_task(
    lm: LoadedModel, task: UserTask, mask: Mask | None = None, progress: Progress | None = None
) -> UserTaskResult:
    step = progress_steps(progress, len(task.items))
    correct: list[bool] = []
    with apply_mask(lm.arch, mask):
        for item in task.items:
            if task.kind == EXACT:
                correct.append(exact_match(lm, item.prompt, item.target))
            else:
                prompt, choices, answer = item
                logliks = choice_logliks(lm, prompt, choices)
                correct.append(max(range(len(choices)), key=logliks.__getitem__) == answer)
            step()
    return UserTaskResult(
        name=task.name,
        file_sha256=task.sha256,
        kind=task.kind,
        items=len(correct),
        correct=sum(correct),
        accuracy=sum(correct) / len(correct),
        item_correct=tuple(correct),
        mask=mask_summary(mask),
    )


def cached_user_task(
    lm: LoadedModel,
    task: UserTask,
    mask: Mask | None = None,
    cache: DiskCache | None = None,
    progress: Progress | None = None,
    refresh: bool = False,
) -> UserTaskResult:
    """:func:`score_user_task`, keyed by the file's content (never its path) and the mask."""
    mask_key = (mask or Mask.unpruned(lm.shape, "")).cache_key()
    parts = {**lm.cache_key(), "file_sha256": task.sha256, "version": TASK_VERSION, "mask": mask_key}
    value = (cache or DiskCache()).json(
        "user_task", parts, lambda: score_user_task(lm, task, mask, progress).to_json(), refresh
    )
    return UserTaskResult.from_json({**value, "name": task.name})
