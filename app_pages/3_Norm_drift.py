"""Norm drift: the residual-stream norm under the unpruned model and a mask, with and without rescaling."""

from __future__ import annotations

import plotly.graph_objects as go
import streamlit as st

from ui import backend, plots, session

lm = backend.model()
sources = ["the editor's mask"] + (["the last HARP result"] if st.session_state.get(session.HARP_RUN) else [])
source = st.radio("Mask", sources, horizontal=True)
mask = (
    backend.harp_result(lm, st.session_state[session.HARP_RUN]).mask
    if source != sources[0]
    else session.current_mask(lm)
)
st.caption(f"Mask: {mask.describe()}")
if mask.is_unpruned:
    st.info("This mask is unpruned, so nothing drifts. Prune heads in the Mask editor or run HARP first.")
    st.stop()
evaluation = backend.windows(lm)
drift = backend.drift_reports(lm, evaluation, mask)
if drift.without_rescaling is None:
    reports = {"pruned": drift.mask}
else:
    reports = {"pruned, alpha = 1 (no rescaling)": drift.without_rescaling, "pruned, with its alphas": drift.mask}
first = drift.mask
series = {"unpruned": [d.unpruned.l2_mean for d in first.layers]}
bands = {"unpruned": ([d.unpruned.l2_q10 for d in first.layers], [d.unpruned.l2_q90 for d in first.layers])}
for name, report in reports.items():
    layers = report.layers
    series[name] = [d.masked.l2_mean for d in layers]
    bands[name] = ([d.masked.l2_q10 for d in layers], [d.masked.l2_q90 for d in layers])
st.plotly_chart(
    plots.layer_lines(
        series,
        f"Residual-stream L2 norm after each layer (mean, 10-90 % band; {first.tokens} tokens of {first.text})",
        "L2 norm of the residual stream",
        bands,
    )
)
cosine = {name: [d.cosine_mean for d in report.layers] for name, report in reports.items()}
st.plotly_chart(plots.layer_lines(cosine, "Cosine to the unpruned residual stream (mean over tokens)", "cosine"))
for col, (name, report) in zip(st.columns(len(reports)), reports.items(), strict=True):
    col.metric(f"Final KL(unpruned || {name})", f"{report.kl_nats_per_token:.4f} nats/token")

st.subheader("Per position")
a, b = st.columns(2)
window = a.number_input("Window", 0, evaluation.num_windows - 1, 0)
layer = b.number_input("Layer", 0, lm.shape.num_layers - 1, lm.shape.num_layers - 1)
drift = backend.window_drift(lm, evaluation, mask, int(window))
fig = go.Figure(
    go.Heatmap(
        z=drift.cosine.tolist(),
        colorscale="RdBu",
        zmin=-1,
        zmax=1,
        colorbar={"title": {"text": "cosine"}},
        hovertemplate="position %{x}<br>layer %{y}<br>cosine %{z:.3f}<extra></extra>",
    )
)
fig.update_layout(
    title=f"Cosine to unpruned per layer and position, window {window}",
    xaxis_title="token position",
    yaxis_title="layer (0 at the bottom)",
    **plots.LAYOUT,
)
st.plotly_chart(fig)
tokens = [lm.tokenizer.decode([t]) for t in drift.input_ids]
fig = go.Figure(
    [
        go.Scatter(y=drift.unpruned_l2[int(layer)].tolist(), name="unpruned", text=tokens),
        go.Scatter(y=drift.masked_l2[int(layer)].tolist(), name="pruned", text=tokens),
    ]
)
fig.update_layout(
    title=f"Residual-stream norm after layer {layer} along window {window}",
    xaxis_title="token position",
    yaxis_title="L2 norm",
    **plots.LAYOUT,
)
st.plotly_chart(fig)
