"""Importance: head scores of any metric as a layers x heads heatmap, their agreement, Block Influence, head details."""

from __future__ import annotations

import plotly.graph_objects as go
import streamlit as st
import torch

from analysis.attention_patterns import attention_pattern
from analysis.importance import HEAD_METRICS, metric_agreement, ranks
from ui import backend, plots, session

CHEAP = ("magnitude", "wanda_sp", "flap_wifv")  # one pass or none; the default comparison set

lm = backend.model()
calib = backend.windows(lm, session.CALIB_TEXT)
shape = lm.shape
a, b, c = st.columns([2, 2, 3])
metric = a.selectbox("Metric", list(HEAD_METRICS), index=list(HEAD_METRICS).index("magnitude"))
scale = b.radio("Colour", plots.SCALES, horizontal=True, help="log needs positive scores; rank 1 is the lowest")
layers = c.multiselect(
    "Layers to score (empty: all; ablation costs a pass of the layers above per head)",
    list(range(shape.num_layers)),
)
result = backend.head_result(lm, calib, metric, layers or None)
scores = result.scores
if metric == "integrated_gradients":
    d = result.details
    st.info(
        f"Completeness check: the attributions sum to {d['attribution_sum']:.4f} nats; removing every head "
        f"raises the loss by {d['loss_no_heads'] - d['loss_all_heads']:.4f} (from {d['loss_all_heads']:.4f} to "
        f"{d['loss_no_heads']:.4f}). The {d['steps']}-point integral misses by {d['completeness_error']:.4f}: "
        "a large miss means the loss is rough along the path and the attributions are unreliable."
    )

left, right = st.columns([3, 1])
with left:
    fig = plots.head_heatmap(
        scores,
        f"{metric} per head ({calib.text_name}, {calib.predicted_tokens} tokens)",
        metric,
        scale,
        shape.num_heads,
    )
    event = st.plotly_chart(fig, key="importance_grid", on_select="rerun", selection_mode="points")
with right:
    means = [sum(row) / len(row) if row else None for row in scores]
    st.plotly_chart(plots.layer_bars(means, f"mean {metric} per layer", f"mean {metric}"))

st.subheader("Agreement between metrics")
chosen = st.multiselect(
    "Metrics to compare", list(HEAD_METRICS), default=[m for m in HEAD_METRICS if m in CHEAP or m == metric]
)
compared = st.toggle("Compare these metrics (each is computed once, then read from the cache)", key="compare")
loaded = {metric: scores}
if compared:
    loaded |= {m: backend.head_scores(lm, calib, m, layers or None) for m in chosen if m != metric}
tensors = {
    m: torch.tensor(
        [[float("nan") if v is None else v for v in (row or [None] * shape.num_heads)] for row in rows],
        dtype=torch.float64,
    )
    for m, rows in loaded.items()
    if m in chosen
}
if len(tensors) >= 2:
    k = st.slider("k lowest heads for the overlap", 1, shape.num_layers * shape.num_heads, shape.num_heads * 2)
    agreement = metric_agreement(tensors, k)
    cols = st.columns(2)
    for col, (values, title) in zip(
        cols,
        (
            (agreement.spearman, "Spearman rank correlation"),
            (agreement.top_k_overlap, f"overlap of the {k} lowest heads (row in column)"),
        ),
        strict=True,
    ):
        fig = go.Figure(
            go.Heatmap(
                z=values,
                x=agreement.metrics,
                y=agreement.metrics,
                zmin=-1 if "Spearman" in title else 0,
                zmax=1,
                colorscale="RdBu",
                text=[[f"{v:.2f}" for v in row] for row in values],
                texttemplate="%{text}",
                colorbar={"title": {"text": "share" if col is cols[1] else "rho"}},
            )
        )
        fig.update_layout(title=title, xaxis_title="metric", yaxis_title="metric", **plots.LAYOUT)
        col.plotly_chart(fig)

st.subheader("Block Influence per layer (ShortGPT: 1 - mean cosine of input and output)")
if st.toggle("Show Block Influence (two passes over the calibration windows, then cached)", key="influence"):
    influence = backend.block_influences(lm, calib)
    st.plotly_chart(
        plots.layer_lines(
            {"whole block": influence["block"], "attention branch": influence["attention"]},
            "Block Influence per layer",
            "Block Influence (0 = no change, 2 = reversal)",
        )
    )

st.subheader("Head details")
cell = plots.selected_head(event)
a, b, c = st.columns(3)
layer = a.number_input("Layer", 0, shape.num_layers - 1, cell[0] if cell else shape.num_layers - 1)
head = b.number_input("Head", 0, shape.num_heads - 1, cell[1] if cell else 0)
window = c.number_input("Window", 0, calib.num_windows - 1, 0)
order = {m: ranks(rows) for m, rows in loaded.items()}
st.table(
    {
        "metric": list(loaded),
        "score": [f"{rows[layer][head]:.4g}" if rows[layer] else "not scored" for rows in loaded.values()],
        "rank (1 = lowest)": [str(order[m][layer][head]) for m in loaded],
    }
)
ids = calib.input_ids[int(window)]
pattern = attention_pattern(lm.arch, ids, int(layer), int(head))
tokens = [f"{i}: {lm.tokenizer.decode([t])!r}" for i, t in enumerate(ids.tolist())]
fig = go.Figure(
    go.Heatmap(
        z=pattern.tolist(),
        x=tokens,
        y=tokens,
        colorscale="Blues",
        colorbar={"title": {"text": "weight"}},
        hovertemplate="query %{y}<br>key %{x}<br>weight %{z:.3f}<extra></extra>",
    )
)
fig.update_layout(
    title=f"Attention of layer {layer}, head {head} on window {window} (rows sum to 1)",
    xaxis={"title": "key position", "showticklabels": False},
    yaxis={"title": "query position (0 at the top)", "autorange": "reversed", "showticklabels": False},
    height=560,
    **plots.LAYOUT,
)
st.plotly_chart(fig)
