"""The mask editor through AppTest on a tiny Llama: the live number, grid, forms, budget targets, rescaling.

Every number the page shows is checked against the backend computing the same thing directly (a
full perplexity pass, the live evaluator on its own, o_proj weights read from the model, the
rescaling backend).
"""

from __future__ import annotations

import json
import re
import threading
import time

import pytest
import torch
from streamlit.testing.v1 import AppTest

from analysis.budget import budget
from analysis.cache import DiskCache
from analysis.live import LivePerplexity
from analysis.mask_files import parse_mask
from analysis.mask_links import mask_to_query
from analysis.masks import Mask
from analysis.pareto import named_masks
from analysis.rescale import rescale
from tests.helpers import EDITOR, SEQLEN, button, ok, open_page, shown, tiny_app, toggle, windows
from ui import session


def grid(at: AppTest) -> dict:
    return json.loads(at.get("plotly_chart")[0].proto.spec)


def flat(node) -> list:
    """Every element under ``node`` in page order."""
    children = getattr(node, "children", None)
    if not children:
        return [node]
    return [leaf for key in sorted(children) for leaf in flat(children[key])]


def test_the_number_is_estimated_then_exact_with_the_unpruned_reference_on_the_same_tokens(tiny, lm):
    evaluation = windows(lm, tiny[session.EVAL_TEXT])
    at = ok(open_page(EDITOR, tiny).run())
    ok(toggle(at, 3, 2))
    mask = Mask.unpruned(lm.shape, lm.name).with_head(3, 2, False)
    first = next(LivePerplexity(lm.arch, evaluation).estimates(mask))  # the backend on its own
    assert not first.exact and first.predicted_tokens < evaluation.predicted_tokens
    from analysis.evaluation import perplexity

    exact, unpruned = perplexity(lm.arch, evaluation, mask).perplexity, perplexity(lm.arch, evaluation).perplexity
    assert shown(at, "Live perplexity") == f"{exact:.3f}"
    assert shown(at, "Unpruned, same tokens") == f"{unpruned:.3f}"
    note = next(c.value for c in at.caption if c.value.startswith("Exact on"))
    assert f"{evaluation.predicted_tokens:,} predicted tokens" in note and "Home" in note and "export" in note
    assert (
        f"First estimate, from {first.predicted_tokens:,} tokens: {first.perplexity:.3f} "
        f"(95 % interval {first.perplexity_low:.3f} to {first.perplexity_high:.3f})" in note
    )
    line = next(m.value for m in at.markdown if m.value.startswith("**Last change:**"))
    assert line.startswith("**Last change:** pruned layer 3 head 2: Δ perplexity ")
    delta = float(re.search(r"Δ perplexity ([-+][0-9.]+)", line).group(1))
    assert delta == pytest.approx(exact - unpruned, abs=1.5e-3)
    ok(button(at, "Undo").click().run())
    assert shown(at, "Live perplexity") == f"{unpruned:.3f}"
    assert any("Seen before" in c.value for c in at.caption)  # the unpruned mask is answered from memory


def test_the_evaluator_is_warmed_when_the_model_loads_so_the_editor_never_captures(app_root, lm):
    """Home loads the model; the capturing pass runs in the background thread, never in a page's run."""
    settings = tiny_app(app_root, eval_seed=5)  # a text no other test uses: this evaluator is new
    threads: set[str] = set()

    def record(module: torch.nn.Module, args: tuple, output: object) -> None:  # layer 0 of the app's own model
        if getattr(getattr(module, "self_attn", None), "layer_idx", None) == 0:
            threads.add(threading.current_thread().name)

    handle = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        ok(open_page("app.py", settings).run())
        deadline = time.monotonic() + 60
        while not any(t.startswith("headroom-live-warm") for t in threads) and time.monotonic() < deadline:
            time.sleep(0.05)
        editor = ok(open_page(EDITOR, settings).run())
        ok(toggle(editor, lm.shape.num_layers - 1, 0))  # the top layer: layer 0 is not rerun
    finally:
        handle.remove()
    live = {t for t in threads if not t.startswith("ScriptRunner")}
    assert live and all(t.startswith("headroom-live-warm") for t in live), threads


def test_the_grid_is_coloured_by_a_metric_with_pruned_cells_and_layer_modes_marked(tiny, lm):
    mask = Mask.unpruned(lm.shape, lm.name).with_head(1, 4, False).with_layer(2, drop_qk=True, alpha=0.5)
    mask = mask.with_layer(0, alpha=0.0)
    at = ok(open_page(EDITOR, tiny, mask_to_query(mask)).run())
    spec = grid(at)
    assert spec["data"][0]["z"][1][4] == 0 and spec["data"][0]["z"][1][3] == 1  # kept / pruned by default
    ok(at.selectbox(key="colour_by").set_value("magnitude").run())
    spec = grid(at)
    heads = lm.shape.num_heads
    for layer in range(lm.shape.num_layers):
        weight = lm.model.model.layers[layer].self_attn.o_proj.weight.detach().double()
        expected = weight.norm(dim=0).view(heads, -1).sum(-1)  # o_proj's input columns, head by head
        assert spec["data"][0]["z"][layer] == pytest.approx(expected.tolist(), rel=1e-6)
    crosses = spec["data"][2]
    assert list(zip(crosses["y"], crosses["x"], strict=True)) == [(1, 4)]
    labels = {a["y"]: a["text"] for a in spec["layout"]["annotations"]}
    assert labels == {0: "removed α=0", 1: "α=1", 2: "drop-QK α=0.5", 3: "α=1"}
    shapes = {round(s["y0"] + 0.5): s for s in spec["layout"]["shapes"]}
    assert set(shapes) == {0, 2} and shapes[2]["line"]["dash"] == "dash" and "fillcolor" in shapes[0]


