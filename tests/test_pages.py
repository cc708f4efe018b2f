"""Every page's logic through Streamlit's AppTest, on a tiny random Llama saved to disk.

Each test drives the page as a user would (widgets, buttons, uploads, the URL) and checks the
numbers it shows against the backend computing the same thing directly.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from streamlit.proto.Metric_pb2 import Metric
from streamlit.testing.v1 import AppTest

from analysis.activation_metrics import block_influence
from analysis.baselines import matched_baselines
from analysis.budget import budget
from analysis.cache import DiskCache
from analysis.comparison import cached_baselines, compare
from analysis.drift import mask_drift, position_drift
from analysis.evaluation import perplexity
from analysis.export_folder import MASK_FILE
from analysis.generation import greedy_continuation
from analysis.harp import DEFAULT_GRID, cached_harp, chosen_harp, harp, top_layers
from analysis.head_map import DEFAULT_CLUSTERS, DEFAULT_METRICS, cached_head_map
from analysis.importance import HEAD_METRICS, cached_head_result
from analysis.mask_files import parse_mask
from analysis.mask_links import mask_from_query, mask_to_query
from analysis.masks import Mask
from analysis.model_card import export_command
from analysis.throughput import duration_text, measured_rate
from tests.helpers import EDITOR, ROOT, SEQLEN, TOKENS, ok, open_page, shown, toggle, windows, word_text
from ui import harp_view, head_grids, plots, scaffold, session


def charts(at: AppTest) -> list[dict]:
    """Every plotly figure on the page, as the JSON the browser receives."""
    return [json.loads(c.proto.spec) for c in at.get("plotly_chart")]


def chart(at: AppTest, title: str) -> dict:
    """The figure whose title starts with ``title``."""
    return next(c for c in charts(at) if c["layout"]["title"]["text"].startswith(title))


def assert_titles_clear_of_the_toolbar(at: AppTest) -> None:
    """Titles sit on the plotting area's top edge, inside a top margin tall enough for the toolbar above them."""
    for fig in charts(at):
        layout = fig["layout"]
        assert (layout["title"]["yref"], layout["title"]["yanchor"], layout["title"]["y"]) == ("paper", "bottom", 1)
        assert layout["margin"]["t"] >= 70, layout["title"]["text"]


def test_editor_toggle_shows_backend_perplexity_and_undo_restores_it(tiny, lm):
    evaluation = windows(lm, tiny[session.EVAL_TEXT])
    unpruned = perplexity(lm.arch, evaluation).perplexity
    at = ok(open_page(EDITOR, tiny).run())
    assert shown(at, "Live perplexity") == f"{unpruned:.3f}"
    ok(toggle(at, 3, 2))
    mask = Mask.unpruned(lm.shape, lm.name).with_head(3, 2, False)
    pruned = perplexity(lm.arch, evaluation, mask).perplexity
    assert pruned != pytest.approx(unpruned, rel=1e-4)
    assert shown(at, "Live perplexity") == f"{pruned:.3f}"
    assert mask_from_query(dict(at.query_params), lm.shape, lm.name).heads == mask.heads  # the URL mirrors the mask
    ok(at.button[[b.label for b in at.button].index("Undo")].click().run())
    assert shown(at, "Live perplexity") == f"{unpruned:.3f}"
    assert not at.query_params.get("pruned")


def test_a_link_reproduces_the_mask_and_a_bad_link_starts_unpruned(tiny, lm):
    mask = Mask.unpruned(lm.shape, lm.name).with_head(1, 0, False).with_head(1, 5, False)
    mask = mask.with_layer(3, drop_qk=True, alpha=0.5).with_layer(2, alpha=0.0)
    query = mask_to_query(mask)
    assert query == {"pruned": "1:0.5", "drop_qk": "3", "alpha": "2:0,3:0.5"}
    at = ok(open_page(EDITOR, tiny, query).run())
    expected = perplexity(lm.arch, windows(lm, tiny[session.EVAL_TEXT]), mask).perplexity
    assert shown(at, "Live perplexity") == f"{expected:.3f}"
    assert parse_mask(at.session_state[session.MASK], lm.shape, lm.name) == mask

    bad = open_page(EDITOR, tiny, {"pruned": "1:9"}).run()  # head 9 of a 6-head model
    assert not bad.exception
    assert "link" in bad.error[0].value and "unpruned" in bad.error[0].value
    unpruned = perplexity(lm.arch, windows(lm, tiny[session.EVAL_TEXT])).perplexity
    assert shown(bad, "Live perplexity") == f"{unpruned:.3f}"


