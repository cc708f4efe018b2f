"""Importance: head scores of any metric as a layers x heads heatmap, their agreement, Block Influence, head details."""

from __future__ import annotations

import streamlit as st
import torch

from analysis.attention_patterns import attention_pattern
from analysis.importance import CHEAP_METRICS, HEAD_METRICS, metric_agreement, ranks
from ui import backend, head_grids, importance_view, plots, session

GRID, LAYER, HEAD, CLICKED = "importance_grid", "details_layer", "details_head", "importance_clicked"

lm = backend.model()
calib = backend.windows(lm, session.CALIB_TEXT)
shape = lm.shape
# A click on the grid selects that head for the details beside it (the number inputs can change it after).
clicked = head_grids.selected_head(st.session_state.get(GRID))
if clicked is not None and clicked != st.session_state.get(CLICKED):
    st.session_state[CLICKED] = clicked
    st.session_state[LAYER], st.session_state[HEAD] = clicked
st.session_state.setdefault(LAYER, shape.num_layers - 1)
st.session_state.setdefault(HEAD, 0)

a, b, c = st.columns([2, 3, 3])
metric = a.selectbox("Metric", list(HEAD_METRICS), index=list(HEAD_METRICS).index("magnitude"))
scale = b.radio("Colour", head_grids.SCALES, horizontal=True, help=head_grids.SCALE_HELP)
layers = c.multiselect(
    "Layers to score (empty: all; ablation costs a pass of the layers above per head)",
    list(range(shape.num_layers)),
)
job = backend.metric_job(lm, metric)
units = shape.num_heads * len(layers or range(shape.num_layers)) if metric == "ablation" else calib.num_windows
st.caption(f"Scoring by {metric} (once; then from the disk cache): {job.expected(units)}")
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

layer, head = int(st.session_state[LAYER]), int(st.session_state[HEAD])
grid, bars, details = st.columns([6, 2, 3])
with grid:
    fig = head_grids.head_heatmap(
        scores,
        f"{metric} per head ({calib.text_name}, {calib.predicted_tokens:,} tokens)",
        metric,
        scale,
        shape.num_heads,
        selected=(layer, head),
    )
    st.plotly_chart(fig, key=GRID, on_select="rerun", selection_mode="points")
    st.caption(
        "Dark heads are the cheapest to remove by this metric. If a few layers take the whole colour range, "
        "'robust' or 'per layer' shows the rest. The red square is the head detailed on the right."
    )
with bars:
    means = [sum(row) / len(row) if row else None for row in scores]
    st.plotly_chart(plots.layer_bars(means, "layer mean", f"mean {metric}"))
st.subheader("Agreement between metrics")
chosen = st.multiselect(
    "Metrics to compare", list(HEAD_METRICS), default=[m for m in HEAD_METRICS if m in CHEAP_METRICS or m == metric]
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
with details:
    st.markdown("**Head details**")
    a, b = st.columns(2)
    a.number_input("Layer", 0, shape.num_layers - 1, key=LAYER)
    b.number_input("Head", 0, shape.num_heads - 1, key=HEAD)
    order = {m: ranks(rows) for m, rows in loaded.items()}
    st.table(
        {
            "metric": list(loaded),
            "score": [f"{rows[layer][head]:.4g}" if rows[layer] else "not scored" for rows in loaded.values()],
            "rank (1 = lowest)": [str(order[m][layer][head]) for m in loaded],
        }
    )
    st.caption(
        f"Rank among {sum(v is not None for row in scores for v in row)} scored heads; turn on the "
        "comparison below to add every chosen metric."
    )

if len(tensors) >= 2:
    k = st.slider("k lowest heads for the overlap", 1, shape.num_layers * shape.num_heads, shape.num_heads * 2)
    agreement = metric_agreement(tensors, k)
    spearman, overlap = st.columns(2)
    spearman.plotly_chart(
        importance_view.agreement_heatmap(
            agreement.spearman, agreement.metrics, "Spearman rank correlation", "rho", zmin=-1
        )
    )
    overlap.plotly_chart(
        importance_view.agreement_heatmap(
            agreement.top_k_overlap,
            agreement.metrics,
            f"overlap of the {k} lowest heads (row in column)",
            "share",
            zmin=0,
        )
    )

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

st.subheader(f"Attention pattern of layer {layer}, head {head}")
window = st.number_input("Window of the attention pattern", 0, calib.num_windows - 1, 0)
ids = calib.input_ids[int(window)]
pattern = attention_pattern(lm.arch, ids, int(layer), int(head))
tokens = [f"{i}: {lm.tokenizer.decode([t])!r}" for i, t in enumerate(ids.tolist())]
title = f"Attention of layer {layer}, head {head} on window {window} (rows sum to 1)"
st.plotly_chart(importance_view.attention_heatmap(pattern.tolist(), tokens, title))
