"""Plot builders the pages share; every plot puts layer 0 at the bottom (heatmaps) or on the left (curves)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import plotly.graph_objects as go

from analysis.errors import HeadroomError
from analysis.importance import ranks

LAYOUT = {"margin": {"l": 60, "r": 20, "t": 50, "b": 50}}
SCALES = ("value", "log", "rank")


def head_heatmap(
    rows: list[list[float | None]], title: str, label: str, scale: str = "value", num_heads: int | None = None
) -> go.Figure:
    """Layers x heads heatmap of a head score (layer 0 at the bottom); hover shows value and rank.

    ``scale`` colours by the value, by log10 of it (positive scores only) or by rank. Every cell can
    be clicked (see :func:`selected_head`).
    """
    width = num_heads or max(len(r) for r in rows if r)
    values = [row or [None] * width for row in rows]
    rank = ranks(values)
    n = sum(r is not None for row in rank for r in row)
    if scale == "log":
        if any(v is not None and v <= 0 for row in values for v in row):
            raise HeadroomError(
                f"{label} has zero or negative scores, so it has no log colour scale; choose value or rank"
            )
        colour = [[math.log10(v) if v is not None else None for v in row] for row in values]
        bar = f"log10 {label}"
    elif scale == "rank":
        colour, bar = rank, "rank (1 = lowest)"
    else:
        colour, bar = values, label
    hover = [
        [
            f"layer {layer}, head {head}<br>{label}: {v:.4g}<br>rank {rank[layer][head]} of {n} (1 = lowest)"
            if v is not None
            else f"layer {layer}, head {head}<br>not scored"
            for head, v in enumerate(row)
        ]
        for layer, row in enumerate(values)
    ]
    return grid_figure(colour, hover, title, bar, "Viridis")


def grid_figure(
    colour: list[list[Any]],
    hover: list[list[str]],
    title: str,
    colourbar: str | None,
    colourscale: Any,
    zmin: float | None = None,
    zmax: float | None = None,
) -> go.Figure:
    """A clickable layers x heads grid: a heatmap with an invisible marker on every cell to select it.

    ``colourbar`` None hides the colour bar (for a grid whose colours the title explains).
    """
    layers, heads = len(colour), len(colour[0])
    fig = go.Figure(
        go.Heatmap(
            z=colour,
            x=list(range(heads)),
            y=list(range(layers)),
            colorscale=colourscale,
            zmin=zmin,
            zmax=zmax,
            showscale=colourbar is not None,
            colorbar={"title": {"text": colourbar or ""}},
            hoverinfo="skip",
        )
    )
    cells = [(layer, head) for layer in range(layers) for head in range(heads)]
    fig.add_trace(
        go.Scatter(
            x=[h for _, h in cells],
            y=[layer for layer, _ in cells],
            mode="markers",
            marker={"size": 14, "opacity": 0.0, "symbol": "square"},
            customdata=[[layer, head] for layer, head in cells],
            hovertext=[hover[layer][head] for layer, head in cells],
            hoverinfo="text",
            showlegend=False,
        )
    )
    fig.update_layout(
        title=title,
        xaxis={"title": "query head", "dtick": 1, "range": [-0.5, heads - 0.5]},
        yaxis={"title": "layer (0 at the bottom)", "dtick": max(1, layers // 15), "range": [-0.5, layers - 0.5]},
        height=max(320, 18 * layers + 120),
        clickmode="event+select",
        **LAYOUT,
    )
    return fig


def selection_points(event: Any) -> list[dict[str, Any]]:
    """The selected points of a ``st.plotly_chart(..., on_select=...)`` event (a dict or an attribute object)."""
    if isinstance(event, dict):
        return event.get("selection", {}).get("points", [])
    if event is not None and hasattr(event, "selection"):
        return event.selection.get("points", [])
    return []


def selected_head(event: Any) -> tuple[int, int] | None:
    """The (layer, head) clicked in a :func:`grid_figure` chart's selection event, if any."""
    for point in selection_points(event):
        data = point.get("customdata")
        if data is not None and len(data) == 2:
            return int(data[0]), int(data[1])
    return None


def layer_bars(values: Sequence[float | None], title: str, label: str, horizontal: bool = True) -> go.Figure:
    """One bar per layer; horizontal bars put layer 0 at the bottom, beside a head heatmap."""
    layers = list(range(len(values)))
    bar = go.Bar(x=values, y=layers, orientation="h") if horizontal else go.Bar(x=layers, y=values)
    fig = go.Figure(bar)
    layer_axis = {"title": "layer", "dtick": max(1, len(layers) // 15), "range": [-0.5, len(layers) - 0.5]}
    value_axis = {"title": label}
    fig.update_layout(
        title=title,
        xaxis=value_axis if horizontal else layer_axis,
        yaxis=layer_axis if horizontal else value_axis,
        height=max(320, 18 * len(layers) + 120) if horizontal else 360,
        **LAYOUT,
    )
    return fig


def layer_lines(
    series: dict[str, Sequence[float]],
    title: str,
    label: str,
    bands: dict[str, tuple[Sequence[float], Sequence[float]]] | None = None,
    layers: Sequence[int] | None = None,
) -> go.Figure:
    """Per-layer curves, layer 0 on the left; ``bands`` shades a (low, high) range around a named curve."""
    fig = go.Figure()
    for name, ys in series.items():
        xs = list(layers) if layers is not None else list(range(len(ys)))
        if bands and name in bands:
            low, high = bands[name]
            fig.add_trace(
                go.Scatter(
                    x=xs + xs[::-1],
                    y=list(high) + list(low)[::-1],
                    fill="toself",
                    opacity=0.2,
                    line={"width": 0},
                    name=f"{name} (10-90 % of tokens)",
                    hoverinfo="skip",
                )
            )
        fig.add_trace(go.Scatter(x=xs, y=list(ys), mode="lines+markers", name=name))
    fig.update_layout(
        title=title,
        xaxis={"title": "layer", "dtick": 1 if len(fig.data[0].x) <= 32 else None},
        yaxis={"title": label},
        height=380,
        **LAYOUT,
    )
    return fig