def test_the_layer_form_shows_the_chosen_layers_mode_and_alpha(tiny, lm):
    mask = Mask.unpruned(lm.shape, lm.name).with_layer(2, drop_qk=True, alpha=0.5).with_layer(1, alpha=0.0)
    at = ok(open_page(EDITOR, tiny, mask_to_query(mask)).run())
    for layer, mode, alpha in ((2, "drop-QK", 0.5), (1, "attention removed", 0.0), (3, "full", 1.0)):
        ok(at.number_input(key="mode_layer").set_value(layer).run())
        assert at.selectbox(key="mode_mode").value == mode and at.number_input(key="mode_alpha").value == alpha


def test_the_layer_form_is_filled_again_after_a_visit_to_another_page(tiny, lm):
    """Streamlit drops widget state on another page's run; back in the editor the form shows the layer again."""
    last = lm.shape.num_layers - 1  # the layer the form starts on
    mask = Mask.unpruned(lm.shape, lm.name).with_layer(last, drop_qk=True, alpha=0.5)
    at = ok(open_page(EDITOR, tiny, mask_to_query(mask)).run())
    ok(at.switch_page("app_pages/home.py").run())
    ok(at.switch_page(EDITOR).run())
    assert at.number_input(key="mode_layer").value == last
    assert at.selectbox(key="mode_mode").value == "drop-QK" and at.number_input(key="mode_alpha").value == 0.5


def test_budget_targets_say_how_far_the_mask_is(tiny, lm):
    mask = Mask.unpruned(lm.shape, lm.name).with_layer(3, drop_qk=True, alpha=0.5)
    at = ok(open_page(EDITOR, tiny, mask_to_query(mask)).run())
    b = budget(mask, lm.shape, SEQLEN)
    kv = 100 * b.kv_bytes_per_token_saved / b.kv_bytes_per_token_unpruned
    assert kv == 25.0 and b.params_removed_pct < 10  # one drop-QK layer of four
    at.number_input(key="target_1").set_value(20.0)  # KV
    at.number_input(key="target_0").set_value(10.0)  # parameters
    ok(at.run())
    texts = [p.proto.text for p in at.get("progress")]
    assert texts == [
        f"{b.params_removed_pct:.1f} % saved: {10 - b.params_removed_pct:.1f} points short of the 10 % target",
        "25.0 % saved: the 20 % target is met",
        f"{100 * b.attention_flops_per_token_saved / b.attention_flops_per_token_unpruned:.1f} % saved (no target set)",
    ]
    bars = [p.proto.value for p in at.get("progress")]
    assert abs(bars[0] - 10 * b.params_removed_pct) <= 1 and bars[1] == 100  # against the target, in percent
    assert shown(at, "KV cache saved") == f"{b.kv_bytes_per_token_saved:,} bytes/token"


def test_an_error_appears_beside_the_widget_that_caused_it(tiny):
    at = ok(open_page(EDITOR, tiny).run())
    at.selectbox[[s.label for s in at.selectbox].index("Preset")].set_value("HARP result")
    at = button(at, "Apply preset").click().run()
    assert not at.exception and len(at.error) == 1 and "no HARP result" in at.error[0].value
    order = [(e.type, getattr(e, "label", getattr(e, "value", None))) for e in flat(at.main)]
    where = order.index(("error", at.error[0].value))
    assert order[where - 1] == ("button", "Apply preset")


@pytest.mark.parametrize("how", ["closed-form alpha", "greedy search"])
def test_rescale_this_mask_applies_the_backends_alphas(tiny, lm, how):
    mask = Mask.unpruned(lm.shape, lm.name).with_layer(3, drop_qk=True, alpha=1.0).with_head(1, 0, False)
    at = ok(open_page(EDITOR, tiny, mask_to_query(mask)).run())
    at.radio(key="rescale_how").set_value(how)
    ok(button(at, "Rescale this mask").click().run())
    expected = rescale(lm.arch, mask, windows(lm, tiny[session.CALIB_TEXT]), search=how == "greedy search")
    got = parse_mask(at.session_state[session.MASK], lm.shape, lm.name)
    assert got.alpha == pytest.approx(expected.mask.alpha) and got.heads == mask.heads and got.drop_qk == mask.drop_qk
    assert any(f"{expected.calib_perplexity:.3f} after rescaling ({how})" in c.value for c in at.caption)
    line = next(m.value for m in at.markdown if m.value.startswith("**Last change:**"))
    assert f"rescaled ({how}" in line
    assert torch.isfinite(torch.tensor(expected.calib_perplexity))


def test_the_mask_is_saved_to_the_collection_under_a_name(tiny, lm):
    mask = Mask.unpruned(lm.shape, lm.name).with_head(2, 1, False).with_layer(3, drop_qk=True, alpha=0.4)
    at = ok(open_page(EDITOR, tiny, mask_to_query(mask)).run())
    at.text_input(key="editor_save_name").input("hand-tuned")
    ok(button(at, "Save to the collection").click().run())
    assert named_masks(lm, DiskCache())["hand-tuned"].cache_key() == mask.cache_key()