def test_a_bad_mask_file_is_an_error_and_a_good_one_applies(tiny, lm):
    at = ok(open_page(EDITOR, tiny).run())
    wrong = Mask.unpruned(lm.shape, lm.name).to_json() | {"heads": [[1] * 6] * 3}  # 3 rows for 4 layers
    at.file_uploader(key="mask_file").set_value(("mask.json", json.dumps(wrong).encode(), "application/json")).run()
    assert not at.exception
    assert "'heads' must have 4 rows" in at.error[0].value
    mask = Mask.unpruned(lm.shape, lm.name).with_head(0, 1, False)
    at.file_uploader(key="mask_file").set_value(("mask.json", json.dumps(mask.to_json()).encode(), "application/json"))
    ok(at.run())
    expected = perplexity(lm.arch, windows(lm, tiny[session.EVAL_TEXT]), mask).perplexity
    assert shown(at, "Live perplexity") == f"{expected:.3f}"


def test_all_heads_pruned_is_a_warning_with_an_exact_number(tiny, lm):
    everything = Mask.unpruned(lm.shape, lm.name)
    for layer in range(lm.shape.num_layers):
        for head in range(lm.shape.num_heads):
            everything = everything.with_head(layer, head, False)
    at = ok(open_page(EDITOR, tiny, mask_to_query(everything)).run())
    assert "Every query head is pruned" in at.warning[0].value
    expected = perplexity(lm.arch, windows(lm, tiny[session.EVAL_TEXT]), everything).perplexity
    assert shown(at, "Live perplexity") == f"{expected:.3f}"


def test_two_sessions_with_different_masks_see_their_own_numbers(tiny, lm):
    evaluation = windows(lm, tiny[session.EVAL_TEXT])
    first, second = ok(open_page(EDITOR, tiny).run()), ok(open_page(EDITOR, tiny).run())
    ok(toggle(first, 0, 0))
    ok(toggle(second, 2, 4))
    ok(first.run())  # after the other session changed the shared evaluator
    base = Mask.unpruned(lm.shape, lm.name)
    assert (
        shown(first, "Live perplexity")
        == f"{perplexity(lm.arch, evaluation, base.with_head(0, 0, False)).perplexity:.3f}"
    )
    assert (
        shown(second, "Live perplexity")
        == f"{perplexity(lm.arch, evaluation, base.with_head(2, 4, False)).perplexity:.3f}"
    )
    assert first.session_state[session.MASK] != second.session_state[session.MASK]


def test_harp_page_runs_a_search_and_sends_it_to_the_editor(tiny, lm):
    at = ok(open_page("app.py", tiny).run())
    ok(at.switch_page("app_pages/2_HARP.py").run())
    assert any("no estimate yet" in c.value for c in at.caption)  # nothing measured on this model yet
    at.number_input[0].set_value(2)  # N
    at.number_input[1].set_value(0.5)  # grid step: 0, 0.5, 1
    ok(at.button[0].click().run())
    calib = windows(lm, tiny[session.CALIB_TEXT])
    expected = harp(lm.arch, lm.name, calib, [2, 3], (0.0, 0.5, 1.0))
    assert shown(at, "Calibration perplexity, HARP (searched alpha)") == f"{expected.calib_perplexity:.3f}"
    rate = measured_rate(DiskCache(), lm.cache_key(), "harp")  # the run measured its own speed
    assert (rate.runs, rate.last_units, rate.unit) == (1, 6, "candidates")
    ok(at.run())
    estimate = f"about {duration_text(rate.seconds(6))} for 6 candidates (measured here"
    assert any(estimate in c.value for c in at.caption)
    ok(at.button[[b.label for b in at.button].index("Send to the mask editor")].click().run())
    assert parse_mask(at.session_state[session.MASK], lm.shape, lm.name) == expected.mask
    evaluated = perplexity(lm.arch, windows(lm, tiny[session.EVAL_TEXT]), expected.mask).perplexity
    assert shown(at, "Live perplexity") == f"{evaluated:.3f}"  # now on the editor page


