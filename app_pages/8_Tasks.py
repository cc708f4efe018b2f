"""Tasks: the offline task suite (passkey, induction, last word, continuation, long context) side by side.

Unpruned, the session's mask and any saved mask files the user uploads. Results come from the disk
cache when computed before (by this page or ``python -m analysis tasks``); the rest run on request.
"""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from analysis.lm_eval_tasks import length_label
from analysis.mask_files import MAX_MASK_BYTES, decode_mask
from analysis.masks import Mask
from analysis.task_suite import BUILT_IN, TaskResult
from ui import backend, plots, session


def headline_table(results: dict[str, dict[str, TaskResult]]) -> pd.DataFrame:
    """One row per mask, one column per headline number of every task."""
    rows = {label: {k: v for r in tasks.values() for k, v in r.headline().items()} for label, tasks in results.items()}
    return pd.DataFrame.from_dict(rows, orient="index")


def bars(table: pd.DataFrame, columns: list[str], title: str, axis: str) -> go.Figure:
    fig = go.Figure([go.Bar(name=label, x=columns, y=table.loc[label, columns].tolist()) for label in table.index])
    fig.update_layout(title=title, yaxis={"title": axis}, barmode="group", height=380, **plots.LAYOUT)
    return fig


def passkey_heatmap(result: TaskResult, label: str) -> go.Figure:
    lengths, depths, grid = result.grid()
    fig = go.Figure(
        go.Heatmap(
            z=grid,
            x=[length_label(n) for n in lengths],
            y=[f"{d:.0%}" for d in depths],
            zmin=0,
            zmax=1,
            colorscale="Viridis",
            colorbar={"title": {"text": "accuracy"}},
            hovertemplate="context %{x} tokens<br>key at depth %{y}<br>accuracy %{z:.2f}<extra></extra>",
        )
    )
    fig.update_layout(
        title=label, xaxis={"title": "context (tokens)"}, yaxis={"title": "key depth"}, height=320, **plots.LAYOUT
    )
    return fig


def loss_curves(results: dict[str, dict[str, TaskResult]], seqlen: int) -> go.Figure:
    fig = go.Figure()
    for label, tasks in results.items():
        row = next(r for r in tasks["long_ppl"].rows if r.seqlen == seqlen)
        centres = [row.bin_tokens * i + row.bin_tokens / 2 for i in range(len(row.loss_by_position))]
        fig.add_trace(go.Scatter(x=centres, y=list(row.loss_by_position), mode="lines+markers", name=label))
    fig.update_layout(
        title=f"Mean loss by position in {seqlen}-token windows of default-eval",
        xaxis={"title": "token position (bin centre)"},
        yaxis={"title": "mean NLL (nats)"},
        height=400,
        **plots.LAYOUT,
    )
    return fig


lm = backend.model()
current = session.current_mask(lm)
names = st.multiselect("Tasks", list(BUILT_IN), default=list(BUILT_IN), key="tasks_names")
files = st.file_uploader(
    f"Saved masks to compare (mask JSON files, at most {MAX_MASK_BYTES // 2**20} MiB each)",
    type=["json"],
    accept_multiple_files=True,
    max_upload_size=MAX_MASK_BYTES // 2**20,
    key="tasks_mask_files",
)
masks: dict[str, Mask | None] = {"unpruned": None}
if not current.is_unpruned:
    masks["current mask"] = current
for file in files or []:
    masks[file.name] = decode_mask(file.name, file.getvalue(), lm.shape, lm.name, lm.fingerprint)
st.caption(" · ".join(f"**{label}**: {m.describe() if m else 'no mask'}" for label, m in masks.items()))

stored = {label: backend.stored_tasks(lm, names, mask) for label, mask in masks.items()}
missing = [label for label, tasks in stored.items() if None in tasks.values()]
if names and missing:
    st.info(
        f"Not computed yet for {', '.join(missing)}. On the default model the whole suite takes a few minutes "
        "per mask on a CPU; results are cached, here and for `python -m analysis tasks`."
    )
    if st.button("Run the tasks", type="primary", key="tasks_run"):
        for label in missing:
            backend.task_suite(lm, names, masks[label], label)
        st.rerun()  # drawn again from the cache, without this notice
results = {label: tasks for label, tasks in stored.items() if None not in tasks.values()}

if names and results:
    table = headline_table(results)
    st.dataframe(table)
    fractions = [c for c in table.columns if not c.startswith("perplexity")]
    perplexities = [c for c in table.columns if c.startswith("perplexity")]
    if fractions:
        st.plotly_chart(bars(table, fractions, "Accuracy and agreement per task", "fraction"))
    if perplexities:
        st.plotly_chart(bars(table, perplexities, "Long-context perplexity of default-eval", "perplexity"))
    if "passkey" in names:
        st.subheader("Passkey accuracy by key depth and context length")
        for column, (label, tasks) in zip(st.columns(len(results)), results.items(), strict=True):
            column.plotly_chart(passkey_heatmap(tasks["passkey"], label), key=f"passkey_{label}")
        skipped = next(iter(results.values()))["passkey"].skipped_lengths
        if skipped:
            st.caption(f"Longer than the model's context, not run: {', '.join(map(str, skipped))} tokens.")
    if "long_ppl" in names:
        seqlens = [row.seqlen for row in next(iter(results.values()))["long_ppl"].rows]
        if seqlens:
            seqlen = st.selectbox("Window length of the loss curve", seqlens, len(seqlens) - 1, key="tasks_seqlen")
            st.plotly_chart(loss_curves(results, seqlen))
        else:
            st.caption("No long-context window length fits this model's context.")
