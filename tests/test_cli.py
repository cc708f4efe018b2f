"""The headless CLI: ``python -m analysis eval`` output, its result cache, and its error contract."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import transformers.utils.logging as hf_logging

import analysis.cli.main as cli
import analysis.evaluation as evaluation
import analysis.harp as harp
import analysis.head_map as head_map
from analysis.corpus import Windows, load_text, make_windows
from analysis.errors import HeadroomError
from analysis.evaluation import perplexity
from analysis.loading import load_model
from analysis.mask_files import parse_mask
from analysis.masks import Mask
from tests.helpers import TINY, forbid, save_checkpoint, word_text, word_tokenizer

ROOT = Path(__file__).resolve().parent.parent
SEQLEN = 16
N_WORDS = 410  # 25 windows of 16 words, 10 words of remainder dropped


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny Llama with a BOS-adding word tokenizer: one word is one token."""
    directory = tmp_path_factory.mktemp("cli") / "tiny-llama"
    save_checkpoint(directory, "llama", bos=True)
    return directory


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("texts") / "words.txt"
    path.write_text(word_text(N_WORDS, seed=3), encoding="utf-8")
    return path


pytestmark = pytest.mark.usefixtures("cache_dir")  # every test gets its own empty result cache


def run_eval(capsys, *args: str) -> dict:
    code = cli.main(["eval", *args, "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)  # exactly one JSON object, nothing else on stdout


def eval_args(model: Path, text: Path, *extra: str) -> list[str]:
    return ["--model", str(model), "--text", str(text), "--seqlen", str(SEQLEN), *extra]


def direct_perplexity(model: Path, text: Path, mask_obj: dict | None = None):
    """analysis.evaluation.perplexity on the protocol windows of ``text``, without the CLI."""
    lm = load_model(str(model))
    windows = make_windows(lm.tokenizer, load_text(str(text)), SEQLEN, None, lm.max_positions)
    mask = parse_mask(mask_obj, lm.shape, lm.name) if mask_obj else Mask.unpruned(lm.shape, lm.name)
    return lm, windows, perplexity(lm.arch, windows, mask)


def mask_json(
    pruned: list[tuple[int, int]], layers: int = TINY["num_hidden_layers"], heads: int = TINY["num_attention_heads"]
) -> dict:
    rows = [[1] * heads for _ in range(layers)]
    for layer, head in pruned:
        rows[layer][head] = 0
    return {"format": "headroom.mask", "version": 1, "heads": rows}


# --- eval output -------------------------------------------------------------------------------------


def test_eval_json_reports_protocol_perplexity_with_its_metadata(capsys, checkpoint, text_file):
    out = run_eval(capsys, *eval_args(checkpoint, text_file))
    lm, windows, direct = direct_perplexity(checkpoint, text_file)

    required = {"perplexity", "mean_nll", "predicted_tokens", "seqlen", "text", "text_sha256", "model", "mask"}
    assert required | {"budget"} <= set(out)
    assert out["perplexity"] == direct.perplexity
    assert out["mean_nll"] == direct.mean_nll
    assert math.isclose(out["perplexity"], math.exp(out["mean_nll"]), rel_tol=1e-12)
    # BOS tokenizer: every chunk token of the 25 whole windows is predicted; the remainder is dropped.
    assert windows.has_bos
    assert out["predicted_tokens"] == (N_WORDS // SEQLEN) * SEQLEN == 400
    # The windows are [BOS] + consecutive 16-token chunks of the text tokenized once without specials.
    ids = word_tokenizer()(text_file.read_text(), add_special_tokens=False).input_ids
    assert windows.input_ids[:, 0].eq(lm.tokenizer.bos_token_id).all()
    assert windows.input_ids[:, 1:].flatten().tolist() == ids[:400]
    # And transformers' own causal-LM loss on those windows is the same mean NLL.
    with torch.no_grad():
        loss = lm.model(input_ids=windows.input_ids, labels=windows.input_ids).loss.item()
    assert out["mean_nll"] == pytest.approx(loss, rel=1e-5)
    assert out["seqlen"] == SEQLEN
    assert out["text"] == text_file.name
    assert out["text_sha256"] == load_text(str(text_file)).sha256
    assert out["mask"] == "unpruned"
    assert out["model"] == lm.card()
    assert out["model"]["family"] == "Llama"
    budget = out["budget"]
    assert budget["seqlen"] == SEQLEN
    assert budget["params_removed"] == 0
    assert budget["params_total"] == lm.card()["parameters"]
    assert budget["kv_bytes_per_token_saved"] == 0


def test_eval_without_bos_does_not_predict_the_first_chunk_token(capsys, tmp_path, text_file):
    directory = tmp_path / "no-bos"
    save_checkpoint(directory, "llama", bos=False)
    out = run_eval(capsys, *eval_args(directory, text_file))
    assert out["predicted_tokens"] == (N_WORDS // SEQLEN) * (SEQLEN - 1) == 375
    assert out["perplexity"] == direct_perplexity(directory, text_file)[2].perplexity


def test_max_tokens_keeps_the_first_windows(capsys, checkpoint, text_file):
    out = run_eval(capsys, *eval_args(checkpoint, text_file, "--max-tokens", "100"))
    assert out["predicted_tokens"] == (100 // SEQLEN) * SEQLEN == 96

    lm, full, _ = direct_perplexity(checkpoint, text_file)
    first = Windows(full.input_ids[: 100 // SEQLEN], SEQLEN, full.has_bos, full.text_name, full.text_sha256)
    expected = perplexity(lm.arch, first).perplexity
    assert out["perplexity"] == pytest.approx(expected, rel=1e-12)
    assert out["perplexity"] != run_eval(capsys, *eval_args(checkpoint, text_file))["perplexity"]


def test_mask_file_changes_perplexity_and_budget(capsys, tmp_path, checkpoint, text_file):
    unpruned = run_eval(capsys, *eval_args(checkpoint, text_file))
    obj = mask_json([(1, 2)])
    mask_file = tmp_path / "one-head.json"
    mask_file.write_text(json.dumps(obj))
    out = run_eval(capsys, *eval_args(checkpoint, text_file, "--mask", str(mask_file)))

    assert out["perplexity"] != unpruned["perplexity"]
    assert out["perplexity"] == direct_perplexity(checkpoint, text_file, obj)[2].perplexity
    assert out["mask"] == {"pruned_heads": 1, "drop_qk": [], "alpha": {}}
    assert out["predicted_tokens"] == unpruned["predicted_tokens"]
    card, budget = out["model"], out["budget"]
    # One query head of a group whose other heads stay: its q_proj rows and o_proj columns go, no K/V.
    assert budget["params_removed"] == 2 * card["head_dim"] * card["hidden_size"]
    assert budget["params_removed_pct"] == pytest.approx(100 * budget["params_removed"] / card["parameters"])
    assert budget["kv_bytes_per_token_saved"] == 0
    assert budget["attention_flops_per_token_saved"] > 0


def test_a_v2_mask_with_bias_is_evaluated_and_its_bias_counted(capsys, tmp_path, checkpoint, text_file):
    plain = mask_json([(1, 2)])
    biased = {**plain, "version": 2, "bias": {"1": [0.01 * i for i in range(TINY["hidden_size"])]}}
    for name, obj in (("plain", plain), ("biased", biased)):
        (tmp_path / f"{name}.json").write_text(json.dumps(obj))
    without = run_eval(capsys, *eval_args(checkpoint, text_file, "--mask", str(tmp_path / "plain.json")))
    out = run_eval(capsys, *eval_args(checkpoint, text_file, "--mask", str(tmp_path / "biased.json")))
    assert out["perplexity"] == direct_perplexity(checkpoint, text_file, biased)[2].perplexity
    assert out["perplexity"] != without["perplexity"]
    assert out["mask"]["bias_layers"] == [1]
    # This family has no o_proj bias: the mask's adds hidden_size parameters.
    assert out["budget"]["params_removed"] == without["budget"]["params_removed"] - TINY["hidden_size"]


def test_pruning_a_whole_kv_group_saves_kv_cache(capsys, tmp_path, checkpoint, text_file):
    mask_file = tmp_path / "group.json"
    mask_file.write_text(json.dumps(mask_json([(0, 0), (0, 1), (0, 2)])))  # group size 6 / 2 = 3
    out = run_eval(capsys, *eval_args(checkpoint, text_file, "--mask", str(mask_file)))
    head_dim, hidden = out["model"]["head_dim"], out["model"]["hidden_size"]
    assert out["mask"]["pruned_heads"] == 3
    assert out["budget"]["kv_bytes_per_token_saved"] == 2 * head_dim * 4  # K and V, float32, one layer
    # q_proj rows and o_proj columns of 3 heads, and the k_proj and v_proj rows of their KV head.
    assert out["budget"]["params_removed"] == (3 + 3 + 1 + 1) * head_dim * hidden


def test_text_output_lists_the_result(capsys, checkpoint, text_file):
    assert cli.main(["eval", *eval_args(checkpoint, text_file)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert any(line.startswith("perplexity: ") for line in lines)
    assert "model:" in lines and "budget:" in lines
    assert "  family: Llama" in lines


# --- result cache ------------------------------------------------------------------------------------


def test_second_identical_run_is_served_from_the_cache(capsys, monkeypatch, cache_dir, checkpoint, text_file):
    first = run_eval(capsys, *eval_args(checkpoint, text_file))
    entries = list((cache_dir / "results" / "perplexity").glob("*.json"))
    assert len(entries) == 1
    assert json.loads(entries[0].read_text())["value"]["perplexity"] == first["perplexity"]

    def must_not_run(*args, **kwargs):
        raise AssertionError("perplexity was recomputed instead of read from the cache")

    monkeypatch.setattr(evaluation, "perplexity", must_not_run)
    second = run_eval(capsys, *eval_args(checkpoint, text_file))
    del first["seconds"], second["seconds"]
    assert second == first

    # Other parameters are other results, never the cached one.
    with pytest.raises(AssertionError, match="recomputed"):
        cli.main(["eval", *eval_args(checkpoint, text_file, "--max-tokens", "100"), "--json"])


def test_no_cache_recomputes_and_refreshes_the_entry(capsys, monkeypatch, cache_dir, checkpoint, text_file):
    first = run_eval(capsys, *eval_args(checkpoint, text_file))
    calls = []
    real = evaluation.perplexity

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluation, "perplexity", counting)
    again = run_eval(capsys, *eval_args(checkpoint, text_file, "--no-cache"))
    assert calls == [1]
    assert again["perplexity"] == first["perplexity"]
    assert len(list((cache_dir / "results" / "perplexity").glob("*.json"))) == 1


def test_changing_the_tokenizer_is_not_served_a_stale_result(capsys, tmp_path, text_file):
    directory = tmp_path / "m"
    save_checkpoint(directory, "llama", bos=True)
    before = run_eval(capsys, *eval_args(directory, text_file))
    # Same weights and config; the words now map to other token ids.
    word_tokenizer(bos=True, shuffle_seed=7).save_pretrained(directory)
    expected = direct_perplexity(directory, text_file)[2]
    assert expected.perplexity != before["perplexity"]
    after = run_eval(capsys, *eval_args(directory, text_file))
    assert after["perplexity"] == expected.perplexity


def test_cached_result_reports_the_current_text_name(capsys, tmp_path, checkpoint, text_file):
    copy = tmp_path / "same-words-other-name.txt"
    copy.write_bytes(text_file.read_bytes())
    first = run_eval(capsys, *eval_args(checkpoint, text_file))
    second = run_eval(capsys, *eval_args(checkpoint, copy))
    assert second["perplexity"] == first["perplexity"]
    assert second["text"] == copy.name


# --- errors ------------------------------------------------------------------------------------------


@pytest.fixture
def progress_bars_on():
    """transformers' default: its progress bars (e.g. 'Loading weights') are on."""
    was = hf_logging.is_progress_bar_enabled()
    hf_logging.enable_progress_bar()
    yield
    if not was:
        hf_logging.disable_progress_bar()


def _error_case(name: str, tmp: Path, checkpoint: Path, text: Path) -> tuple[list[str], str]:
    if name == "bad-mask-json":
        bad = tmp / "bad.json"
        bad.write_text('{"format": "headroom.mask", "version": 1,')
        return eval_args(checkpoint, text, "--mask", str(bad)), f"mask file {bad} is not valid JSON"
    if name == "missing-text":
        missing = tmp / "no-such-text.txt"
        return eval_args(checkpoint, missing), f"text file {missing} does not exist"
    if name == "seqlen-0":
        return ["--model", str(checkpoint), "--text", str(text), "--seqlen", "0"], "seqlen must be at least"
    if name == "wrong-model-mask":
        mask = tmp / "other.json"
        mask.write_text(json.dumps(mask_json([], layers=30)))
        return eval_args(checkpoint, text, "--mask", str(mask)), f"'heads' must have {TINY['num_hidden_layers']} rows"
    if name == "max-tokens-below-seqlen":
        return eval_args(checkpoint, text, "--max-tokens", "8"), (
            "arguments --max-tokens, --seqlen: max-tokens 8 is smaller than one window of 16"
        )
    if name == "seqlen-beyond-context":
        args = ["--model", str(checkpoint), "--text", str(text), "--seqlen", "200"]
        return args, f"seqlen 200 is longer than the model's context of {TINY['max_position_embeddings']} positions"
    assert name == "nonexistent-model"
    missing = tmp / "no-such-model"
    return eval_args(missing, text), f"model path {missing} does not exist"


AFTER_LOAD = ["bad-mask-json", "missing-text", "seqlen-0", "wrong-model-mask"]  # the model loads first
ERROR_CASES = [*AFTER_LOAD, "max-tokens-below-seqlen", "seqlen-beyond-context", "nonexistent-model"]


@pytest.mark.parametrize("case", ERROR_CASES)
def test_user_error_exits_2_with_an_error_line(capsys, tmp_path, checkpoint, text_file, case):
    argv, expected = _error_case(case, tmp_path, checkpoint, text_file)
    code = cli.main(["eval", *argv, "--json"])
    out, err = capsys.readouterr()
    assert code == 2
    assert out == ""
    assert "Traceback" not in err
    last = err.splitlines()[-1]
    assert last.startswith("error: ")
    assert expected in last


@pytest.mark.usefixtures("progress_bars_on")
@pytest.mark.parametrize("case", [*AFTER_LOAD, "nonexistent-model"])
def test_user_error_is_exactly_one_line_on_stderr(capsys, tmp_path, checkpoint, text_file, case):
    argv, expected = _error_case(case, tmp_path, checkpoint, text_file)
    assert cli.main(["eval", *argv]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: ")
    assert expected in err


def test_the_error_names_the_option_of_this_command_that_the_setting_came_from(capsys, checkpoint, text_file):
    """The backend names its setting (max_tokens, targets); the CLI names its own option for it."""
    common = ["--model", str(checkpoint), "--calib", str(text_file), "--seqlen", str(SEQLEN)]
    assert cli.main(["search", *common, "--save", "kv:-3"]) == 2
    assert capsys.readouterr().err.startswith("error: argument --save: budget 'kv:-3' must be AXIS:AMOUNT")
    # A setting this command has no option for is not attributed to any.
    assert cli._options(HeadroomError("x", settings=("kind", "seqlen")), cli.build_parser().parse_args(["eval"])) == (
        "argument --seqlen: "
    )


def test_cuda_without_a_gpu_exits_2(capsys, monkeypatch, checkpoint, text_file):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["eval", *eval_args(checkpoint, text_file, "--device", "cuda")]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == ["error: argument --device: a CUDA GPU was asked for but none is available; use the CPU"]


def test_debug_raises_the_error_with_its_traceback(tmp_path, text_file):
    with pytest.raises(HeadroomError, match="does not exist"):
        cli.main(["eval", *eval_args(tmp_path / "no-such-model", text_file), "--debug"])


def test_interrupt_exits_130_without_a_traceback(capsys, monkeypatch, checkpoint, text_file):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "load_model", interrupted)
    assert cli.main(["eval", *eval_args(checkpoint, text_file)]) == 130
    err = capsys.readouterr().err
    assert err.startswith("error: interrupted")
    assert "Traceback" not in err


def test_no_partial_cache_entry_on_failure(capsys, monkeypatch, cache_dir, checkpoint, text_file):
    def failing(*args, **kwargs):
        raise HeadroomError("simulated failure")

    monkeypatch.setattr(evaluation, "perplexity", failing)
    assert cli.main(["eval", *eval_args(checkpoint, text_file)]) == 2
    assert "error: simulated failure" in capsys.readouterr().err
    assert list(cache_dir.rglob("results/**/*.json")) == []


# --- real subprocesses -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture(scope="module", autouse=True)
def _cli_processes(tmp_path_factory, text_file):
    """``python -m analysis ...`` in real processes, started when the module starts.

    Each process pays the torch import (seconds), so they all run while the in-process tests do.
    """
    tmp = tmp_path_factory.mktemp("subprocess")
    commands = {
        "missing-model": ["eval", *eval_args(tmp / "no-such-model", text_file)],
        "debug": ["eval", *eval_args(tmp / "no-such-model", text_file), "--debug"],
        "help": ["--help"],
    }
    env = {**os.environ, "HEADROOM_CACHE": str(tmp / "cache")}
    env.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)
    procs = {
        name: (
            argv,
            subprocess.Popen(
                [sys.executable, "-m", "analysis", *argv],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            ),
        )
        for name, argv in commands.items()
    }
    yield procs
    for _, proc in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def cli_runs(_cli_processes) -> dict[str, Run]:
    runs = {}
    for name, (argv, proc) in _cli_processes.items():
        out, err = proc.communicate(timeout=180)
        runs[name] = Run(argv, proc.returncode, out, err)
    return runs


def test_subprocess_user_error_is_one_line_without_traceback(cli_runs):
    run = cli_runs["missing-model"]
    missing = run.argv[run.argv.index("--model") + 1]
    assert run.returncode == 2
    assert run.stdout == ""
    assert "Traceback" not in run.stderr
    assert run.stderr.splitlines() == [
        f"error: model path {missing} does not exist or is not a directory or .gguf file"
    ]


def test_subprocess_debug_shows_the_traceback(cli_runs):
    run = cli_runs["debug"]
    assert run.returncode not in (0, 2)
    assert "Traceback (most recent call last)" in run.stderr
    assert "analysis.errors.HeadroomError: model path" in run.stderr


def test_help_documents_the_command(cli_runs):
    run = cli_runs["help"]
    assert run.returncode == 0
    assert run.stdout.startswith("usage: python -m analysis")
    assert "eval" in run.stdout
    assert "protocol perplexity" in run.stdout


def test_eval_help_documents_every_option(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["eval", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m analysis eval")
    options = ["--model", "--device", "--device-map", "--trust-remote-code", "--json", "--debug"]
    options += ["--text", "--encoding", "--seqlen", "--max-tokens", "--mask", "--no-cache"]
    for option in options:
        assert f"  {option}" in out, option
    for phrase in ("default-eval", "N // seqlen", "a v1 mask JSON file", "default 256", "{cpu,cuda,auto}"):
        assert phrase in out, phrase


def test_trust_remote_code_flag_reaches_the_loader(capsys, monkeypatch, checkpoint, text_file):
    seen: list[bool] = []
    real = cli.load_model

    def recording(*args, **kwargs):
        seen.append(kwargs["trust_remote_code"])
        return real(*args, **kwargs)

    monkeypatch.setattr(cli, "load_model", recording)
    run_eval(capsys, *eval_args(checkpoint, text_file))
    run_eval(capsys, *eval_args(checkpoint, text_file, "--trust-remote-code"))
    assert seen == [False, True]


# --- harp ----------------------------------------------------------------------------------------------


def run_harp(capsys, *args: str) -> tuple[int, dict | None, str]:
    code = cli.main(["harp", *args, "--json"])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if code == 0 else None), err


def test_harp_writes_a_mask_whose_calibration_perplexity_it_reports(
    capsys, monkeypatch, tmp_path, checkpoint, text_file
):
    out_file = tmp_path / "harp.json"
    args = ["--model", str(checkpoint), "--calib", str(text_file), "--seqlen", str(SEQLEN), "--max-tokens", "160"]
    code, out, err = run_harp(capsys, *args, "--layers", "2", "--grid", "0,0.5,1", "--out", str(out_file))
    assert code == 0, err
    assert set(out["alpha"]) == {"2", "3"} and all(v in (0.0, 0.5, 1.0) for v in out["alpha"].values())
    assert [(s["layer"], s["alpha"]) for s in out["trace"]] == [
        (3, 0.0),
        (3, 0.5),
        (3, 1.0),
        (2, 0.0),
        (2, 0.5),
        (2, 1.0),
    ]
    saved = json.loads(out_file.read_text())
    assert saved["drop_qk"] == [2, 3] and saved["alpha"] == {k: v for k, v in out["alpha"].items() if v != 1.0}
    code = cli.main(
        ["eval", *eval_args(checkpoint, text_file, "--max-tokens", "160", "--mask", str(out_file)), "--json"]
    )
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["perplexity"] == pytest.approx(out["calib_perplexity"], rel=1e-6)
    assert out["budget"]["kv_bytes_per_token_saved"] == out["budget"]["kv_bytes_per_token_unpruned"] // 2

    # The same search again comes from the cache, with the same numbers.
    forbid(monkeypatch, harp, "harp")
    code, again, _ = run_harp(capsys, *args, "--layer-set", "2,3", "--grid", "1,0.5,0")
    assert code == 0 and again["alpha"] == out["alpha"] and again["calib_perplexity"] == out["calib_perplexity"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--layers", "2", "--grid", ""], "argument --grid: the alpha grid is empty"),
        (["--layers", "9"], "argument --layers: the number of top layers must be between 1 and 4"),
        (["--layer-set", "1,7"], "must name layers in 0..3"),
        (["--layers", "2", "--out", "/no/such/folder/m.json"], "folder /no/such/folder does not exist"),
    ],
)
def test_harp_bad_arguments_are_one_line_errors(capsys, checkpoint, text_file, extra, message):
    code, _, err = run_harp(capsys, "--model", str(checkpoint), "--calib", str(text_file), "--seqlen", "16", *extra)
    assert code == 2
    assert err.strip().splitlines()[-1].startswith("error: ") and message in err


# --- rescale -------------------------------------------------------------------------------------------


def test_rescale_writes_the_norm_matching_mask_and_reports_its_held_out_perplexity(
    capsys, tmp_path, checkpoint, text_file
):
    from analysis.rescale import rescale

    lm = load_model(str(checkpoint))
    (tmp_path / "m.json").write_text(json.dumps(mask_json([(3, 0), (3, 1)])))
    args = ["--model", str(checkpoint), "--calib", str(text_file), "--seqlen", str(SEQLEN), "--max-tokens", "160"]
    args += ["--mask", str(tmp_path / "m.json"), "--eval", str(text_file), "--eval-max-tokens", "96"]
    code = cli.main(["rescale", *args, "--closed-form", "--out", str(tmp_path / "r.json"), "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    result = json.loads(out)
    calib = make_windows(lm.tokenizer, load_text(str(text_file)), SEQLEN, 160, lm.max_positions)
    direct = rescale(lm.arch, parse_mask(mask_json([(3, 0), (3, 1)]), lm.shape, lm.name), calib, search=False)
    assert result["alpha"] == {"3": direct.alpha[3]} and direct.alpha[3] != 1.0
    assert json.loads((tmp_path / "r.json").read_text())["alpha"] == {"3": direct.alpha[3]}
    held_out = make_windows(lm.tokenizer, load_text(str(text_file)), SEQLEN, 96, lm.max_positions)
    assert result["eval_perplexity"] == perplexity(lm.arch, held_out, direct.mask).perplexity
    assert result["mask_file"] == str(tmp_path / "r.json") and result["model"] == lm.card()
    # A held-out request too short for one window names the option it came from.
    assert cli.main(["rescale", *args[:-1], "8", "--closed-form"]) == 2
    assert capsys.readouterr().err.startswith("error: arguments --eval-max-tokens, --seqlen: max-tokens 8 is smaller")


# --- compare -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("axis", ["params", "kv", "flops"])
def test_compare_matches_every_baseline_to_harp_on_the_chosen_axis(capsys, tmp_path, checkpoint, text_file, axis):
    held_out = tmp_path / "held_out.txt"
    held_out.write_text(word_text(200, seed=11), encoding="utf-8")
    common = ["--model", str(checkpoint), "--seqlen", str(SEQLEN), "--calib", str(text_file), "--max-tokens", "160"]
    common += ["--layers", "2", "--grid", "0,0.5,1"]
    held_out_args = ["--eval", str(held_out), "--eval-max-tokens", "160"]
    code = cli.main(["compare", *common, *held_out_args, "--match", axis, "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    result = json.loads(out)
    rows = {row["method"]: row for row in result["rows"]}
    assert {"unpruned", "harp", "harp-norm-matching-alpha", "drop_qk-alpha1", "drop_qk-alpha0"} <= set(rows)
    key = {"params": "params_removed", "kv": "kv_bytes_per_token_saved", "flops": "attention_flops_per_token_saved"}[
        axis
    ]
    target = rows["harp"]["budget"][key]
    matched = [
        r
        for name, r in rows.items()
        if name.split("-")[0] in ("wanda_sp", "magnitude", "flap_wifv", "gradient", "block_influence")
    ]
    assert matched, "no baseline could be matched"
    assert all(r["budget"][key] >= target for r in matched)
    assert rows["unpruned"]["budget"][key] == 0
    # The HARP row's perplexity is the protocol perplexity of the HARP mask on the held-out windows.
    harp_mask = tmp_path / "harp.json"
    assert cli.main(["harp", *common, "--out", str(harp_mask)]) == 0
    capsys.readouterr()
    evaluated = run_eval(capsys, *eval_args(checkpoint, held_out, "--max-tokens", "160", "--mask", str(harp_mask)))
    assert evaluated["perplexity"] == pytest.approx(rows["harp"]["eval_perplexity"], rel=1e-6)


# --- importance ----------------------------------------------------------------------------------------


def test_importance_prints_one_row_per_layer_and_null_outside_the_chosen_layers(capsys, checkpoint, text_file):
    from analysis.loss_metrics import ablation

    args = ["--model", str(checkpoint), "--text", str(text_file), "--seqlen", str(SEQLEN), "--max-tokens", "160"]
    code = cli.main(["importance", *args, "--metric", "ablation", "--layers", "3,2", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    result = json.loads(out)
    assert result["metric"] == "ablation" and len(result["scores"]) == TINY["num_hidden_layers"]
    assert result["scores"][0] is None and result["scores"][1] is None
    lm = load_model(str(checkpoint))
    windows = make_windows(lm.tokenizer, load_text(str(text_file)), SEQLEN, 160, lm.max_positions)
    direct = ablation(lm.arch, windows, layers=[2, 3])
    for layer in (2, 3):
        assert result["scores"][layer] == pytest.approx(direct[layer].tolist(), abs=1e-9)
    code = cli.main(["importance", *args, "--metric", "ablation", "--layers", "9", "--json"])
    assert code == 2 and "must name layers in 0..3" in capsys.readouterr().err


# --- drift ---------------------------------------------------------------------------------------------


def test_drift_reports_the_mask_and_for_drop_qk_the_unrescaled_variant(capsys, tmp_path, checkpoint, text_file):
    from analysis.drift import layer_drift

    lm = load_model(str(checkpoint))
    mask = Mask.unpruned(lm.shape, lm.name).with_layer(3, drop_qk=True, alpha=0.3)
    mask.save(tmp_path / "m.json")
    args = ["--model", str(checkpoint), "--text", str(text_file), "--seqlen", str(SEQLEN), "--max-tokens", "160"]
    code = cli.main(["drift", *args, "--mask", str(tmp_path / "m.json"), "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    result = json.loads(out)
    windows = make_windows(lm.tokenizer, load_text(str(text_file)), SEQLEN, 160, lm.max_positions)
    assert result["mask"]["kl_nats_per_token"] == pytest.approx(layer_drift(lm.arch, windows, mask).kl_nats_per_token)
    unscaled = layer_drift(lm.arch, windows, mask.with_layer(3, alpha=1.0))
    assert result["without_rescaling"]["kl_nats_per_token"] == pytest.approx(unscaled.kl_nats_per_token)
    assert len(result["mask"]["layers"]) == TINY["num_hidden_layers"]
    code = cli.main(["drift", *args, "--mask", str(tmp_path / "m.json")])  # the text table
    assert code == 0 and "KL(unpruned || masked)" in capsys.readouterr().out


# --- head map ------------------------------------------------------------------------------------------


def test_head_map_lists_every_head_once_and_a_second_run_is_the_same_map(capsys, monkeypatch, checkpoint, text_file):
    args = ["--model", str(checkpoint), "--text", str(text_file), "--seqlen", str(SEQLEN), "--max-tokens", "160"]
    code = cli.main(["head-map", *args, "--metrics", "magnitude,wanda_sp", "--clusters", "3", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    result = json.loads(out)
    heads = TINY["num_hidden_layers"] * TINY["num_attention_heads"]
    members = [h for group in result["cluster_members"].values() for h in group]
    assert len(members) == len(set(members)) == heads and len(result["cluster_members"]) == 3
    assert result["map"]["feature_names"][-2:] == ["magnitude", "wanda_sp"]
    forbid(monkeypatch, head_map, "project")  # the second run comes from the cache
    assert cli.main(["head-map", *args, "--metrics", "magnitude,wanda_sp", "--clusters", "3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["map"] == result["map"]
    code = cli.main(["head-map", *args, "--metrics", "magnitude,bogus"])
    assert code == 2 and "unknown metric(s) bogus" in capsys.readouterr().err