def test_home_page_shows_the_tiny_card_and_its_backend_perplexity(tiny, lm):
    at = ok(open_page("app.py", tiny).run())
    expected = perplexity(lm.arch, windows(lm, tiny[session.EVAL_TEXT])).perplexity
    assert shown(at, "Unpruned perplexity") == f"{expected:.3f}"
    assert lm.fingerprint in at.table[0].value.to_string()
    at.text_input(key=f"widget_{session.EVAL_TEXT}").set_value(str(ROOT / "no-such-text.txt")).run()
    assert not at.exception
    assert "does not exist" in at.error[0].value


def test_importance_page_draws_metrics_with_backend_values_and_ranks(tiny, lm):
    at = ok(open_page("app_pages/1_Importance.py", tiny).run())
    ok(at.toggle(key="compare").set_value(True).run())
    ok(at.toggle(key="influence").set_value(True).run())
    calib = windows(lm, tiny[session.CALIB_TEXT])
    assert at.selectbox[0].options == list(HEAD_METRICS)  # every metric is offered; the cheap ones are checked here
    for metric in ("wanda_sp", "flap_wifv", "magnitude"):
        ok(at.selectbox[0].set_value(metric).run())
        scores = HEAD_METRICS[metric](lm.arch, calib, None, None)
        grid = json.loads(at.get("plotly_chart")[0].proto.spec)["data"]
        cells = {tuple(c): text for c, text in zip(grid[1]["customdata"], grid[1]["hovertext"], strict=True)}
        low = divmod(int(scores.argmin()), lm.shape.num_heads)
        assert f"{metric}: {scores[low].item():.4g}" in cells[low] and "rank 1 of 24" in cells[low]
    details = at.table[0].value
    assert list(details["metric"]) == ["magnitude", "wanda_sp", "flap_wifv"]
    charts = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    influence = next(c for c in charts if c["layout"]["title"]["text"] == "Block Influence per layer")
    expected = block_influence(lm.arch, calib).tolist()
    assert influence["data"][0]["y"] == pytest.approx(expected, rel=1e-6)


def test_norm_drift_page_shows_the_backend_kl_with_and_without_rescaling(tiny, lm):
    mask = Mask.unpruned(lm.shape, lm.name).with_layer(3, drop_qk=True, alpha=0.5)
    settings = tiny | {session.MASK: mask.to_json()}
    at = ok(open_page("app_pages/3_Norm_drift.py", settings).run())
    drift = mask_drift(lm.arch, windows(lm, tiny[session.EVAL_TEXT]), mask)
    for report, label in ((drift.mask, "with its alphas"), (drift.without_rescaling, "no rescaling")):
        metric = next(m for m in at.metric if label in m.label)
        assert metric.value == f"{report.kl_nats_per_token:.4f} nats/token"
    assert len(at.get("plotly_chart")) == 4


def test_editor_layer_mode_and_alpha_show_backend_perplexity_and_budget(tiny, lm):
    at = ok(open_page(EDITOR, tiny).run())
    at.number_input(key="mode_layer").set_value(2)
    at.selectbox(key="mode_mode").set_value("drop-QK")
    at.number_input(key="mode_alpha").set_value(0.5)
    ok(at.button[[b.label for b in at.button].index("Apply to layer")].click().run())
    mask = Mask.unpruned(lm.shape, lm.name).with_layer(2, drop_qk=True, alpha=0.5)
    expected = perplexity(lm.arch, windows(lm, tiny[session.EVAL_TEXT]), mask).perplexity
    assert shown(at, "Live perplexity") == f"{expected:.3f}"
    assert shown(at, "KV cache saved") == f"{budget(mask, lm.shape, SEQLEN).kv_bytes_per_token_saved:,} bytes/token"
    assert at.query_params["drop_qk"] == "2" and at.query_params["alpha"] == "2:0.5"


