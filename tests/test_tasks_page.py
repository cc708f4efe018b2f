"""The Tasks page through AppTest, on the tiny character model: its numbers equal the suite run directly."""

from __future__ import annotations

import json

import pytest

from analysis.cache import DiskCache
from analysis.loading import load_model
from analysis.task_suite import run_suite
from tests.char_model import pruned, save_char_model
from tests.helpers import ok, open_page
from ui import session

PAGE = "app_pages/8_Tasks.py"
NAMES = ["passkey", "long_ppl"]  # the tasks with a heatmap and a curve; the others add only bars


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("chars") / "tiny-chars"
    save_char_model(directory, max_positions=1100)  # passkey at 512 and 1k, long context at 1k
    return directory


def test_tasks_page_shows_unpruned_and_the_session_mask_as_the_backend_computes_them(tmp_path, cache_dir, model_dir):
    lm = load_model(str(model_dir))
    mask = pruned(lm)
    at = ok(open_page(PAGE, {session.MODEL: str(model_dir), session.MASK: mask.to_json()}).run())
    ok(at.multiselect(key="tasks_names").set_value(NAMES).run())
    assert "Not computed yet for unpruned, current mask" in at.info[0].value
    ok(at.button(key="tasks_run").click().run())
    assert not at.info  # everything computed, nothing left to run

    fresh = DiskCache(tmp_path / "independent")  # computed again, not read from the page's cache
    expected = {label: run_suite(lm, NAMES, m, fresh) for label, m in (("unpruned", None), ("current mask", mask))}
    table = at.dataframe[0].value
    assert list(table.index) == ["unpruned", "current mask"]
    for label, results in expected.items():
        headline = {k: v for r in results.values() for k, v in r.headline().items()}
        assert table.loc[label].to_dict() == pytest.approx(headline, rel=1e-12)

    charts = [json.loads(c.proto.spec)["data"] for c in at.get("plotly_chart")]
    heatmaps = [c[0] for c in charts if c[0]["type"] == "heatmap"]
    for heatmap, results in zip(heatmaps, expected.values(), strict=True):
        _, depths, grid = results["passkey"].grid()
        assert heatmap["z"] == grid and heatmap["x"] == ["512", "1k"] and len(depths) == 5
    curves = charts[-1]
    assert [c["name"] for c in curves] == ["unpruned", "current mask"]
    for curve, results in zip(curves, expected.values(), strict=True):
        (row,) = results["long_ppl"].rows
        assert row.seqlen == 1024 and curve["y"] == pytest.approx(list(row.loss_by_position), rel=1e-12)
