"""Exports: compact and stock Hugging Face directories that plain transformers loads in a fresh process.

The fresh process runs from a temporary folder with no PYTHONPATH, so it cannot import this project:
what it loads is only what the export directory holds.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from itertools import pairwise
from pathlib import Path

import pytest
import torch
from transformers import CONFIG_MAPPING, AutoModelForCausalLM

from analysis.architecture import Architecture
from analysis.budget import budget
from analysis.cache import DiskCache
from analysis.cli.main import main
from analysis.corpus import default_text, make_windows
from analysis.errors import HeadroomError
from analysis.evaluation import perplexity
from analysis.export import export_model
from analysis.export_folder import CARD_FILE, MASK_FILE
from analysis.harp import top_layers
from analysis.intervention import apply_mask
from analysis.loading import LoadedModel, load_model
from analysis.mask_files import load_mask
from analysis.masks import Mask
from analysis.pruned_model import layer_structure
from tests.helpers import (
    FAMILY_TYPES,
    IDS,
    TINY,
    every_kind_of_pruning,
    masked_logits_and_greedy,
    open_page,
    random_windows,
    save_checkpoint,
    tiny_lm,
    tree,
    word_text,
    word_tokenizer,
)
from ui import session

ROOT = Path(__file__).resolve().parent.parent

# Run in a fresh interpreter: load each export, then report logits, cache contents, generations, parameters.
FRESH = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM
directories, ids, remote = json.loads(sys.argv[1]), torch.tensor(json.loads(sys.argv[2])), sys.argv[3] == "remote"
reports = []
for directory in directories:
    model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=remote, dtype=torch.float32)
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits
        cache = model(input_ids=ids, use_cache=True).past_key_values
        prompt = ids[:1, :6]
        cached = model.generate(prompt, max_new_tokens=10, do_sample=False, use_cache=True)
        uncached = model.generate(prompt, max_new_tokens=10, do_sample=False, use_cache=False)
    reports.append({
        "logits": logits.tolist(),
        "cache_heads": [None if layer.keys is None else layer.keys.shape[1] for layer in cache.layers],
        "cached": cached.tolist(),
        "uncached": uncached.tolist(),
        "params": sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()),
        "class": type(model).__name__,
    })
project = sorted(m for m in sys.modules if m.split(".")[0] in ("analysis", "tests", "ui"))
print(json.dumps({"reports": reports, "project_modules": project}))
"""


def fresh_load(directories: list[Path], ids: torch.Tensor, tmp_path: Path, remote: bool = True) -> dict:
    """Load ``directories`` in one new Python that cannot see this project; return what FRESH reports."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "hf-modules")
    script = tmp_path / "fresh.py"
    script.write_text(FRESH, encoding="utf-8")
    cwd = tmp_path / "elsewhere"
    cwd.mkdir(exist_ok=True)
    names = json.dumps([str(d) for d in directories])
    args = [sys.executable, "-I", str(script), names, json.dumps(ids.tolist()), "remote" if remote else "-"]
    done = subprocess.run(args, capture_output=True, text=True, cwd=cwd, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def compact_exports(tmp_path_factory) -> dict[str, tuple]:
    """Every family's compact export of ``every_kind_of_pruning``, loaded in one fresh process."""
    tmp = tmp_path_factory.mktemp("compact")
    exports = {}
    for model_type in FAMILY_TYPES:
        lm = tiny_lm(model_type)
        mask = every_kind_of_pruning(lm)
        exports[model_type] = (lm, mask, export_model(lm, mask, tmp / model_type))
    fresh = fresh_load([tmp / t for t in FAMILY_TYPES], IDS, tmp)
    assert fresh["project_modules"] == []  # the fresh process never imported this project
    return {t: (*exports[t], got) for t, got in zip(FAMILY_TYPES, fresh["reports"], strict=True)}


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_compact_export_loads_in_a_fresh_process_and_matches_the_masked_model(compact_exports, model_type):
    lm, mask, _, got = compact_exports[model_type]
    assert got["class"] == f"Headroom{type(lm.model).__name__}"
    logits, greedy = masked_logits_and_greedy(lm, mask, IDS)
    assert (torch.tensor(got["logits"]) - logits).abs().max() < 1e-4
    assert got["cached"] == got["uncached"] == greedy


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_compact_export_keeps_only_kept_kv_heads_in_the_cache_and_the_budgets_parameters(compact_exports, model_type):
    lm, mask, result, got = compact_exports[model_type]
    layers = layer_structure(mask, lm.arch)
    assert [layer.kind for layer in layers] == ["attention", "attention", "drop_qk", "none"]
    assert got["cache_heads"] == [1, 2, None, None]  # kept KV heads only; no cache without attention
    removed = budget(mask, lm.shape, 20).params_removed
    assert got["params"] == result.params_after == lm.shape.total_params - removed