def test_generation_box_shows_the_unpruned_and_masked_greedy_continuations(tiny, lm):
    mask = Mask.unpruned(lm.shape, lm.name).with_layer(3, drop_qk=True, alpha=0.0).with_head(0, 0, False)
    at = ok(open_page(EDITOR, tiny, mask_to_query(mask)).run())
    prompt = word_text(5, seed=7) + " _x_ [y]"  # markdown specials: shown as typed, never as formatting
    at.text_input(key="prompt").set_value(prompt)
    ok(at.button[[b.label for b in at.button].index("Generate")].click().run())
    texts = [m.value for m in at.markdown if m.value.startswith(("**Unpruned**", "**Masked**"))]
    escaped = prompt.replace("_", "\\_").replace("[", "\\[").replace("]", "\\]")
    assert [t.split("\n\n")[1].split(":blue[")[0] for t in texts] == [escaped, escaped]
    assert texts == [
        f"**Unpruned**\n\n{escaped}:blue[{scaffold.plain(greedy_continuation(lm, prompt, None, 24))}]",
        f"**Masked**\n\n{escaped}:blue[{scaffold.plain(greedy_continuation(lm, prompt, mask, 24))}]",
    ]


def test_a_clicked_grid_point_names_its_layer_and_head():
    fig = head_grids.grid_figure([[0.0] * 3] * 2, [["x"] * 3] * 2, "t", None, "Viridis")
    data = fig.data[1].customdata
    point = {"selection": {"points": [{"x": 2, "y": 1, "customdata": list(data[5])}]}}  # layer-major: (1, 2)
    assert head_grids.selected_head(point) == (1, 2)
    assert head_grids.selected_head({"selection": {"points": []}}) is None and head_grids.selected_head(None) is None


def test_a_mask_file_that_is_not_json_is_an_error_saying_so(tiny):
    at = ok(open_page(EDITOR, tiny).run())
    at.file_uploader(key="mask_file").set_value(("notes.json", b"{heads: oops", "application/json")).run()
    assert not at.exception
    assert "mask file notes.json is not valid JSON" in at.error[0].value


def test_a_mask_chosen_on_other_weights_is_flagged_on_every_page(tiny, lm):
    foreign = Mask.unpruned(lm.shape, lm.name, "0" * 16).with_head(1, 2, False)
    at = ok(open_page(EDITOR, {**tiny, session.MASK: foreign.to_json()}).run())
    assert any("fingerprint 0000000000000000" in w.value for w in at.sidebar.warning)
    at = ok(open_page(EDITOR, {**tiny, session.MASK: foreign.with_head(1, 2, True).to_json()}).run())
    assert any("fingerprint" in w.value for w in at.sidebar.warning)  # still foreign, though unpruned


def test_harp_page_shows_its_default_run_from_the_disk_cache_without_a_click(tiny, lm, cache_dir):
    at = ok(open_page("app_pages/2_HARP.py", tiny).run())
    assert any("then run HARP" in i.value for i in at.info)  # nothing cached: nothing shown, nothing computed
    assert not list(DiskCache().entries("harp", {}))
    layers = top_layers(lm.shape.num_layers, min(4, lm.shape.num_layers))
    calib = windows(lm, tiny[session.CALIB_TEXT])
    cached_harp(lm, calib, layers, DEFAULT_GRID, DiskCache())  # the form's defaults, run elsewhere (CLI, a session)
    at = ok(open_page("app_pages/2_HARP.py", tiny).run())
    assert not at.info and any("from the disk cache" in c.value for c in at.caption)
    expected = harp(lm.arch, lm.name, calib, layers, DEFAULT_GRID)
    assert shown(at, "Calibration perplexity, HARP (searched alpha)") == f"{expected.calib_perplexity:.3f}"
    ok(at.button[[b.label for b in at.button].index("Send to the mask editor")].click().run())
    assert parse_mask(at.session_state[session.MASK], lm.shape, lm.name) == expected.mask


