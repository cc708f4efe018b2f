"""What the Importance page draws beside the head heatmap: metric agreement and one head's attention pattern."""

from __future__ import annotations

from collections.abc import Sequence

import plotly.graph_objects as go

from ui.plots import LAYOUT, title


def agreement_heatmap(
    values: Sequence[Sequence[float]], metrics: Sequence[str], title_text: str, colourbar: str, zmin: float
) -> go.Figure:
    """A metric x metric heatmap of an agreement (Spearman's rho, top-k overlap) with each value written in."""
    fig = go.Figure(
        go.Heatmap(
            z=values,
            x=metrics,
            y=metrics,
            zmin=zmin,
            zmax=1,
            colorscale="RdBu",
            text=[[f"{v:.2f}" for v in row] for row in values],
            texttemplate="%{text}",
            colorbar={"title": {"text": colourbar}},
        )
    )
    fig.update_layout(title=title(title_text), xaxis_title="metric", yaxis_title="metric", **LAYOUT)
    return fig


def attention_heatmap(pattern: list[list[float]], tokens: list[str], title_text: str) -> go.Figure:
    """One head's attention weights, query rows (position 0 at the top) over key columns, hover naming the tokens."""
    fig = go.Figure(
        go.Heatmap(
            z=pattern,
            x=tokens,
            y=tokens,
            colorscale="Blues",
            colorbar={"title": {"text": "weight"}},
            hovertemplate="query %{y}<br>key %{x}<br>weight %{z:.3f}<extra></extra>",
        )
    )
    fig.update_layout(
        title=title(title_text),
        xaxis={"title": "key position", "showticklabels": False},
        yaxis={"title": "query position (0 at the top)", "autorange": "reversed", "showticklabels": False},
        height=560,
        **LAYOUT,
    )
    return fig
