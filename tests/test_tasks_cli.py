"""``python -m analysis tasks``: the suite under a mask, user task files and lm-eval files (tiny character model)."""

from __future__ import annotations

import json

import pytest

import analysis.cli.main as cli
from analysis import tasks
from analysis.loading import load_model
from analysis.task_files import load_task_file, score_user_task
from tests.char_model import pruned, save_char_model

pytestmark = pytest.mark.usefixtures("cache_dir")  # every test gets its own empty result cache


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("chars") / "tiny-chars"
    save_char_model(directory)
    return directory


def run(capsys, *args: str) -> tuple[int, dict | str, str]:
    code = cli.main(["tasks", *args])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if "--json" in args and code == 0 else out), err


def test_tasks_json_equals_the_tasks_run_directly(capsys, tmp_path, model_dir):
    lm = load_model(str(model_dir))
    mask = pruned(lm)
    mask.save(tmp_path / "mask.json")
    items = tmp_path / "copy.jsonl"
    items.write_text('{"prompt": "Hello", "target": " world"}\n{"prompt": "The pass key is", "target": " 1"}\n')
    args = ("--model", str(model_dir), "--mask", str(tmp_path / "mask.json"), "--tasks", "induction")
    code, out, err = run(capsys, *args, "--task-file", str(items), "--json")
    assert code == 0, err
    induction = tasks.induction(lm, mask)
    user = score_user_task(lm, load_task_file(items), mask)
    assert out["tasks"]["induction"] == json.loads(json.dumps(induction.to_json()))
    assert out["tasks"]["user:copy"]["item_correct"] == list(user.item_correct)
    assert out["headline"] == {
        "induction accuracy": induction.accuracy,
        "copy accuracy": user.accuracy,
    }
    assert out["mask"] == mask.summary() and "tasks" in err  # the progress bar

    code, text, _ = run(capsys, *args)
    assert code == 0 and f"induction accuracy: {induction.accuracy}" in text
    assert "tasks:\n  induction (every number with --json)" in text


def test_write_lm_eval_writes_the_files_and_the_command(capsys, tmp_path, model_dir):
    code, out, err = run(capsys, "--model", str(model_dir), "--write-lm-eval", str(tmp_path / "lm"), "--json")
    assert code == 0, err
    assert out["tasks"] == ["headroom_passkey_512", "headroom_last_word"]
    assert out["command"].startswith("lm_eval --model hf --model_args pretrained=EXPORT,trust_remote_code=True")
    assert sorted(p.name for p in (tmp_path / "lm").iterdir()) == sorted(
        f"{t}.{ext}" for t in out["tasks"] for ext in ("yaml", "jsonl")
    )


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--tasks", "passkee"), "unknown task passkee; choose among passkey"),
        (("--task-file", "missing.jsonl"), "task file missing.jsonl does not exist"),
    ],
)
def test_bad_task_arguments_stop_before_the_model_loads(capsys, extra, message):
    code, _, err = run(capsys, "--model", "no-such-model", *extra)
    assert code == 2 and err.startswith(f"error: {message}") and len(err.strip().splitlines()) == 1