def test_harp_page_chooses_layers_fits_its_log_axis_and_loads_any_compared_row_into_the_editor(tiny, lm):
    at = ok(open_page("app_pages/2_HARP.py", tiny).run())
    at.radio[0].set_value("chosen N (greedy on perplexity)")
    at.number_input[0].set_value(2)  # N
    at.number_input[1].set_value(0.5)  # grid step: 0, 0.5, 1
    ok(at.button[0].click().run())
    calib, evaluation = windows(lm, tiny[session.CALIB_TEXT]), windows(lm, tiny[session.EVAL_TEXT])
    expected = chosen_harp(lm.arch, lm.name, calib, 2, None, (0.0, 0.5, 1.0))
    assert shown(at, "Calibration perplexity, HARP (searched alpha)") == f"{expected.calib_perplexity:.3f}"
    chosen = ", ".join(str(step.layer) for step in expected.selection)
    assert any(c.value == f"Layers chosen, in order: {chosen}" for c in at.caption)
    trace = chart(at, "Search trace")
    plotted = [y for d in trace["data"] for y in d["y"]] + [expected.unpruned_perplexity]
    low, high = trace["layout"]["yaxis"]["range"]  # log10 units on a log axis
    assert trace["layout"]["yaxis"]["type"] == "log"
    assert low < math.log10(min(plotted)) and math.log10(max(plotted)) < high
    assert high - low < 1.2 * (math.log10(max(plotted)) - math.log10(min(plotted))) + 0.1  # no stretch to 10^36
    (note,) = [a for a in trace["layout"]["annotations"] if a["text"].startswith("unpruned")]
    assert note["y"] == pytest.approx(math.log10(expected.unpruned_perplexity))  # an annotation's y is log10 there
    assert all(low <= math.log10(t) <= high for t in trace["layout"]["yaxis"]["tickvals"])
    assert_titles_clear_of_the_toolbar(at)

    ok(at.button[[b.label for b in at.button].index("Compare with the baselines")].click().run())
    harp_ppl = perplexity(lm.arch, evaluation, expected.mask).perplexity
    dots = chart(at, "Held-out perplexity at HARP's budget")
    (star,) = [d for d in dots["data"] if d["name"] == "HARP"]
    assert star["customdata"] == ["harp"] and star["x"] == [pytest.approx(harp_ppl, rel=1e-6)]
    assert star["y"] == [f"harp · saves {harp_view.compact(budget(expected.mask, lm.shape, SEQLEN).params_removed)}"]
    assert star["marker"]["symbol"] == "star" and star["marker"]["color"] == [plots.HIGHLIGHT]
    others = next(d for d in dots["data"] if d["name"] != "HARP")
    assert others["marker"]["color"] == [plots.method_colour(m) for m in others["customdata"]]
    table = at.dataframe[0].value
    comparison = compare(lm, calib, evaluation, expected.layers, "params", (0.0, 0.5, 1.0), result=expected)
    rows = {r.method: r for r in comparison.rows}
    assert list(table["method"]) == sorted(rows, key=lambda m: rows[m].eval_perplexity)  # best first
    assert list(table["params removed"]) == [rows[m].budget.params_removed for m in table["method"]]
    worst = table["method"].iloc[-1]
    at.selectbox[0].set_value(worst)
    ok(at.button(key="compare_send").click().run())
    assert parse_mask(at.session_state[session.MASK], lm.shape, lm.name) == rows[worst].mask
    assert shown(at, "Live perplexity") == f"{perplexity(lm.arch, evaluation, rows[worst].mask).perplexity:.3f}"