@pytest.mark.parametrize("model_type", ["llama", "gemma2"])  # alpha folds into o_proj / the post-attention norm
def test_stock_export_loads_without_remote_code_and_matches_the_masked_model(tmp_path, model_type):
    lm = tiny_lm(model_type)
    mask = every_kind_of_pruning(lm).with_layer(2, drop_qk=False)
    result = export_model(lm, mask, tmp_path / "stock", "stock")
    config = json.loads((tmp_path / "stock" / "config.json").read_text())
    assert "auto_map" not in config and config["model_type"] == model_type
    assert not list((tmp_path / "stock").glob("*.py"))
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "stock", dtype=torch.float32)
    with torch.no_grad():
        got = stock(input_ids=IDS, use_cache=False).logits
    logits, _ = masked_logits_and_greedy(lm, mask, IDS)
    assert (got - logits).abs().max() < 1e-4
    assert result.params_after == result.params_before == lm.shape.total_params  # zeros, not removed


@pytest.mark.parametrize("kind", ["compact", "stock"])
def test_export_leaves_the_shared_model_exactly_as_loaded(tmp_path, kind):
    lm = tiny_lm("gemma2")  # alpha folds into the post-attention norm, which the export shares otherwise
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    export_model(lm, every_kind_of_pruning(lm).with_layer(2, drop_qk=False), tmp_path / kind, kind)
    after = lm.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_stock_export_refuses_drop_qk_and_points_to_compact(tmp_path):
    lm = tiny_lm("llama")
    with pytest.raises(HeadroomError, match="Use the compact kind"):
        export_model(lm, every_kind_of_pruning(lm), tmp_path / "stock", "stock")
    assert not (tmp_path / "stock").exists()


# --- mask v2: the o_proj bias ------------------------------------------------------------------------


def with_biases(lm: LoadedModel, mask: Mask) -> Mask:
    """A different random o_proj bias on every layer: attention, attention, drop-QK, and a removed branch."""
    g = torch.Generator().manual_seed(5)
    for layer in range(lm.shape.num_layers):
        mask = mask.with_bias(layer, torch.randn(lm.shape.hidden_size, generator=g).tolist())
    return mask


