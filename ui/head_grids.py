"""Layers x heads grids, layer 0 at the bottom: the clickable grid, a head score's heatmap, the k-means clusters.

Every cell of a grid can be clicked: :func:`selected_head` reads which one from the chart's selection
event. The mask editor draws the mask on the same grid (``ui.editor.mask_grid``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import plotly.graph_objects as go
import torch

from analysis.errors import HeadroomError
from analysis.importance import ranks
from ui.plots import HIGHLIGHT, LAYOUT, cluster_scale, selection_points, title

SCALES = ("robust", "per layer", "value", "log", "rank")
SCALE_HELP = (
    "robust: the colours span the 2-98 % quantiles, so a few extreme heads do not flatten the rest "
    "(cells beyond are drawn at the ends); per layer: each layer's scores divided by that layer's largest "
    "magnitude; log: log10 (positive scores only); rank: 1 is the lowest"
)
ROBUST_QUANTILES = (0.02, 0.98)


def head_heatmap(
    rows: list[list[float | None]],
    title_text: str,
    label: str,
    scale: str = "value",
    num_heads: int | None = None,
    selected: tuple[int, int] | None = None,
) -> go.Figure:
    """Layers x heads heatmap of a head score (layer 0 at the bottom); hover shows value and rank.

    ``scale`` (one of :data:`SCALES`, see :data:`SCALE_HELP`) sets how values map to colours; the hover
    always shows the raw value. Every cell can be clicked (see :func:`selected_head`); ``selected`` is
    outlined.
    """
    width = num_heads or max(len(r) for r in rows if r)
    values = [row or [None] * width for row in rows]
    rank = ranks(values)
    n = sum(r is not None for row in rank for r in row)
    zmin = zmax = None
    if scale == "log":
        if any(v is not None and v <= 0 for row in values for v in row):
            raise HeadroomError(
                f"{label} has zero or negative scores, so it has no log colour scale; choose another colour scale"
            )
        colour = [[math.log10(v) if v is not None else None for v in row] for row in values]
        bar = f"log10 {label}"
    elif scale == "rank":
        colour, bar = rank, "rank (1 = lowest)"
    elif scale == "per layer":
        colour, bar = per_layer(values), f"{label} / layer's largest |value|"
    else:
        colour, bar = values, label
        if scale == "robust":
            zmin, zmax = robust_range(values)
            bar = f"{label} (2-98 % range)"
    hover = [
        [
            f"layer {layer}, head {head}<br>{label}: {v:.4g}<br>rank {rank[layer][head]} of {n} (1 = lowest)"
            if v is not None
            else f"layer {layer}, head {head}<br>not scored"
            for head, v in enumerate(row)
        ]
        for layer, row in enumerate(values)
    ]
    fig = grid_figure(colour, hover, title_text, bar, "Viridis", zmin, zmax)
    if selected is not None:
        highlight_cell(fig, *selected)
    return fig


def robust_range(rows: list[list[float | None]]) -> tuple[float, float]:
    """The 2 % and 98 % quantiles of the scored values: a colour range a few extreme heads cannot flatten."""
    values = torch.tensor([v for row in rows for v in row if v is not None], dtype=torch.float64)
    if values.numel() == 0:
        return 0.0, 1.0
    lo, hi = torch.quantile(values, torch.tensor(ROBUST_QUANTILES, dtype=torch.float64)).tolist()
    return (lo, hi) if hi > lo else (values.min().item(), values.max().item())


def per_layer(rows: list[list[float | None]]) -> list[list[float | None]]:
    """Each layer's scores divided by that layer's largest magnitude (a layer of zeros stays zero)."""
    scaled = []
    for row in rows:
        top = max((abs(v) for v in row if v is not None), default=0.0)
        scaled.append([None if v is None else (v / top if top else 0.0) for v in row])
    return scaled


def highlight_cell(fig: go.Figure, layer: int, head: int) -> None:
    """Outline one cell of a :func:`grid_figure` (the clicked head) with a red square."""
    fig.add_shape(
        type="rect",
        x0=head - 0.5,
        x1=head + 0.5,
        y0=layer - 0.5,
        y1=layer + 0.5,
        line={"color": HIGHLIGHT, "width": 3},
        name="selected",
    )


def grid_figure(
    colour: list[list[Any]],
    hover: list[list[str]],
    title_text: str,
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
        title=title(title_text),
        xaxis={"title": "query head", "dtick": 1, "range": [-0.5, heads - 0.5]},
        yaxis={"title": "layer (0 at the bottom)", "dtick": max(1, layers // 15), "range": [-0.5, layers - 0.5]},
        height=max(320, 18 * layers + 120),
        clickmode="event+select",
        **LAYOUT,
    )
    return fig


def selected_head(event: Any) -> tuple[int, int] | None:
    """The (layer, head) clicked in a :func:`grid_figure` chart's selection event, if any."""
    for point in selection_points(event):
        data = point.get("customdata")
        if data is not None and len(data) == 2:
            return int(data[0]), int(data[1])
    return None


def cluster_grid(
    heads: Sequence[tuple[int, int]], clusters: Sequence[int], num_layers: int, num_heads: int
) -> go.Figure:
    """Layers x heads grid of k-means clusters in the map's discrete colours (``ui.plots.cluster_colour``)."""
    labels: list[list[int | None]] = [[None] * num_heads for _ in range(num_layers)]
    for (layer, head), cluster in zip(heads, clusters, strict=True):
        labels[layer][head] = cluster
    k = max(clusters) + 1
    hover = [
        [f"layer {layer}, head {head}<br>cluster {c}" for head, c in enumerate(row)] for layer, row in enumerate(labels)
    ]
    fig = grid_figure(labels, hover, "Cluster of every head", "cluster", cluster_scale(k), -0.5, k - 0.5)
    fig.update_traces(colorbar={"tickvals": list(range(k)), "ticktext": [str(c) for c in range(k)]}, selector=0)
    return fig