def test_importance_colours_span_a_robust_or_per_layer_range_and_the_chosen_head_is_outlined(tiny, lm):
    at = ok(open_page("app_pages/1_Importance.py", tiny).run())
    scores = HEAD_METRICS["magnitude"](lm.arch, windows(lm, tiny[session.CALIB_TEXT]), None, None).double()
    heatmap = chart(at, "magnitude per head")["data"][0]
    low, high = scores.min().item(), scores.max().item()
    q = torch.quantile(scores.flatten(), torch.tensor([0.02, 0.98], dtype=torch.float64)).tolist()
    assert (heatmap["zmin"], heatmap["zmax"]) == (pytest.approx(q[0]), pytest.approx(q[1]))
    assert low < heatmap["zmin"] < heatmap["zmax"] < high  # the extremes no longer set the range

    ok(at.radio[0].set_value("per layer").run())
    heatmap = chart(at, "magnitude per head")["data"][0]
    for row, expected in zip(heatmap["z"], scores, strict=True):
        assert row == pytest.approx((expected / expected.abs().max()).tolist())

    at.number_input(key="details_layer").set_value(2)
    ok(at.number_input(key="details_head").set_value(3).run())
    (outline,) = chart(at, "magnitude per head")["layout"]["shapes"]
    assert (outline["x0"], outline["x1"], outline["y0"], outline["y1"]) == (2.5, 3.5, 1.5, 2.5)
    assert outline["line"]["color"] == plots.HIGHLIGHT
    assert at.table[0].value["score"].iloc[0] == f"{scores[2, 3].item():.4g}"
    assert_titles_clear_of_the_toolbar(at)


def test_drift_page_colours_span_the_data_and_the_unpruned_line_is_drawn_on_top(tiny, lm):
    mask = Mask.unpruned(lm.shape, lm.name).with_layer(2, drop_qk=True, alpha=0.5)
    at = ok(open_page("app_pages/3_Norm_drift.py", tiny | {session.MASK: mask.to_json()}).run())
    norms = chart(at, "Residual-stream L2 norm after each layer")
    lines = [d for d in norms["data"] if d.get("mode") == "lines+markers"]
    assert lines[-1]["name"] == "unpruned" and lines[-1]["line"]["dash"] == "dash"  # last drawn: on top
    colour = {d["name"]: d["line"]["color"] for d in lines}
    assert colour["pruned, with its alphas"] == plots.method_colour("harp")
    assert colour["unpruned"] == plots.method_colour("unpruned")
    drift = position_drift(lm.arch, windows(lm, tiny[session.EVAL_TEXT]), mask, 0)
    heatmap = chart(at, "Cosine to unpruned per layer and position")["data"][0]
    assert heatmap["zmin"] == pytest.approx(drift.cosine.min().item()) and heatmap["zmax"] == 1
    assert heatmap["zmin"] > -1  # not the fixed -1..1 that flattened values near 1
    assert_titles_clear_of_the_toolbar(at)
    evaluation, calls = windows(lm, tiny[session.EVAL_TEXT]), []
    mask_drift(lm.arch, evaluation, mask, lambda done, total: calls.append((done, total)))
    assert calls[-1] == (evaluation.num_windows, evaluation.num_windows)  # drift reports progress in windows
    assert [done for done, _ in calls] == sorted({done for done, _ in calls})


def test_head_map_clusters_have_the_same_discrete_colour_in_the_map_and_the_grid(tiny, lm):
    at = ok(open_page("app_pages/5_Head_map.py", tiny).run())
    calib = windows(lm, tiny[session.CALIB_TEXT])
    expected = cached_head_map(lm, calib, DEFAULT_METRICS, DEFAULT_CLUSTERS, 0)
    k = max(expected.clusters) + 1
    scatter = {d["name"]: d["marker"]["color"] for d in chart(at, "UMAP of")["data"]}
    grid = chart(at, "Cluster of every head")["data"][0]
    assert (grid["zmin"], grid["zmax"]) == (-0.5, k - 0.5)
    for (layer, head), cluster in zip(expected.heads, expected.clusters, strict=True):
        assert grid["z"][layer][head] == cluster
    for cluster in set(expected.clusters):
        # the colour the stepped scale gives the middle of the cluster's band, as plotly reads it
        position = (cluster + 0.5) / k
        below = [c for stop, c in grid["colorscale"] if stop <= position][-1]  # the stops plotly blends there
        above = next(c for stop, c in grid["colorscale"] if stop >= position)
        assert below == above == scatter[f"cluster {cluster}"]
    assert len(set(scatter.values())) == len(scatter)  # distinct clusters, distinct colours
    assert_titles_clear_of_the_toolbar(at)