def biased_lm() -> LoadedModel:
    """A tiny Llama whose o_proj has a bias of its own (``attention_bias``), nonzero."""
    config = CONFIG_MAPPING["llama"](**TINY, attention_bias=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval().requires_grad_(False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    return LoadedModel(model, word_tokenizer(), Architecture(model), "tiny-llama-biased", "b" * 16, "test")


@pytest.fixture(scope="module")
def biased_exports(tmp_path_factory) -> dict[str, tuple]:
    """Every family's compact export of ``every_kind_of_pruning`` with a bias on every layer, plus a layer whose
    heads are all pruned (its output is its bias alone), loaded in one fresh process."""
    tmp = tmp_path_factory.mktemp("biased")
    exports = {}
    for model_type in FAMILY_TYPES:
        lm = tiny_lm(model_type)
        exports[model_type] = (lm, with_biases(lm, every_kind_of_pruning(lm)))
    lm = tiny_lm("llama")
    exports["no-heads"] = (lm, with_biases(lm, every_kind_of_pruning(lm).with_heads([(1, h) for h in range(6)], False)))
    lm = biased_lm()
    exports["o-bias"] = (lm, with_biases(lm, every_kind_of_pruning(lm)))
    for name, (lm, mask) in exports.items():
        exports[name] = (lm, mask, export_model(lm, mask, tmp / name))
    fresh = fresh_load([tmp / name for name in exports], IDS, tmp)
    assert fresh["project_modules"] == []
    return {name: (*exports[name], got) for name, got in zip(exports, fresh["reports"], strict=True)}


@pytest.mark.parametrize("name", [*FAMILY_TYPES, "no-heads", "o-bias"])
def test_compact_export_folds_the_masks_bias_and_matches_the_masked_model_in_a_fresh_process(biased_exports, name):
    lm, mask, result, got = biased_exports[name]
    logits, greedy = masked_logits_and_greedy(lm, mask, IDS)
    with torch.no_grad(), apply_mask(lm.arch, replace(mask, bias=())):
        assert (lm.model(input_ids=IDS, use_cache=False).logits - logits).abs().max() > 1e-3  # the bias matters
    assert (torch.tensor(got["logits"]) - logits).abs().max() < 1e-4
    assert got["cached"] == got["uncached"] == greedy
    # The budget counts a new o_proj bias as parameters; the export has exactly the parameters it says.
    assert got["params"] == result.params_after == lm.shape.total_params - budget(mask, lm.shape, 20).params_removed
    saved = json.loads((Path(result.path) / MASK_FILE).read_text())
    assert saved["version"] == 2 and load_mask(Path(result.path) / MASK_FILE, lm.shape, lm.name) == mask


def test_stock_export_folds_the_bias_where_o_proj_has_one_and_otherwise_points_to_compact(tmp_path):
    lm = biased_lm()
    mask = with_biases(lm, every_kind_of_pruning(lm).with_layer(2, drop_qk=False))
    export_model(lm, mask, tmp_path / "stock", "stock")
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "stock", dtype=torch.float32)
    with torch.no_grad():
        got = stock(input_ids=IDS, use_cache=False).logits
    logits, _ = masked_logits_and_greedy(lm, mask, IDS)
    assert (got - logits).abs().max() < 1e-4
    plain = tiny_lm("qwen2")
    with pytest.raises(HeadroomError, match=r"o_proj has no bias\. Use the compact kind"):
        export_model(plain, with_biases(plain, Mask.unpruned(plain.shape, plain.name)), tmp_path / "no", "stock")
    assert not (tmp_path / "no").exists()


def test_an_earlier_export_is_replaced_only_with_force_and_nothing_is_left_behind(tmp_path):
    lm = tiny_lm("qwen2")
    out = tmp_path / "export"
    export_model(lm, Mask.unpruned(lm.shape, lm.name).with_head(0, 0, False), out)
    earlier = tree(tmp_path)
    mask = every_kind_of_pruning(lm)
    with pytest.raises(HeadroomError, match="ask to replace it") as info:
        export_model(lm, mask, out)
    assert info.value.settings == ("force",)
    assert tree(tmp_path) == earlier
    export_model(lm, mask, out, force=True)
    assert load_mask(out / MASK_FILE, lm.shape, lm.name) == mask
    assert os.listdir(tmp_path) == ["export"]  # no staging or old copies


def _earlier_export(lm: LoadedModel, folder: Path) -> Path:
    export_model(lm, Mask.unpruned(lm.shape, lm.name).with_head(1, 1, False), folder)
    return folder


def _plain_folder(folder: Path) -> None:
    folder.mkdir()
    (folder / "mine.txt").write_text("keep me")


def _with_a_sub_folder(folder: Path) -> None:
    (folder / "notes").mkdir()
    (folder / "notes" / "mine.txt").write_text("keep me")


def _with_a_linked_file(folder: Path) -> None:
    (folder.parent / "mine.txt").write_text("keep me")
    (folder / "extra.txt").symlink_to(folder.parent / "mine.txt")


def _without_weights(folder: Path) -> None:
    for weights in folder.glob("*.safetensors"):
        weights.unlink()


def _with_a_foreign_mask_file(folder: Path) -> None:
    (folder / MASK_FILE).write_text('{"format": "something else"}')


def _link_to_an_export(folder: Path, lm: LoadedModel) -> None:
    _earlier_export(lm, folder.parent / "elsewhere")
    folder.symlink_to(folder.parent / "elsewhere", target_is_directory=True)


def _link_to_a_file(folder: Path) -> None:
    (folder.parent / "mine.txt").write_text("keep me")
    folder.symlink_to(folder.parent / "mine.txt")


NOT_EXPORTS = {
    "a plain folder": (_plain_folder, "not a Headroom export"),
    "an export with a sub-folder": (_with_a_sub_folder, "a folder or link"),
    "an export with a linked file": (_with_a_linked_file, "a folder or link"),
    "an export without weights": (_without_weights, "no weights"),
    "an export whose mask file is not a mask": (_with_a_foreign_mask_file, "not a Headroom mask"),
    "a link to an earlier export": (_link_to_an_export, "symbolic link"),
    "a link to a file": (_link_to_a_file, "symbolic link"),
}


@pytest.mark.parametrize("case", NOT_EXPORTS)
def test_replacing_anything_but_an_earlier_export_is_refused_and_deletes_nothing(tmp_path, case):
    lm = tiny_lm("llama")
    make, message = NOT_EXPORTS[case]
    out = tmp_path / "export"
    if make in (_with_a_sub_folder, _with_a_linked_file, _without_weights, _with_a_foreign_mask_file):
        _earlier_export(lm, out)
    if make is _link_to_an_export:
        make(out, lm)
    else:
        make(out)
    before = tree(tmp_path)
    with pytest.raises(HeadroomError, match=message) as refused:
        export_model(lm, every_kind_of_pruning(lm), out, force=True)
    assert "nothing was deleted" in str(refused.value) or "symbolic link" in str(refused.value)
    assert tree(tmp_path) == before


def test_a_folder_that_stops_being_an_export_while_the_export_is_built_is_kept(tmp_path):
    """check_destination passes, then (mid-export) the earlier export is swapped for the user's own folder."""
    lm = tiny_lm("llama")
    out = _earlier_export(lm, tmp_path / "export")

    def swap(done: int, total: int) -> None:
        if done == 1:  # the export is built; it has not been moved into place yet
            shutil.rmtree(out)
            _plain_folder(out)

    with pytest.raises(HeadroomError, match="not a Headroom export"):
        export_model(lm, every_kind_of_pruning(lm), out, force=True, progress=swap)
    assert os.listdir(tmp_path) == ["export"] and tree(out) == {"mine.txt": b"keep me"}


def test_a_failing_export_leaves_the_earlier_export_untouched(tmp_path, monkeypatch):
    lm = tiny_lm("llama")
    out = _earlier_export(lm, tmp_path / "export")
    before = tree(tmp_path)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(lm.tokenizer, "save_pretrained", broken)
    with pytest.raises(OSError, match="disk full"):
        export_model(lm, every_kind_of_pruning(lm), out, force=True)
    assert tree(tmp_path) == before


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ("file", "not a folder"),
        ("missing/export", "does not exist"),
        ("", "empty"),
        ("file/export", "does not exist"),
        ("new\x00name", "control character"),
        ("new\nname", "control character"),
        ("n" * 201, "201 bytes long"),
    ],
)
def test_invalid_destinations_are_refused_with_what_to_do(tmp_path, where, message):
    (tmp_path / "file").write_text("x")
    lm = tiny_lm("llama")
    with pytest.raises(HeadroomError, match=message):
        export_model(lm, every_kind_of_pruning(lm), str(tmp_path / where) if where else "")
    assert sorted(os.listdir(tmp_path)) == ["file"]


