"""User task files (validation, scoring, caching) and the lm-eval task files, on the tiny character model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from analysis import tasks
from analysis.cache import DiskCache
from analysis.errors import HeadroomError
from analysis.lm_eval_tasks import length_label, write_lm_eval
from analysis.task_files import CHOICE, EXACT, cached_user_task, parse_task_file, score_user_task
from tests.char_model import char_lm, generate, pruned


@pytest.fixture(scope="module")
def lm():
    return char_lm()


def jsonl(*rows: object) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "has no items"),
        (b"\xff\xfe", "is not UTF-8 (line 1)"),
        (b'{"prompt": "a", "target": " b"}\n{oops\n', "line 2 is not valid JSON"),
        (jsonl([1, 2]), "line 1 is a JSON list, not an object"),
        (jsonl({"prompt": "a", "answer": " b"}), "has keys ['answer', 'prompt']; give either prompt and target"),
        (jsonl({"prompt": " ", "target": " b"}), "line 1 has an empty or non-string prompt"),
        (jsonl({"prompt": "a", "target": 3}), "line 1 has an empty or non-string target"),
        (jsonl({"prompt": "a", "choices": ["x"], "answer": 0}), "at least two non-empty strings"),
        (jsonl({"prompt": "a", "choices": ["x", "y"], "answer": 2}), "has answer 2; give the index"),
        (jsonl({"prompt": "a", "choices": ["x", "y"], "answer": True}), "has answer True"),
        (
            jsonl({"prompt": "a", "target": " b"}, {"prompt": "a", "choices": ["x", "y"], "answer": 0}),
            "line 2 is a multiple-choice item but line 1 is an exact-match item",
        ),
        (jsonl(*[[0]] * 7), "(and 2 more)"),
    ],
)
def test_bad_task_files_are_refused_with_the_line_and_what_to_do(data, message):
    with pytest.raises(HeadroomError, match=r"task file bad\.jsonl") as error:
        parse_task_file("bad.jsonl", data)
    assert message in str(error.value)


def test_user_tasks_are_scored_by_greedy_generation_and_by_choice_likelihood(lm):
    mask = pruned(lm)
    prompts = ["The pass key is", "Paris is in", "Hello"]
    right = [generate(lm, p, 3, mask) for p in prompts]
    rows = [{"prompt": p, "target": r} for p, r in zip(prompts, right, strict=True)]
    rows.append({"prompt": "Hello", "target": right[2][:-1] + ("x" if right[2][-1] != "x" else "y")})
    exact = parse_task_file("My Copy-Task.jsonl", jsonl(*rows))
    assert (exact.name, exact.kind) == ("my_copy_task", EXACT)
    result = score_user_task(lm, exact, mask)
    assert result.item_correct == (True, True, True, False) and result.accuracy == 0.75

    # the greedy continuation beats a copy with its last character changed (same prefix, argmax last)
    choices = parse_task_file(
        "pick.jsonl", jsonl({"prompt": "Hello", "choices": [rows[3]["target"], right[2]], "answer": 1})
    )
    assert choices.kind == CHOICE and score_user_task(lm, choices, mask).item_correct == (True,)


def test_user_task_cache_is_keyed_by_content_and_mask(lm, tmp_path):
    cache = DiskCache(tmp_path)
    task = parse_task_file("a.jsonl", jsonl({"prompt": "Hello", "target": " world"}))
    renamed = parse_task_file("b.jsonl", jsonl({"prompt": "Hello", "target": " world"}))
    first = cached_user_task(lm, task, None, cache)
    assert cached_user_task(lm, renamed, None, cache).name == "b"
    cached_user_task(lm, task, pruned(lm), cache)
    assert len(list((tmp_path / "results" / "user_task").iterdir())) == 2
    assert first == score_user_task(lm, task)


def test_lm_eval_files_hold_the_headroom_items(lm, tmp_path):
    user = parse_task_file("pick.jsonl", jsonl({"prompt": "Hi", "choices": [" a", " b"], "answer": 1}))
    written = write_lm_eval(lm, tmp_path / "lm", (user,))
    assert written.tasks == ("headroom_passkey_512", "headroom_last_word", "headroom_user_pick")
    assert written.skipped_passkey_lengths == (1024, 2048, 4096, 8192)  # the model has 600 positions
    assert f"--include_path {tmp_path / 'lm'} --tasks {','.join(written.tasks)}" in written.command
    for name in written.tasks:
        config = yaml.safe_load((tmp_path / "lm" / f"{name}.yaml").read_text())
        data = Path(config["dataset_kwargs"]["data_files"]["test"]).read_text(encoding="utf-8")
        rows = [json.loads(line) for line in data.splitlines()]
        assert config["task"] == name and config["target_delimiter"] == ""
        if name == "headroom_user_pick":
            assert config["output_type"] == "multiple_choice" and rows == [
                {"prompt": "Hi", "choices": [" a", " b"], "answer": 1}
            ]
        elif name == "headroom_last_word":
            assert rows == [{"prompt": i.prompt, "target": i.target} for i in tasks.last_word_items(lm)]
        else:
            items = [i for d in tasks.PASSKEY_DEPTHS for i in tasks.passkey_items(lm, 512, d, 1, 0)]
            assert config["output_type"] == "loglikelihood" and rows == [
                {"prompt": i.prompt, "target": i.target} for i in items
            ]


def test_lm_eval_folder_problems_are_refused(lm, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(HeadroomError, match="exists and is not a folder"):
        write_lm_eval(lm, tmp_path / "file")
    with pytest.raises(HeadroomError, match="does not exist; create it first"):
        write_lm_eval(lm, tmp_path / "missing" / "lm")


def test_length_labels():
    assert [length_label(n) for n in (512, 1024, 2048, 8192, 1500)] == ["512", "1k", "2k", "8k", "1500"]
