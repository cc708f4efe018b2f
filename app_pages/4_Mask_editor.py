"""Mask editor: toggle heads, set per-layer modes and alpha, rescale, and watch the live perplexity and budget.

The mask lives in this session only (``session.current_mask``, changed through ``ui.mask_edits.change``)
and is mirrored in the URL. The live perplexity comes from the live evaluator shared by all sessions
(built in the background when the model loaded), on the evaluation slice Home uses; its refinement
starts first and is drawn last, in a fragment, so the grid and the meters show a click at once and
the number settles in place.
"""

from __future__ import annotations

import streamlit as st

from analysis.budget import budget
from analysis.generation import greedy_continuation
from analysis.importance import HEAD_METRICS
from analysis.mask_files import MAX_MASK_BYTES
from ui import backend, collection, editor, live_panel, mask_edits, scaffold, session
from ui.editor import MODES

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
        live_panel.start(live, mask)  # computes while the rest of the page draws
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
    undo_col.button("Undo", on_click=mask_edits.undo, args=(lm,), disabled=not st.session_state.get(session.HISTORY))
    reset_col.button(
        "Reset",
        on_click=scaffold.safe(mask_edits.preset, slot="reset"),
        args=(mask_edits.PRESETS[0], "", 0),
        disabled=mask.is_unpruned,
    )
    scaffold.errors_at("reset")
    with st.expander("Save this mask to the collection (Pareto page)"):
        collection.save_mask_box(lm, mask, key="editor_save")

with left:
    scores = editor.colour_scores(lm)
    chart = mask_edits.grid_key()
    st.plotly_chart(
        editor.mask_grid(mask, scores),
        key=chart,
        on_select=scaffold.safe(mask_edits.clicked, chart, slot="grid"),
        selection_mode="points",
    )
    st.caption(
        "Click a cell to toggle its head. Rows: dashed orange outline = drop-QK (queries and keys dropped, values "
        "kept), grey with a red outline = attention removed; each row's mode and alpha are written at its right."
    )
    scaffold.errors_at("grid")

    with st.form("toggle_head"):
        a, b_col = st.columns(2)
        a.number_input("Layer", 0, shape.num_layers - 1, shape.num_layers - 1, key="toggle_layer")
        b_col.number_input("Head", 0, shape.num_heads - 1, 0, key="toggle_head")
        st.form_submit_button("Toggle head", on_click=scaffold.safe(mask_edits.toggle_from_form, slot="toggle"))
    scaffold.errors_at("toggle")

    chosen_layer = st.number_input(
        "Layer to set", 0, shape.num_layers - 1, shape.num_layers - 1, key="mode_layer", help="The form shows its mode"
    )
    mask_edits.prefill_layer_form(mask, int(chosen_layer))
    with st.form("layer_mode"):
        a, b_col = st.columns(2)
        a.selectbox("Mode", MODES, key="mode_mode")
        b_col.number_input("alpha", 0.0, max(4.0, float(st.session_state.mode_alpha)), step=0.05, key="mode_alpha")
        st.form_submit_button("Apply to layer", on_click=scaffold.safe(mask_edits.set_layer, slot="layer"))
    scaffold.errors_at("layer")

    a, b_col = st.columns([2, 1])
    how = a.radio("Rescale", ("closed-form alpha", "greedy search"), horizontal=True, key="rescale_how")
    if b_col.button("Rescale this mask", help="Per-layer alpha for every drop-QK or head-pruned layer, on calibration"):
        with scaffold.reported():
            result = backend.rescaled(lm, mask, search=how == "greedy search")
            alphas = ", ".join(f"{i}: {a:g}" for i, a in result.alpha.items())
            mask_edits.change(lm, result.mask, f"rescaled ({how}: α {alphas})")
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
a.selectbox("Preset", mask_edits.PRESETS, key="preset_name")
b_col.selectbox("Metric", list(HEAD_METRICS), index=list(HEAD_METRICS).index("magnitude"), key="preset_metric")
c.number_input("k heads", 1, shape.num_layers * shape.num_heads, shape.num_heads, key="preset_k")
d.button("Apply preset", on_click=scaffold.safe(mask_edits.preset_from_form, slot="preset"))
scaffold.errors_at("preset")
st.file_uploader(
    f"…or upload a mask file (headroom.mask JSON, at most {MAX_MASK_BYTES // 2**20} MiB)",
    type=["json"],
    max_upload_size=MAX_MASK_BYTES // 2**20,  # Streamlit's megabytes are MiB; decode_mask checks the bytes too
    key="mask_file",
    on_change=scaffold.safe(mask_edits.upload, slot="upload"),
    args=("mask_file",),
)
scaffold.errors_at("upload")

st.subheader("Greedy continuations")
prompt = st.text_input("Prompt", "The history of the city begins", key="prompt")
new_tokens = st.number_input("New tokens", 1, 128, 24)
if st.button("Generate"):
    with st.spinner("Generating with the KV cache (drop-QK layers store nothing)…"), scaffold.reported():
        a, b_col = st.columns(2)
        a.markdown(editor.generation("Unpruned", prompt, greedy_continuation(lm, prompt, None, int(new_tokens))))
        b_col.markdown(editor.generation("Masked", prompt, greedy_continuation(lm, prompt, mask, int(new_tokens))))

with panel:
    live_panel.show(live, mask, mask_edits.last_change(lm, mask))
