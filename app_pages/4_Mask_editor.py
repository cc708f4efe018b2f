"""Mask editor: toggle heads, set per-layer modes and alpha, rescale, and watch the live perplexity and budget.

The mask lives in this session only (``session.current_mask``, changed through ``ui.editor.change``)
and is mirrored in the URL. The live perplexity comes from the live evaluator shared by all sessions
(built in the background when the model loaded), on the evaluation slice Home uses; its refinement
starts first and is drawn last, in a fragment, so the grid and the meters show a click at once and
the number settles in place.
"""

from __future__ import annotations

import streamlit as st

from analysis.errors import HeadroomError
from analysis.generation import greedy_continuation
from analysis.importance import HEAD_METRICS, HeadScores, stored_head_result
from analysis.loading import LoadedModel
from analysis.masks import MAX_MASK_BYTES, Mask, budget, decode_mask
from ui import backend, collection, editor, head_grids, session
from ui.editor import MODES, guarded

PRESETS = ("unpruned", "HARP result", "lowest heads of a metric")


def toggle(layer: int, head: int) -> None:
    lm = backend.model()
    mask = session.current_mask(lm)
    keep = not mask.heads[layer][head]
    what = f"{'restored' if keep else 'pruned'} layer {layer} head {head}"
    editor.change(lm, mask.with_head(layer, head, keep), what)


def clicked(chart_key: str) -> None:
    cell = head_grids.selected_head(st.session_state.get(chart_key))
    if cell is not None:
        toggle(*cell)
        st.session_state["grid_version"] = st.session_state.get("grid_version", 0) + 1  # a fresh chart, no selection


def toggle_from_form() -> None:
    toggle(int(st.session_state.toggle_layer), int(st.session_state.toggle_head))


def set_layer() -> None:
    lm, layer, mode = backend.model(), int(st.session_state.mode_layer), st.session_state.mode_mode
    alpha = 0.0 if mode == MODES[2] else float(st.session_state.mode_alpha)
    mask = session.current_mask(lm).with_layer(layer, drop_qk=mode == MODES[1], alpha=alpha)
    editor.change(lm, mask, f"layer {layer} set to {mode}, α={alpha:g}")


def preset(name: str, metric: str, k: int) -> None:
    lm = backend.model()
    mask = Mask.unpruned(lm.shape, lm.name, lm.fingerprint)
    if name == "HARP result":
        run = st.session_state.get(session.HARP_RUN)
        if run is None:
            raise HeadroomError("no HARP result in this session yet; run HARP on the HARP page first")
        mask = backend.harp_result(lm, run).mask
    elif name == "lowest heads of a metric":
        mask = mask.with_heads(backend.cheapest_heads(lm, backend.windows(lm, session.CALIB_TEXT), metric, k), False)
        name = f"the {k} lowest heads of {metric}"
    editor.change(lm, mask, f"preset: {name}")


def preset_from_form() -> None:
    state = st.session_state
    preset(state.preset_name, state.preset_metric, int(state.preset_k))


def upload(key: str) -> None:
    lm, file = backend.model(), st.session_state.get(key)
    if file is not None:
        mask = decode_mask(file.name, file.getvalue(), lm.shape, lm.name, lm.fingerprint)
        editor.change(lm, mask, f"loaded {file.name}")


def prefill_layer_form(mask: Mask, layer: int) -> None:
    """Show the chosen layer's mode and alpha in the layer form, whenever the layer or its settings change.

    Streamlit drops a widget's state on a run of another page, so back from there the form is filled again.
    """
    spec = mask.layer(layer)
    if st.session_state.get("mode_prefilled") != (layer, spec) or "mode_alpha" not in st.session_state:
        st.session_state["mode_prefilled"] = (layer, spec)
        st.session_state.mode_mode = editor.mode_of(mask, layer)
        st.session_state.mode_alpha = float(spec.alpha)


def colour_scores(lm: LoadedModel, options: dict[str, HeadScores | None]) -> HeadScores | None:
    """The scores the grid is coloured by: none, one on disk, or a cheap one computed now (then on disk)."""
    chosen = st.selectbox(
        "Colour the grid by",
        ["kept / pruned", *options],
        key="colour_by",
        help="Head metrics already computed for this model and calibration text (Importance page), and the cheap "
        "ones, computed on first use",
    )
    if chosen == "kept / pruned":
        return None
    return options[chosen] or backend.head_result(lm, backend.windows(lm, session.CALIB_TEXT), chosen)


lm = backend.model()
mask = session.current_mask(lm)
session.show_in_link(mask)
evaluation = backend.windows(lm)  # Home's slice: the editor's settled number is Home's and the export card's
shape = lm.shape

