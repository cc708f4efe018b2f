"""Pareto: every mask the cache holds for this model, held-out perplexity vs saving, with the front.

Clicking a point or a table row makes its mask the session's mask (the editor opens on it; undo there
brings the previous one back).
"""

from __future__ import annotations

import plotly.graph_objects as go
import streamlit as st

from analysis.baselines import AXES
from analysis.mask_files import parse_mask
from analysis.pareto import Front, pareto
from ui import backend, collection, plots, progress, scaffold, session

CHART, TABLE, PICK = "pareto_chart", "pareto_table", "pareto_pick"
SHOWN = "pareto_shown"  # the masks (JSON) of the points drawn, by index: what a click loads
LOADED = "pareto_loaded"  # the label of the point loaded last


def load(index: int) -> None:
    lm = backend.model()
    label, obj = st.session_state[SHOWN][index]
    session.change_mask(lm, parse_mask(obj, lm.shape, lm.name, lm.fingerprint))
    st.session_state[LOADED] = label


def clicked() -> None:
    for point in plots.selection_points(st.session_state.get(CHART)):
        if point.get("customdata") is not None:
            load(int(point["customdata"][0]))
            return


def row_selected() -> None:
    rows = st.session_state.get(TABLE, {}).get("selection", {}).get("rows", [])
    if rows:
        load(int(rows[0]))


def picked() -> None:
    if st.session_state.get(PICK) is not None:
        load(int(st.session_state[PICK]))


def figure(result: Front) -> go.Figure:
    """One marker trace per method; the front as a step line (best perplexity at a saving of at least x)."""
    fig = go.Figure()
    methods = sorted({p.method for p in result.points})
    for method in methods:
        index = [i for i, p in enumerate(result.points) if p.method == method]
        fig.add_trace(
            go.Scatter(
                x=[result.points[i].saving(result.axis) for i in index],
                y=[result.points[i].eval_perplexity for i in index],
                customdata=[[i, result.points[i].label] for i in index],
                mode="markers",
                name=method,
                marker={"size": 10, "symbol": ["star" if i in result.front else "circle" for i in index]},
                hovertemplate="%{customdata[1]}<br>saves %{x:,}<br>held-out perplexity %{y:.3f}<extra>"
                + method
                + "</extra>",
            )
        )
    front = [result.points[i] for i in result.front]
    fig.add_trace(
        go.Scatter(
            x=[p.saving(result.axis) for p in front],
            y=[p.eval_perplexity for p in front],
            mode="lines",
            line={"shape": "vh", "dash": "dot", "color": "black"},
            name="Pareto front",
            hoverinfo="skip",
        )
    )
    fig.update_layout(
        title=f"Held-out perplexity vs {plots.AXIS_LABELS[result.axis]} (stars: on the front)",
        xaxis_title=plots.AXIS_LABELS[result.axis],
        yaxis={"title": "held-out perplexity (log)", "type": "log"},
        height=560,
        **plots.LAYOUT,
    )
    return fig


lm = backend.model()
evaluation = backend.windows(lm)
with st.expander("Save the session's mask to the collection"):
    st.caption(session.current_mask(lm).describe())
    collection.save_mask_box(lm, session.current_mask(lm), key="pareto_save")
axis = st.radio("Saving on", AXES, index=AXES.index("kv"), format_func=plots.AXIS_LABELS.get, horizontal=True)
with progress.progress_bar("Evaluating the cached masks on the held-out text (cached after the first time)") as bar:
    result = pareto(lm, evaluation, axis, backend.disk_cache(), bar)
st.session_state[SHOWN] = [(p.label, p.mask.to_json()) for p in result.points]
st.caption(
    f"{len(result.points)} masks from the cache of {lm.name}: HARP runs, chosen layers, searches, rescaled masks, "
    f"the baselines of every comparison and the masks saved under a name; {len(result.front)} on the front. "
    f"Perplexity on {evaluation.text_name}, {evaluation.num_windows} windows of {evaluation.seqlen} tokens. "
    "Click a point or a row to load its mask into the editor."
)
if st.session_state.get(LOADED):
    st.success(f"Loaded '{st.session_state[LOADED]}' into the mask editor.")
    st.page_link("app_pages/4_Mask_editor.py", label="Open the mask editor", icon=":material/edit:")
st.plotly_chart(figure(result), key=CHART, on_select=scaffold.safe(clicked), selection_mode="points")
on_front = set(result.front)
st.dataframe(
    {
        "front": ["*" if i in on_front else "" for i in range(len(result.points))],
        "method": [p.method for p in result.points],
        "mask": [p.label for p in result.points],
        "held-out perplexity": [round(p.eval_perplexity, 3) for p in result.points],
        "params removed": [p.budget.params_removed for p in result.points],
        "KV B/token saved": [p.budget.kv_bytes_per_token_saved for p in result.points],
        "attn FLOPs/token saved": [p.budget.attention_flops_per_token_saved for p in result.points],
    },
    key=TABLE,
    on_select=scaffold.safe(row_selected),
    selection_mode="single-row",
)
st.selectbox(
    "Or pick a mask to load into the editor",
    range(len(result.points)),
    index=None,
    format_func=lambda i: f"{result.points[i].label} ({result.points[i].eval_perplexity:.2f})",
    key=PICK,
    on_change=scaffold.safe(picked),
)
