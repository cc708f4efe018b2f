"""HARP: drop-QK layers with a searched alpha, its search trace, norm-matching alpha and the matched baselines."""

from __future__ import annotations

import streamlit as st

from analysis.baselines import AXES
from analysis.harp import DEFAULT_GRID, top_layers
from ui import backend, harp_view, plots, session

LAYER_CHOICES = ("top N", "chosen N (greedy on perplexity)", "a layer set")

lm = backend.model()
num_layers = lm.shape.num_layers
with st.form("harp"):
    a, b, c, d = st.columns(4)
    by = a.radio(
        "Layers",
        LAYER_CHOICES,
        help="chosen N: each step tries every remaining layer in drop-QK with its norm-matching alpha and keeps "
        "the one of lowest calibration perplexity; slower than top N (a pass per candidate layer)",
    )
    n = a.number_input("N", 1, num_layers, min(4, num_layers))
    layer_set = b.multiselect("Layer set", list(range(num_layers)), default=[num_layers - 1])
    step = c.number_input("alpha grid step", 0.01, 1.0, 0.1, 0.05)
    top = c.number_input("largest alpha", 0.0, 4.0, 1.0, 0.5)
    calib_tokens = d.number_input(
        "Calibration tokens",
        int(session.choice(session.SEQLEN)),
        1 << 20,
        int(session.choice(session.MAX_TOKENS)),
        int(session.choice(session.SEQLEN)),
    )
    if st.form_submit_button("Run HARP"):
        st.session_state[session.HARP_RUN] = backend.HarpRun(
            layers=tuple(top_layers(num_layers, int(n))) if by != LAYER_CHOICES[2] else tuple(sorted(layer_set)),
            grid=tuple(round(i * step, 6) for i in range(round(top / step) + 1)),
            calib_tokens=int(calib_tokens),
            choose=int(n) if by == LAYER_CHOICES[1] else 0,
        )

run = st.session_state.get(session.HARP_RUN)
default = backend.HarpRun(
    tuple(top_layers(num_layers, min(4, num_layers))), DEFAULT_GRID, int(session.choice(session.MAX_TOKENS))
)
planned = run or default
what = f"choosing {planned.choose} layers" if planned.choose else f"{len(planned.layers)} layers"
size = f"A search of {what} x {len(planned.grid)} alphas: "
st.caption(size + backend.harp_job(lm).expected(planned.candidates(num_layers)))
result = backend.harp_result(lm, run) if run else backend.stored_harp_result(lm, default)
if result is None:
    st.info("Choose the layers and the grid, then run HARP. A run seen before comes from the disk cache.")
    st.stop()
if run is None:
    st.caption(
        f"The form's default run (layers {list(default.layers)}, alphas {min(DEFAULT_GRID)} to {max(DEFAULT_GRID)}), "
        "from the disk cache: it was run before. Run HARP for another."
    )
if st.button("Send to the mask editor", type="primary"):
    session.change_mask(lm, result.mask)
    st.switch_page("app_pages/4_Mask_editor.py")
cols = st.columns(4)
for col, (label, value) in zip(
    cols,
    (
        ("unpruned", result.unpruned_perplexity),
        ("drop-QK, alpha = 1", result.alpha1_perplexity),
        ("HARP (searched alpha)", result.calib_perplexity),
        ("norm-matching alpha", result.norm_matching_perplexity),
    ),
    strict=True,
):
    col.metric(f"Calibration perplexity, {label}", f"{value:.3f}")
if result.selection:
    st.caption("Layers chosen, in order: " + ", ".join(str(s.layer) for s in result.selection))

left, right = st.columns(2)
left.plotly_chart(harp_view.alpha_bars(result))
left.caption("How much of each drop-QK layer's attention output is kept: 1 all of it, 0 none.")
right.plotly_chart(harp_view.search_trace(result))
right.caption(
    "Each curve is one layer's alpha search with the layers above already set; its lowest point is the alpha "
    "chosen. The closer the minima come to the dotted unpruned line, the less the drop-QK layers cost."
)

st.subheader("Matched-budget comparison on held-out text")
axis = st.radio("Match the baselines on", AXES, format_func=plots.AXIS_LABELS.get, horizontal=True)
st.caption("Comparison: " + backend.compare_job(lm).expected())
if st.button("Compare with the baselines") or st.session_state.get("compared") == (planned, axis):
    st.session_state["compared"] = (planned, axis)
    comparison = backend.comparison(lm, planned, axis)
    rows = sorted(comparison.rows, key=lambda r: r.eval_perplexity)
    st.plotly_chart(harp_view.matched_budget(rows, axis))
    st.caption(
        f"Lower is better. Every baseline saves at least what HARP (the red star) saves in {plots.AXIS_LABELS[axis]} "
        f"(at sequence length {comparison.seqlen:,}; each row says how much), so the methods left of the star beat "
        "HARP at its own budget. The dotted line is the unpruned model."
    )
    picked = harp_view.comparison_table(rows)
    a, b = st.columns([2, 1])
    method = a.selectbox(
        "Load a row's mask into the editor (or click its row)",
        [r.method for r in rows],
        index=picked[0] if picked else 0,
    )
    if b.button("Send to the mask editor", key="compare_send"):
        session.change_mask(lm, next(r.mask for r in rows if r.method == method))
        st.switch_page("app_pages/4_Mask_editor.py")
