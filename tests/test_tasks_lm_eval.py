"""lm-evaluation-harness scores a compact export on the written tasks exactly as Headroom scores the masked model.

lm-eval is not a dependency of Headroom (it pulls in datasets, evaluate, sacrebleu and more); the
test runs it from wherever it is installed: ``$HEADROOM_LM_EVAL`` (the ``lm_eval`` executable of a
separate venv: ``python3 -m venv v && v/bin/pip install torch 'lm-eval[hf]'``) or ``lm_eval`` on the
PATH, and skips when there is none. It runs offline: the tasks read local JSONL files.
"""

from __future__ import annotations

import glob
import json
import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from analysis import tasks
from analysis.export import export_model
from analysis.intervention import apply_mask
from analysis.lm_eval_tasks import passkey_task_name, write_lm_eval
from analysis.task_files import load_task_file, score_user_task
from analysis.task_scoring import encode_pair, greedy_match, target_logits, target_loglik
from tests.char_model import char_lm, generate, pruned

LM_EVAL = os.environ.get("HEADROOM_LM_EVAL") or shutil.which("lm_eval")
LIMIT = 8  # items per task that lm-eval scores

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not LM_EVAL,
        reason="lm_eval not found: install lm-eval[hf] in a separate venv and set HEADROOM_LM_EVAL to its lm_eval",
    ),
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def lm_eval_samples(out: Path, task: str) -> list[tuple[float, bool]]:
    """(log-likelihood, is greedy) of every request of ``task``, in document order."""
    (path,) = glob.glob(str(out / "*" / f"samples_{task}_*.jsonl"))
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    docs = sorted((json.loads(line) for line in lines), key=lambda d: d["doc_id"])
    return [(float(ll), greedy == "True") for d in docs for ll, greedy in d["filtered_resps"]]


def lm_eval_accuracy(out: Path, task: str) -> float:
    (path,) = glob.glob(str(out / "*" / "results_*.json"))
    return json.loads(Path(path).read_text(encoding="utf-8"))["results"][task]["acc,none"]


def test_lm_eval_scores_the_export_as_headroom_scores_the_masked_model(tmp_path):
    lm = char_lm()
    mask = pruned(lm)
    export_model(lm, mask, tmp_path / "export")

    # A user task half right by construction: the masked model's own greedy continuations, and the
    # same with the last character changed; a multiple-choice task between the two, answer alternating.
    prompts = [article[:40].rstrip() for article in tasks.eval_articles()[:4]]
    right = [generate(lm, p, 4, mask) for p in prompts]
    wrong = [r[:-1] + ("a" if r[-1] != "a" else "b") for r in right]
    exact = write_jsonl(
        tmp_path / "copy.jsonl",
        [{"prompt": p, "target": t} for p, r, w in zip(prompts, right, wrong, strict=True) for t in (r, w)],
    )
    pairs = zip(prompts, right, wrong, strict=True)
    choice = write_jsonl(
        tmp_path / "pick.jsonl",
        [{"prompt": p, "choices": [r, w], "answer": i % 2} for i, (p, r, w) in enumerate(pairs)],
    )
    user = (load_task_file(exact), load_task_file(choice))
    written = write_lm_eval(lm, tmp_path / "tasks", user)
    assert written.tasks == (passkey_task_name(512), "headroom_last_word", "headroom_user_copy", "headroom_user_pick")

    command = shlex.split(written.command.replace("pretrained=EXPORT", f"pretrained={tmp_path / 'export'}"))
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    run = subprocess.run(
        [LM_EVAL, *command[1:], "--limit", str(LIMIT), "--log_samples", "--output_path", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stderr[-3000:]

    passkey_items = [i for d in tasks.PASSKEY_DEPTHS for i in tasks.passkey_items(lm, 512, d, 1, 0)]
    last_items = tasks.last_word_items(lm)[:LIMIT]
    with apply_mask(lm.arch, mask):
        for name, items in ((passkey_task_name(512), passkey_items), ("headroom_last_word", last_items)):
            theirs = lm_eval_samples(out, name)
            assert len(theirs) == len(items)
            for item, (ll, greedy) in zip(items, theirs, strict=True):
                context, target = encode_pair(lm, item.prompt, item.target)
                logits = target_logits(lm, context, target)
                assert greedy == greedy_match(logits, target)
                assert ll == pytest.approx(target_loglik(logits, target), rel=1e-4, abs=1e-4)
    headroom = tasks.passkey(lm, mask, lengths=(512,))
    assert lm_eval_accuracy(out, passkey_task_name(512)) == headroom.accuracy
    for task in user:
        ours = score_user_task(lm, task, mask).accuracy
        assert ours == 0.5
        assert lm_eval_accuracy(out, f"headroom_user_{task.name}") == ours