def test_model_card_names_source_mask_budget_perplexities_and_command(tmp_path):
    lm = tiny_lm("gemma3_text")
    mask = every_kind_of_pruning(lm)
    windows = random_windows()
    steps = []
    result = export_model(
        lm,
        mask,
        tmp_path / "export",
        windows=windows,
        cache=DiskCache(tmp_path / "cache"),
        command="python -m analysis export --mask m.json --out export",
        progress=lambda done, total: steps.append((done, total)),
    )
    card = (tmp_path / "export" / CARD_FILE).read_text()
    assert load_mask(tmp_path / "export" / MASK_FILE, lm.shape, lm.name) == mask
    b = budget(mask, lm.shape, windows.seqlen)
    for fact in (lm.fingerprint, f"{b.params_removed:,}", f"{b.kv_bytes_per_token:,}", windows.text_sha256):
        assert fact in card
    assert f"{b.attention_flops_per_token_saved:,}" in card and "python -m analysis export --mask m.json" in card
    assert result.perplexity_before.perplexity == pytest.approx(perplexity(lm.arch, windows).perplexity, rel=1e-6)
    assert result.perplexity_after.perplexity == pytest.approx(perplexity(lm.arch, windows, mask).perplexity, rel=1e-6)
    assert f"{result.perplexity_after.perplexity:.4f}" in card
    assert steps[-1][0] == steps[-1][1] and all(a <= b for (a, _), (b, _) in pairwise(steps))


