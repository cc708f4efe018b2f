"""HARP: drop-QK layers with a searched alpha, its search trace, norm-matching alpha and the matched baselines."""

from __future__ import annotations

import plotly.graph_objects as go
import streamlit as st

from analysis.baselines import AXES, saved
from analysis.harp import top_layers
from ui import backend, plots, session

AXIS_LABELS = {
    "params": "attention parameters removed",
    "kv": "KV-cache bytes per token saved",
    "flops": "attention FLOPs per token saved",
}

lm = backend.model()
num_layers = lm.shape.num_layers
with st.form("harp"):
    a, b, c, d = st.columns(4)
    by = a.radio("Layers", ("top N", "a layer set"))
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
            layers=tuple(top_layers(num_layers, int(n))) if by == "top N" else tuple(sorted(layer_set)),
            grid=tuple(round(i * step, 6) for i in range(round(top / step) + 1)),
            calib_tokens=int(calib_tokens),
        )

run = st.session_state.get(session.HARP_RUN)
if run is None:
    st.info("Choose the layers and the grid, then run HARP. A run seen before comes from the disk cache.")
    st.stop()
result = backend.harp_result(lm, run)
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

layers = list(result.layers)
fig = go.Figure(
    [
        go.Bar(x=layers, y=[result.alpha[i] for i in layers], name="searched"),
        go.Bar(x=layers, y=[result.norm_matching_alpha[i] for i in layers], name="norm-matching"),
    ]
)
fig.update_layout(
    title="alpha per layer",
    xaxis={"title": "layer", "dtick": 1, "type": "category"},
    yaxis_title="alpha (branch scale)",
    **plots.LAYOUT,
)
left, right = st.columns(2)
left.plotly_chart(fig)
fig = go.Figure()
for layer in sorted(layers, reverse=True):
    steps = [s for s in result.trace if s.layer == layer]
    fig.add_trace(
        go.Scatter(
            x=[s.alpha for s in steps],
            y=[s.perplexity for s in steps],
            mode="lines+markers",
            name=f"layer {layer} (chose {result.alpha[layer]:g})",
        )
    )
fig.add_hline(y=result.unpruned_perplexity, line_dash="dot", annotation_text="unpruned")
fig.update_layout(
    title="Search trace: calibration perplexity vs alpha, searched from the top layer down",
    xaxis_title="alpha",
    yaxis={"title": "calibration perplexity (log)", "type": "log"},
    **plots.LAYOUT,
)
right.plotly_chart(fig)

st.subheader("Matched-budget comparison on held-out text")
axis = st.radio("Match the baselines on", AXES, format_func=AXIS_LABELS.get, horizontal=True)
if st.button("Compare with the baselines") or st.session_state.get("compared") == (run, axis):
    st.session_state["compared"] = (run, axis)
    comparison = backend.comparison(lm, run, axis)
    rows = comparison.rows
    fig = go.Figure(
        go.Scatter(
            x=[saved(r.budget, axis) for r in rows],
            y=[r.eval_perplexity for r in rows],
            mode="markers+text",
            text=[r.method for r in rows],
            textposition="top center",
        )
    )
    fig.update_layout(
        title=f"Perplexity vs budget ({AXIS_LABELS[axis]}, sequence length {comparison.seq_len})",
        xaxis_title=AXIS_LABELS[axis],
        yaxis={"title": "evaluation perplexity (log)", "type": "log"},
        height=520,
        **plots.LAYOUT,
    )
    st.plotly_chart(fig)
    st.dataframe(
        {
            "method": [r.method for r in rows],
            "eval perplexity": [round(r.eval_perplexity, 3) for r in rows],
            "params removed": [r.budget.params_removed for r in rows],
            "KV B/token saved": [r.budget.kv_bytes_per_token_saved for r in rows],
            "attn FLOPs/token saved": [r.budget.attention_flops_per_token_saved for r in rows],
        }
    )
