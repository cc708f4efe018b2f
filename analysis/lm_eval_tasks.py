"""The built-in tasks (and user task files) written out for lm-evaluation-harness.

Each task becomes an lm-eval task YAML beside a local JSONL data file, with ``output_type:
loglikelihood`` (metric ``acc``: the target is the greedy continuation, exactly Headroom's exact
match, :mod:`analysis.task_scoring`) or ``multiple_choice`` (``acc``: the choice of highest
log-likelihood). So the field's standard harness scores an export offline on exactly the items
Headroom scores::

    lm_eval --model hf --model_args pretrained=EXPORT,trust_remote_code=True,dtype=float32 \\
        --include_path DIR --tasks headroom_passkey_2k,headroom_last_word --batch_size 1

Passkey filler is cut in the model's tokens, so the files belong to that tokenizer. Not written:
induction (random token ids, not text), continuation (it compares two models) and long-context
perplexity (lm-eval's rolling loglikelihood windows differ from the protocol's).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from analysis.corpus import adds_bos
from analysis.errors import HeadroomError
from analysis.files import atomic_write_text
from analysis.loading import LoadedModel
from analysis.task_files import CHOICE, EXACT, UserTask
from analysis.task_scoring import TASK_VERSION
from analysis.tasks import PASSKEY_DEPTHS, PASSKEY_LENGTHS, filler_tokens, last_word_items, passkey_items


@dataclass(frozen=True)
class LmEvalTasks:
    """What :func:`write_lm_eval` wrote: the folder, the task names and the command that scores them."""

    folder: str
    tasks: tuple[str, ...]
    skipped_passkey_lengths: tuple[int, ...]  # longer than the model's context
    command: str

    def to_json(self) -> dict[str, Any]:
        return {
            "folder": self.folder,
            "tasks": list(self.tasks),
            "skipped_passkey_lengths": list(self.skipped_passkey_lengths),
            "command": self.command,
        }


def length_label(tokens: int) -> str:
    """512 -> '512', 2048 -> '2k'."""
    return f"{tokens // 1024}k" if tokens % 1024 == 0 else str(tokens)


def passkey_task_name(tokens: int) -> str:
    return f"headroom_passkey_{length_label(tokens)}"


def _yaml(name: str, data: Path, multiple_choice: bool) -> str:
    """An lm-eval task over a local JSONL file (JSON strings are valid YAML scalars)."""
    lines = [
        f"task: {name}",
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        f"    test: {json.dumps(str(data.resolve()))}",
        "test_split: test",
        f"output_type: {'multiple_choice' if multiple_choice else 'loglikelihood'}",
        "doc_to_text: prompt",
        f"doc_to_target: {'answer' if multiple_choice else 'target'}",
        *(["doc_to_choice: choices"] if multiple_choice else []),
        'target_delimiter: ""',
        "metric_list:",
        "  - metric: acc",
        "    aggregation: mean",
        "    higher_is_better: true",
        "metadata:",
        f"  version: {TASK_VERSION}.0",
    ]
    return "\n".join(lines) + "\n"


def _write_task(out: Path, name: str, rows: list[dict[str, Any]], multiple_choice: bool = False) -> str:
    data = out / f"{name}.jsonl"
    atomic_write_text(data, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    atomic_write_text(out / f"{name}.yaml", _yaml(name, data, multiple_choice))
    return name


def lm_eval_command(lm: LoadedModel, folder: str | Path, tasks: tuple[str, ...], export: str = "EXPORT") -> str:
    """The lm_eval command line scoring ``export`` on ``tasks``, as Headroom scores them.

    float32 and batch size 1 (no padding) keep the numbers Headroom's; ``add_bos_token`` follows
    the tokenizer, since lm-eval adds no BOS token to a causal model unless told to.
    """
    args = f"pretrained={export},trust_remote_code=True,dtype=float32"
    if adds_bos(lm.tokenizer):
        args += ",add_bos_token=True"
    return f"lm_eval --model hf --model_args {args} --include_path {folder} --tasks {','.join(tasks)} --batch_size 1"


def write_lm_eval(
    lm: LoadedModel,
    out: str | Path,
    user_tasks: tuple[UserTask, ...] = (),
    samples: int = 1,
    seed: int = 0,
) -> LmEvalTasks:
    """Write lm-eval task YAMLs and their JSONL data into folder ``out`` (created if missing).

    One task per passkey context length that fits the model (``headroom_passkey_2k``: every depth of
    :data:`analysis.tasks.PASSKEY_DEPTHS`, the same items as the passkey task with this ``samples`` and
    ``seed``), ``headroom_last_word`` (the last-word task's items) and ``headroom_user_<file stem>``
    per user task.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise HeadroomError(f"{out} exists and is not a folder; give a folder for the lm-eval tasks")
    if not out.parent.is_dir():
        raise HeadroomError(f"folder {out.parent} does not exist; create it first")
    out.mkdir(exist_ok=True)
    names = []
    fit = [n for n in PASSKEY_LENGTHS if lm.max_positions is None or n <= lm.max_positions]
    filler = filler_tokens(lm)
    for length in fit:
        items = [i for depth in PASSKEY_DEPTHS for i in passkey_items(lm, length, depth, samples, seed, filler)]
        rows = [{"prompt": i.prompt, "target": i.target} for i in items]
        names.append(_write_task(out, passkey_task_name(length), rows))
    last = [{"prompt": i.prompt, "target": i.target} for i in last_word_items(lm)]
    names.append(_write_task(out, "headroom_last_word", last))
    for task in user_tasks:
        if task.kind == EXACT:
            rows = [{"prompt": i.prompt, "target": i.target} for i in task.items]
        else:
            rows = [{"prompt": p, "choices": list(c), "answer": a} for p, c, a in task.items]
        names.append(_write_task(out, f"headroom_user_{task.name}", rows, task.kind == CHOICE))
    return LmEvalTasks(
        folder=str(out.resolve()),
        tasks=tuple(names),
        skipped_passkey_lengths=tuple(n for n in PASSKEY_LENGTHS if n not in fit),
        command=lm_eval_command(lm, out.resolve(), tuple(names)),
    )