def test_cli_export_writes_the_folder_and_refuses_to_overwrite_in_one_line(tmp_path, capsys):
    save_checkpoint(tmp_path / "tiny")
    lm = load_model(str(tmp_path / "tiny"), cache_root=tmp_path / "cache")
    every_kind_of_pruning(lm).save(tmp_path / "mask.json")
    (tmp_path / "text.txt").write_text(word_text(300), encoding="utf-8")
    argv = ["export", "--model", str(tmp_path / "tiny"), "--mask", str(tmp_path / "mask.json")]
    argv += ["--out", str(tmp_path / "out"), "--text", str(tmp_path / "text.txt"), "--seqlen", "32", "--json"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["path"] == str(tmp_path / "out") and report["kind"] == "compact"
    assert "--kind compact" in report["command"] and "--seqlen 32" in report["command"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: argument --force: ") and "ask to replace it" in err and "\n" not in err
    assert main([*argv, "--force", "--kind", "stock"]) == 2
    assert capsys.readouterr().err.startswith("error: argument --kind: a stock export cannot express")


@pytest.mark.slow
def test_compact_export_of_a_harp_mask_round_trips_perplexity_and_saves_kv(default_model, tmp_path):
    """N = 8 drop-QK layers with the README's HARP alphas: the fresh process's perplexity is the app's."""
    lm = default_model
    alphas = (0.4, 0.1, 0.7, 0.7, 0.4, 0.3, 0.1, 0.0)
    layers = top_layers(lm.shape.num_layers, 8)
    mask = Mask.unpruned(lm.shape, lm.name, lm.fingerprint).with_drop_qk(layers)
    for layer, alpha in zip(layers, alphas, strict=True):
        mask = mask.with_layer(layer, alpha=alpha)
    windows = make_windows(lm.tokenizer, default_text("default-eval"), 256, 256)  # one window: keeps the test short
    result = export_model(lm, mask, tmp_path / "harp8", windows=windows)
    assert result.params_before - result.params_after == budget(mask, lm.shape, 256).params_removed

    script = tmp_path / "ppl.py"
    script.write_text(
        "import json, sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True, dtype=torch.float32)\n"
        "ids = torch.tensor(json.loads(sys.argv[2]))\n"
        "with torch.no_grad():\n"
        "    z = m(input_ids=ids, use_cache=False).logits[:, :-1].double()\n"
        "    nll = torch.nn.functional.cross_entropy(z.flatten(0, 1), ids[:, 1:].flatten(), reduction='sum')\n"
        "    one = m(input_ids=ids[:1, :16], use_cache=True).past_key_values\n"
        "kv = sum(t.numel() * t.element_size() for l in one.layers for t in (l.keys, l.values) if t is not None)\n"
        "print(json.dumps({'nll': nll.item(), 'kv': kv}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_MODULES_CACHE": str(tmp_path / "m")}
    ids = json.dumps(windows.input_ids.tolist())
    done = subprocess.run(
        [sys.executable, "-I", str(script), str(tmp_path / "harp8"), ids],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    in_app = result.perplexity_after.perplexity  # the app's number: cached_perplexity under the mask
    assert math.exp(got["nll"] / windows.predicted_tokens) == pytest.approx(in_app, rel=1e-4)
    full_kv = lm.shape.num_layers * 2 * lm.shape.num_kv_heads * lm.shape.head_dim * 4 * 16  # 16 cached tokens
    assert got["kv"] == full_kv * 22 // 30  # 8 of 30 layers keep no cache


@pytest.mark.slow
def test_export_page_writes_the_export_and_offers_the_mask(default_model, tmp_path):
    mask = Mask.unpruned(default_model.shape, default_model.name).with_drop_qk([29]).with_layer(29, alpha=0.5)
    at = open_page("app_pages/7_Export.py", {session.MASK: mask.to_json(), session.MAX_TOKENS: 512}, timeout_s=300)
    at.run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    at.text_input(key="export_folder").set_value(str(tmp_path / "page-export"))
    at.button(key="export_run").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert load_mask(tmp_path / "page-export" / MASK_FILE, default_model.shape, default_model.name) == mask
    assert any(str(tmp_path / "page-export") in s.value for s in at.success)
    at.button(key="export_run").click().run()  # the folder exists now: refused, shown as an error
    assert "already exists" in at.error[0].value


TOKENIZER_ONLY = r"""
import sys, time
from transformers import AutoTokenizer
start = time.perf_counter()
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
print(time.perf_counter() - start, tokenizer("a b").input_ids)
"""


def test_compact_export_tokenizer_loads_with_no_arguments_and_no_prompt(tmp_path):
    """AutoTokenizer with no arguments, in a fresh process with no terminal and stdin closed: no remote-code prompt."""
    lm = tiny_lm("llama")
    export_model(lm, every_kind_of_pruning(lm), tmp_path / "export")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_MODULES_CACHE": str(tmp_path / "mods")}
    done = subprocess.run(
        [sys.executable, "-I", "-c", TOKENIZER_ONLY, str(tmp_path / "export")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,
        start_new_session=True,  # no controlling terminal
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "custom code" not in done.stdout + done.stderr and "model of type" not in done.stderr
    seconds, ids = done.stdout.strip().split(" ", 1)
    assert ids == str(word_tokenizer()("a b").input_ids) and float(seconds) < 10