left, right = st.columns([3, 2])
with right:
    panel = st.container()  # the live number, drawn last (see the end of the page)
    with panel:
        live = backend.live_evaluator(lm, evaluation)
        editor.start_live(live, mask)  # computes while the rest of the page draws
    if mask.pruned_heads == shape.num_layers * shape.num_heads:
        st.warning(
            "Every query head is pruned: only the MLPs (and drop-QK layers' values) remain. The number is exact."
        )
    with st.expander("Budget targets (save at least, %)"):
        targets = {
            label: st.number_input(label, 0.0, 100.0, 0.0, 5.0, key=f"target_{i}")
            for i, (label, _, _) in enumerate(editor.AXES)
        }
    seq = st.number_input("Budget at sequence length", min_value=1, value=evaluation.seqlen, step=256)
    editor.budget_meters(budget(mask, shape, int(seq)), targets)
    undo_col, reset_col = st.columns(2)
    undo_col.button("Undo", on_click=editor.undo, args=(lm,), disabled=not st.session_state.get(session.HISTORY))
    reset_col.button("Reset", on_click=guarded("reset", preset), args=(PRESETS[0], "", 0), disabled=mask.is_unpruned)
    editor.errors_at("reset")
    with st.expander("Save this mask to the collection (Pareto page)"):
        collection.save_mask_box(lm, mask, key="editor_save")

with left:
    calib = backend.windows(lm, session.CALIB_TEXT)
    cache = backend.disk_cache()
    stored = {m: stored_head_result(lm, calib, m, cache) for m in HEAD_METRICS}
    offered = {m: s for m, s in stored.items() if s is not None or HEAD_METRICS[m].cost in ("weights", "forward")}
    scores = colour_scores(lm, offered)
    chart = f"grid_{st.session_state.get('grid_version', 0)}"
    st.plotly_chart(
        editor.mask_grid(mask, scores), key=chart, on_select=guarded("grid", clicked, chart), selection_mode="points"
    )
    st.caption(
        "Click a cell to toggle its head. Rows: dashed orange outline = drop-QK (queries and keys dropped, values "
        "kept), grey with a red outline = attention removed; each row's mode and alpha are written at its right."
    )
    editor.errors_at("grid")

    with st.form("toggle_head"):
        a, b_col = st.columns(2)
        a.number_input("Layer", 0, shape.num_layers - 1, shape.num_layers - 1, key="toggle_layer")
        b_col.number_input("Head", 0, shape.num_heads - 1, 0, key="toggle_head")
        st.form_submit_button("Toggle head", on_click=guarded("toggle", toggle_from_form))
    editor.errors_at("toggle")

    chosen_layer = st.number_input(
        "Layer to set", 0, shape.num_layers - 1, shape.num_layers - 1, key="mode_layer", help="The form shows its mode"
    )
    prefill_layer_form(mask, int(chosen_layer))
    with st.form("layer_mode"):
        a, b_col = st.columns(2)
        a.selectbox("Mode", MODES, key="mode_mode")
        b_col.number_input("alpha", 0.0, max(4.0, float(st.session_state.mode_alpha)), step=0.05, key="mode_alpha")
        st.form_submit_button("Apply to layer", on_click=guarded("layer", set_layer))
    editor.errors_at("layer")

    a, b_col = st.columns([2, 1])
    how = a.radio("Rescale", ("closed-form alpha", "greedy search"), horizontal=True, key="rescale_how")
    if b_col.button("Rescale this mask", help="Per-layer alpha for every drop-QK or head-pruned layer, on calibration"):
        with editor.reported():
            result = backend.rescaled(lm, mask, search=how == "greedy search")
            alphas = ", ".join(f"{i}: {a:g}" for i, a in result.alpha.items())
            editor.change(lm, result.mask, f"rescaled ({how}: α {alphas})")
            st.session_state["rescaled"] = (
                result.mask.to_json(),
                f"Calibration perplexity {result.start_perplexity:.3f} as given, {result.norm_matching_perplexity:.3f} "
                f"with closed-form alphas, {result.calib_perplexity:.3f} after rescaling ({how}).",
            )
            st.rerun()
    rescaled_mask, outcome = st.session_state.get("rescaled", (None, ""))
    if rescaled_mask == mask.to_json():  # only while the rescaled mask is the one shown
        st.caption(outcome)

st.subheader("Presets")
a, b_col, c, d = st.columns(4)
a.selectbox("Preset", PRESETS, key="preset_name")
b_col.selectbox("Metric", list(HEAD_METRICS), index=list(HEAD_METRICS).index("magnitude"), key="preset_metric")
c.number_input("k heads", 1, shape.num_layers * shape.num_heads, shape.num_heads, key="preset_k")
d.button("Apply preset", on_click=guarded("preset", preset_from_form))
editor.errors_at("preset")
st.file_uploader(
    f"…or upload a mask file (headroom.mask JSON, at most {MAX_MASK_BYTES // 2**20} MiB)",
    type=["json"],
    max_upload_size=MAX_MASK_BYTES // 2**20,  # Streamlit's megabytes are MiB; decode_mask checks the bytes too
    key="mask_file",
    on_change=guarded("upload", upload),
    args=("mask_file",),
)
editor.errors_at("upload")

st.subheader("Greedy continuations")
prompt = st.text_input("Prompt", "The history of the city begins", key="prompt")
new_tokens = st.number_input("New tokens", 1, 128, 24)
if st.button("Generate"):
    with st.spinner("Generating with the KV cache (drop-QK layers store nothing)…"), editor.reported():
        a, b_col = st.columns(2)
        a.markdown(editor.generation("Unpruned", prompt, greedy_continuation(lm, prompt, None, int(new_tokens))))
        b_col.markdown(editor.generation("Masked", prompt, greedy_continuation(lm, prompt, mask, int(new_tokens))))

with panel:
    editor.live_panel(live, mask, editor.last_change(lm, mask))