def test_export_page_shows_savings_as_good_news_and_its_whole_command_line(tiny, lm):
    mask = Mask.unpruned(lm.shape, lm.name).with_head(1, 2, False).with_head(3, 0, False)
    at = ok(open_page("app_pages/7_Export.py", tiny | {session.MASK: mask.to_json()}).run())
    b = budget(mask, lm.shape, SEQLEN)
    params = next(m for m in at.metric if m.label == "Parameters")
    assert params.value == f"{b.params_total - b.params_removed:,}"
    assert params.proto.delta == f"{b.params_removed:,} saved ({100 * b.params_removed / b.params_total:.2f} %)"
    assert (params.proto.color, params.proto.direction) == (Metric.GREEN, Metric.DOWN)  # a saving, in green
    at.text_input(key="export_folder").set_value("exports/tiny").run()
    command = export_command(
        tiny[session.MODEL], MASK_FILE, "exports/tiny", "compact", tiny[session.EVAL_TEXT], SEQLEN, TOKENS
    )
    assert at.code[0].value == command and at.code[0].proto.wrap_lines  # whole, wrapped rather than cut off


def test_plain_text_shows_model_output_as_generated():
    text = "_ with the * sign [1](x) in 300 BC._"
    escaped = scaffold.plain(text)
    assert escaped.replace("\\", "") == text.replace("\\", "")  # only backslashes were added
    assert all(escaped[i - 1] == "\\" for i, c in enumerate(escaped) if c in "_*[]()." and i)


def test_comparison_reads_the_gradient_the_importance_page_cached_and_builds_the_same_baselines(tiny, lm, tmp_path):
    calib = windows(lm, tiny[session.CALIB_TEXT])
    reference = Mask.drop_qk_top(lm.shape, lm.name, 1, 0.5)
    fresh = matched_baselines(lm.arch, lm.name, calib, reference, "params", SEQLEN)  # measures every score itself
    cache, reported = DiskCache(tmp_path / "cache"), []
    cached_head_result(lm, calib, "gradient", None, cache)  # what the Importance page leaves in the cache
    found = cached_baselines(lm, calib, reference, "params", SEQLEN, cache, lambda done, total: reported.append(done))
    assert reported == []  # no gradient pass: the scores came from the importance entry
    assert {name: mask.heads for name, mask in found.items()} == {name: m.heads for name, m in fresh.items()}

    cold, reported = DiskCache(tmp_path / "cold"), []
    cached_baselines(lm, calib, reference, "params", SEQLEN, cold, lambda done, total: reported.append((done, total)))
    assert reported[-1] == (calib.num_windows, calib.num_windows)  # scored here, in windows, and now cached
    assert cached_head_result(lm, calib, "gradient", None, cold, lambda *_: reported.append("again")) and (
        reported[-1] != "again"  # the importance entry is there for the Importance page
    )


@pytest.mark.parametrize("values", [(14.2, 310.0), (27.0, 31.0), (1.3, 2.0e6), (0.004, 0.09)])
def test_log_axis_fits_its_values_and_writes_each_tick_in_full(values):
    axis = plots.log_axis(values, "perplexity")
    low, high = axis["range"]
    assert low < math.log10(min(values)) and math.log10(max(values)) < high
    assert len(axis["tickvals"]) >= 4 and all(low <= math.log10(t) <= high for t in axis["tickvals"])
    for tick, text in zip(axis["tickvals"], axis["ticktext"], strict=True):
        assert float(text.replace(",", "")) == pytest.approx(tick)  # "300", never a bare "3" for 300


def test_comparison_progress_counts_evaluated_windows_and_a_cached_comparison_reports_none(tiny, lm, tmp_path):
    calib, evaluation = windows(lm, tiny[session.CALIB_TEXT]), windows(lm, tiny[session.EVAL_TEXT])
    cache, first, again = DiskCache(tmp_path / "cache"), [], []
    result = compare(lm, calib, evaluation, [3], "kv", (0.0, 1.0), lambda d, t: first.append((d, t)), cache=cache)
    total = len(result.rows) * evaluation.num_windows
    assert first[-1] == (total, total) and [d for d, _ in first] == sorted(d for d, _ in first)
    compare(lm, calib, evaluation, [3], "kv", (0.0, 1.0), lambda d, t: again.append((d, t)), cache=cache)
    assert again == []  # every mask from the cache: nothing measured, so no speed is recorded from it
