"""The task suite: the built-in tasks by name, cached on disk, several at once with one progress bar.

A task's cache key is the model (fingerprint and dtype), the task's name, :data:`TASK_VERSION`, its
parameters with the defaults filled in (so omitting one or giving its default is the same entry)
and the mask's cache key. The continuation task's reference (the unpruned model's continuations)
is cached once and shared by every mask.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch

from analysis.cache import DiskCache
from analysis.errors import HeadroomError
from analysis.evaluation import Progress
from analysis.loading import LoadedModel
from analysis.long_context import LongContextResult, long_ppl
from analysis.masks import Mask
from analysis.task_scoring import TASK_VERSION
from analysis.tasks import (
    CONTINUATION,
    ContinuationResult,
    InductionResult,
    LastWordResult,
    PasskeyResult,
    continuation,
    greedy_continuations,
    induction,
    last_word,
    passkey,
)

BUILT_IN = ("passkey", "induction", "last_word", "continuation", "long_ppl")

TaskResult = PasskeyResult | InductionResult | LastWordResult | ContinuationResult | LongContextResult
_TASKS: dict[str, tuple[Callable[..., TaskResult], type]] = {
    "passkey": (passkey, PasskeyResult),
    "induction": (induction, InductionResult),
    "last_word": (last_word, LastWordResult),
    "continuation": (continuation, ContinuationResult),
    "long_ppl": (long_ppl, LongContextResult),
}


def check_task_names(names: Sequence[str]) -> list[str]:
    unknown = [n for n in names if n not in _TASKS]
    if unknown or not names:
        raise HeadroomError(f"unknown task {', '.join(unknown) or '(none given)'}; choose among {', '.join(BUILT_IN)}")
    return list(dict.fromkeys(names))


def _key(lm: LoadedModel, name: str, mask: Mask | None, params: dict[str, Any]) -> dict[str, Any]:
    """Cache key parts of task ``name`` with ``params`` given (defaults filled in, so omitting one changes nothing)."""
    defaults = {
        p.name: p.default
        for p in inspect.signature(_TASKS[name][0]).parameters.values()
        if p.default is not inspect.Parameter.empty and p.name not in ("mask", "progress", "reference")
    }
    full = {k: list(v) if isinstance(v, tuple) else v for k, v in {**defaults, **params}.items()}
    mask = mask or Mask.unpruned(lm.shape, "")
    return {**lm.cache_key(), "task": name, "version": TASK_VERSION, "params": full, "mask": mask.cache_key()}


def cached_task(
    lm: LoadedModel,
    name: str,
    mask: Mask | None = None,
    cache: DiskCache | None = None,
    progress: Progress | None = None,
    refresh: bool = False,
    **params: Any,
) -> TaskResult:
    """Task ``name`` under ``mask`` with ``params`` (the task function's keywords), from the disk cache when seen."""
    run, cls = _TASKS[check_task_names([name])[0]]
    cache = cache or DiskCache()
    if name == "continuation":  # the unpruned continuations are shared by every mask
        ref_params = {k: params.get(k, v) for k, v in CONTINUATION.items()}
        reference = cache.json(
            "task_reference",
            _key(lm, name, None, ref_params),
            lambda: greedy_continuations(lm, None, **ref_params).tolist(),
            refresh,
        )
        run_params = {**params, "reference": torch.tensor(reference)}
    else:
        run_params = params
    value = cache.json(
        "task", _key(lm, name, mask, params), lambda: run(lm, mask, progress=progress, **run_params).to_json(), refresh
    )
    return cls.from_json(value)


def stored_task(
    lm: LoadedModel, name: str, mask: Mask | None = None, cache: DiskCache | None = None
) -> TaskResult | None:
    """Task ``name`` with its default parameters under ``mask`` if the disk cache has it, else None (nothing runs)."""
    value = (cache or DiskCache()).get_json("task", _key(lm, check_task_names([name])[0], mask, {}))
    return None if value is None else _TASKS[name][1].from_json(value)


def run_suite(
    lm: LoadedModel,
    names: Sequence[str] = BUILT_IN,
    mask: Mask | None = None,
    cache: DiskCache | None = None,
    progress: Progress | None = None,
    refresh: bool = False,
) -> dict[str, TaskResult]:
    """Every task of ``names`` with its default parameters.

    Progress is in thousandths of a task: task ``i`` half done reports ``(1000 * i + 500, 1000 * len(names))``.
    """
    names = check_task_names(names)
    total = 1000 * len(names)

    def within(i: int) -> Progress | None:
        return (lambda done, of: progress(1000 * i + 1000 * done // of, total)) if progress else None

    return {name: cached_task(lm, name, mask, cache, within(i), refresh) for i, name in enumerate(names)}
