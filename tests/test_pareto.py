"""The Pareto view: the front on hand-made points, the cache enumeration, the named collection, CLI and page."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import pytest

import analysis.cli.main as cli
from analysis.baselines import AXES, saved
from analysis.budget import budget
from analysis.cache import DiskCache
from analysis.errors import HeadroomError
from analysis.evaluation import perplexity
from analysis.harp import cached_harp
from analysis.loading import load_model
from analysis.mask_files import parse_mask
from analysis.masks import Mask
from analysis.pareto import collect, named_masks, pareto, pareto_front, save_named
from analysis.search import cached_search
from tests.helpers import SEQLEN, TOKENS, ok, open_page, save_checkpoint, windows
from ui import session

PAGE = "app_pages/6_Pareto.py"


def dominated(pairs: list[tuple[float, float]], i: int) -> bool:
    """Brute force: some other pair is at least as good on both (lower perplexity, higher saving), better on one."""
    p, s = pairs[i]
    return any(q <= p and t >= s and (q < p or t > s) for j, (q, t) in enumerate(pairs) if j != i)


@pytest.mark.parametrize("seed", range(30))
def test_the_front_is_exactly_the_non_dominated_points(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 25)
    # a coarse grid, so that ties on perplexity, on saving and on both occur
    pairs = [(float(rng.randint(1, 8)), float(rng.randint(0, 6))) for _ in range(n)]
    front = pareto_front(pairs)
    assert set(front) == {i for i in range(n) if not dominated(pairs, i)}
    assert len(front) == len(set(front))
    # by growing saving, perplexity never falls (a point saving more and doing better would dominate)
    ordered = [pairs[i] for i in front]
    assert ordered == sorted(ordered, key=lambda ps: (ps[1], ps[0]))
    assert all(a[0] <= b[0] for a, b in itertools.pairwise(ordered))


def test_a_hand_made_front():
    pairs = [(20.0, 0), (30.0, 100), (25.0, 100), (40.0, 50), (35.0, 300), (35.0, 300), (90.0, 200)]
    assert pareto_front(pairs) == (0, 2, 4, 5)  # both copies of (35, 300) stay; 90 at 200 loses to 35 at 300
    assert pareto_front([]) == ()


def fill(lm, tiny, cache: DiskCache) -> dict[str, Mask]:
    """A HARP run and a search on the calibration text, one HARP run on the evaluation text, a saved mask."""
    calib = windows(lm, tiny[session.CALIB_TEXT])
    harp = cached_harp(lm, calib, [2, 3], (0.0, 0.5, 1.0), cache)
    found = cached_search(lm, calib, {"kv": 64}, SEQLEN, 2, 1, cache)
    cached_harp(
        lm, windows(lm, tiny[session.EVAL_TEXT]), [3], (0.0, 1.0), cache
    )  # calibrated on the eval text: not held out
    hand = Mask.unpruned(lm.shape, lm.name).with_heads([(0, 1), (1, 4)], keep=False)
    save_named(lm, "hand-made", hand, cache)
    return {"HARP top-2": harp.mask, "search kv:64": found.mask, "hand-made": hand}


def test_every_cached_mask_is_a_point_with_its_held_out_perplexity(lm, tiny, tmp_path):
    cache = DiskCache(tmp_path)
    made = fill(lm, tiny, cache)
    evaluation = windows(lm, tiny[session.EVAL_TEXT])
    points = collect(lm, evaluation, cache)
    by_label = {p.label: p for p in points}
    assert set(made) <= set(by_label)
    assert {"unpruned", "HARP top-2, norm-matching alpha"} <= set(by_label)
    assert not any("[3]" in p.label or p.label == "HARP top-1" for p in points)  # the eval-calibrated run is left out
    for label, mask in made.items():
        assert by_label[label].mask.cache_key() == mask.cache_key()
    # a search cached before the alpha walk (no `alpha_phase` in its key) is a point of its own, so labelled
    [(parts, value)] = cache.entries("search", lm.cache_key())
    cache.put_json("search", {k: v for k, v in parts.items() if k != "alpha_phase"}, value)
    assert "search kv:64, whole alpha grid" in {p.label for p in collect(lm, evaluation, cache)}
    for p in points:  # every number is the protocol perplexity and budget of the point's own mask
        assert p.eval_perplexity == pytest.approx(perplexity(lm.arch, evaluation, p.mask).perplexity, rel=1e-9)
        assert p.budget == budget(p.mask, lm.shape, SEQLEN)
    other = DiskCache(tmp_path / "empty")
    assert [p.label for p in collect(lm, evaluation, other)] == ["unpruned"]


def test_entries_of_another_model_or_dtype_and_corrupt_ones_are_not_collected(lm, tiny, tmp_path):
    cache = DiskCache(tmp_path)
    calib = windows(lm, tiny[session.CALIB_TEXT])
    cached_harp(lm, calib, [3], (0.0, 1.0), cache)
    value = next(v for _, v in cache.entries("harp", lm.cache_key()))
    cache.put_json("harp", {**lm.cache_key(), "dtype": "bfloat16", **calib.cache_key(), "layers": [2]}, value)
    cache.put_json("harp", {"model": "other", "dtype": "float32", "layers": [1]}, value)
    (tmp_path / "results" / "harp" / "broken.json").write_text("{not json", encoding="utf-8")
    found = list(cache.entries("harp", lm.cache_key()))
    assert [parts["layers"] for parts, _ in found] == [[3]]
    assert not (tmp_path / "results" / "harp" / "broken.json").exists()  # an invalid entry is removed, as on a read


def test_the_collection_round_trips_and_replaces_by_name(lm, tmp_path):
    cache = DiskCache(tmp_path)
    assert named_masks(lm, cache) == {}
    a = Mask.unpruned(lm.shape, lm.name).with_layer(3, drop_qk=True, alpha=0.25)
    b = Mask.unpruned(lm.shape, lm.name).with_heads([(2, 0)], keep=False).with_bias(2, [0.5] * lm.shape.hidden_size)
    save_named(lm, " first ", a, cache)
    save_named(lm, "second", b, cache)
    got = named_masks(lm, cache)
    assert list(got) == ["first", "second"]
    assert got["first"].cache_key() == a.cache_key() and got["second"].cache_key() == b.cache_key()
    save_named(lm, "first", b, cache)
    assert named_masks(lm, cache)["first"].cache_key() == b.cache_key()
    with pytest.raises(HeadroomError, match="name"):
        save_named(lm, "  ", a, cache)
    other = load_model(str(tiny_other(tmp_path)))
    assert named_masks(other, cache) == {}  # the collection belongs to the model's cache key


def tiny_other(tmp_path: Path) -> Path:
    save_checkpoint(tmp_path / "other", seed=5)
    return tmp_path / "other"


def test_cli_pareto_json_lists_every_point_and_the_front(capsys, lm, tiny, cache_dir):
    fill(lm, tiny, DiskCache(cache_dir))
    args = ["--model", str(tiny[session.MODEL]), "--eval", str(tiny[session.EVAL_TEXT]), "--seqlen", str(SEQLEN)]
    args += ["--max-tokens", str(TOKENS)]
    evaluation = windows(lm, tiny[session.EVAL_TEXT])
    for axis in AXES:
        assert cli.main(["pareto", *args, "--axis", axis, "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["axis"] == axis
        points = out["points"]
        pairs = [(p["eval_perplexity"], float(p["saving"])) for p in points]
        assert set(out["front"]) == {i for i in range(len(points)) if not dominated(pairs, i)}
        for p in points:
            mask = parse_mask(p["mask"], lm.shape, lm.name)
            assert p["eval_perplexity"] == pytest.approx(perplexity(lm.arch, evaluation, mask).perplexity, rel=1e-9)
            assert p["saving"] == saved(budget(mask, lm.shape, SEQLEN), axis)
    assert {"search kv:64", "hand-made", "HARP top-2"} <= {p["label"] for p in points}
    assert cli.main(["pareto", *args, "--axis", "kv"]) == 0  # the text output: the front, one line each
    text = capsys.readouterr().out
    assert text.count("\n  * ") == len(pareto(lm, evaluation, "kv", DiskCache(cache_dir)).front)


def test_pareto_page_shows_the_backend_points_and_a_pick_loads_the_mask(lm, tiny, cache_dir):
    made = fill(lm, tiny, DiskCache(cache_dir))
    at = ok(open_page(PAGE, tiny).run())
    backend = pareto(lm, windows(lm, tiny[session.EVAL_TEXT]), "kv", DiskCache(cache_dir))
    table = at.dataframe[0].value
    assert list(table["mask"]) == [p.label for p in backend.points]
    assert list(table["held-out perplexity"]) == [round(p.eval_perplexity, 3) for p in backend.points]
    assert list(table["KV B/token saved"]) == [p.budget.kv_bytes_per_token_saved for p in backend.points]
    assert [i for i, star in enumerate(table["front"]) if star] == sorted(backend.front)
    at.radio[0].set_value("params").run()
    by_params = pareto(lm, windows(lm, tiny[session.EVAL_TEXT]), "params", DiskCache(cache_dir))
    assert [i for i, star in enumerate(at.dataframe[0].value["front"]) if star] == sorted(by_params.front)
    at.selectbox(key="pareto_pick").set_value([p.label for p in by_params.points].index("search kv:64")).run()
    assert at.session_state[session.MASK]["heads"] == made["search kv:64"].to_json()["heads"]
    assert parse_mask(at.session_state[session.MASK], lm.shape, lm.name).cache_key() == made["search kv:64"].cache_key()
    assert "Loaded 'search kv:64'" in at.success[0].value
    at.text_input(key="pareto_save_name").input("from the page")
    at.button[[b.label for b in at.button].index("Save to the collection")].click().run()
    assert not at.error, [e.value for e in at.error]
    saved_masks = named_masks(lm, DiskCache(cache_dir))
    assert saved_masks["from the page"].cache_key() == made["search kv:64"].cache_key()
