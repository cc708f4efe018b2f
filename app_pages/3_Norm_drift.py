"""Norm drift: the residual-stream norm under the unpruned model and a mask, with and without rescaling."""

from __future__ import annotations

import plotly.graph_objects as go
import streamlit as st

from ui import backend, plots, session

NAMES = {"without_rescaling": "pruned, alpha = 1 (no rescaling)", "mask": "pruned, with its alphas"}

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
st.caption(
    "Drift (once per mask; then from the disk cache): " + backend.drift_job(lm, mask).expected(evaluation.num_windows)
)
drift = backend.drift_reports(lm, evaluation, mask)
if drift.without_rescaling is None:
    reports = {"pruned": drift.mask}
else:
    reports = {NAMES["without_rescaling"]: drift.without_rescaling, NAMES["mask"]: drift.mask}
colours = {
    "unpruned": plots.method_colour("unpruned"),
    NAMES["mask"]: plots.method_colour("harp"),
    NAMES["without_rescaling"]: plots.method_colour("drop_qk"),
    "pruned": plots.method_colour("harp"),
}
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
        f"Residual-stream L2 norm after each layer ({first.tokens:,} tokens of {first.text})",
        "L2 norm of the residual stream",
        bands,
        colours=colours,
        reference="unpruned",
    )
)
above = [d.layer for d in first.layers if d.unpruned.l2_mean > d.unpruned.l2_q90]
st.caption(
    "Lines are means over tokens, shaded bands hold the middle 80 % of tokens; the dashed line is the unpruned "
    "model. Where a pruned curve leaves it, the mask changes the stream's scale, which is what rescaling corrects."
    + (
        f" At {len(above)} of {len(first.layers)} layers the unpruned mean lies above its own band: a few tokens "
        "(typically a window's first token, the attention sink) have norms many times the rest and pull the mean "
        "up. The band shows the typical token; the per-position view below finds the outliers."
        if above
        else ""
    )
)
cosine = {name: [d.cosine_mean for d in report.layers] for name, report in reports.items()}
st.plotly_chart(
    plots.layer_lines(cosine, "Cosine to the unpruned residual stream (mean over tokens)", "cosine", colours=colours)
)
st.caption(
    "1 means the direction of the stream is unchanged; the first layer below 1 is the lowest one the mask changes."
)
for col, (name, report) in zip(st.columns(len(reports)), reports.items(), strict=True):
    col.metric(f"Final KL(unpruned || {name})", f"{report.kl_nats_per_token:.4f} nats/token")

st.subheader("Per position")
a, b = st.columns(2)
window = a.number_input("Window", 0, evaluation.num_windows - 1, 0)
layer = b.number_input("Layer", 0, lm.shape.num_layers - 1, lm.shape.num_layers - 1)
drift = backend.window_drift(lm, evaluation, mask, int(window))
low = float(drift.cosine.min())
fig = go.Figure(
    go.Heatmap(
        z=drift.cosine.tolist(),
        colorscale="Viridis",
        zmin=low,
        zmax=1,
        colorbar={"title": {"text": "cosine"}},
        hovertemplate="position %{x}<br>layer %{y}<br>cosine %{z:.4f}<extra></extra>",
    )
)
fig.update_layout(
    title=plots.title(f"Cosine to unpruned per layer and position, window {window}"),
    xaxis_title="token position",
    yaxis_title="layer (0 at the bottom)",
    **plots.LAYOUT,
)
st.plotly_chart(fig)
st.caption(
    f"Colours span this window's own range, {low:.4f} (dark) to 1 (yellow, unchanged): dark rows start at the "
    "layers the mask changes, dark columns are the tokens it disturbs most."
)
tokens = [lm.tokenizer.decode([t]) for t in drift.input_ids]
unpruned_l2, masked_l2 = drift.unpruned_l2[int(layer)], drift.masked_l2[int(layer)]
fig = go.Figure(
    [
        go.Scatter(y=unpruned_l2.tolist(), name="unpruned", text=tokens, line={"color": colours["unpruned"]}),
        go.Scatter(y=masked_l2.tolist(), name="pruned", text=tokens, line={"color": colours["pruned"]}),
    ]
)
fig.update_layout(
    title=plots.title(f"Residual-stream norm after layer {layer} along window {window}"),
    xaxis_title="token position",
    yaxis={"title": "L2 norm (log)", "type": "log"},
    **plots.LAYOUT,
)
st.plotly_chart(fig)
top = int(unpruned_l2.argmax())
st.caption(
    f"The largest unpruned norm here is {unpruned_l2[top].item():,.0f} at position {top} ({tokens[top]!r}), "
    f"{unpruned_l2[top].item() / unpruned_l2.median().item():,.0f} times the median token's "
    f"{unpruned_l2.median().item():,.1f}: such tokens lift the mean above the band in the plot above."
)
