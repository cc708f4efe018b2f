"""Plot builders and colours the pages share; every plot puts layer 0 at the bottom (heatmaps) or on the left (curves).

Colours that carry meaning are defined here once, so that a colour means the same on every page:
kept / pruned heads, k-means clusters, and methods (the unpruned model, HARP, each baseline family).
Titles sit just above the plotting area, below the plotly toolbar at the top of the figure.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import plotly.colors
import plotly.graph_objects as go
import torch

from analysis.baselines import saved
from analysis.comparison import ComparisonRow
from analysis.errors import HeadroomError
from analysis.importance import ranks

# The toolbar takes the top ~30 px of a figure; the title is anchored to the plotting area below it.
LAYOUT = {"margin": {"l": 60, "r": 20, "t": 80, "b": 50}}
SCALES = ("robust", "per layer", "value", "log", "rank")
SCALE_HELP = (
    "robust: the colours span the 2-98 % quantiles, so a few extreme heads do not flatten the rest "
    "(cells beyond are drawn at the ends); per layer: each layer's scores divided by that layer's largest "
    "magnitude; log: log10 (positive scores only); rank: 1 is the lowest"
)
ROBUST_QUANTILES = (0.02, 0.98)

KEPT, PRUNED = "#cfe8cf", "#1f2d5c"
KEEP_SCALE = [[0, PRUNED], [1, KEPT]]  # z = 0 pruned, 1 kept
HIGHLIGHT = "#ff2b2b"  # the selected cell / the method the page is about
CLUSTER_COLOURS = tuple(plotly.colors.qualitative.D3 + plotly.colors.qualitative.Pastel)
METHOD_COLOURS = {  # by method, or by the head metric a baseline prunes with (the part before '-')
    "unpruned": "#444444",
    "harp": HIGHLIGHT,
    "harp-norm-matching-alpha": "#ff9f1c",
    "drop_qk": "#8c564b",
    "gradient": "#1f77b4",
    "gradient_normalized": "#6baed6",
    "magnitude": "#2ca02c",
    "magnitude_sp": "#98df8a",
    "wanda_sp": "#17becf",
    "flap_wifv": "#9467bd",
    "block_influence": "#7f7f7f",
}
OTHER_METHOD = "#bcbd22"


def title(text: str) -> dict[str, Any]:
    """A left-aligned title just above the plotting area, clear of the toolbar at the figure's top right."""
    return {
        "text": text,
        "x": 0,
        "xanchor": "left",
        "xref": "paper",
        "y": 1,
        "yanchor": "bottom",
        "yref": "paper",
        "pad": {"b": 10},
    }


def method_colour(method: str) -> str:
    """The colour of a method on every page: its own, else its metric family's (``gradient-global``: gradient)."""
    if method in METHOD_COLOURS:
        return METHOD_COLOURS[method]
    return METHOD_COLOURS.get(method.split("-")[0], OTHER_METHOD)


def cluster_colour(cluster: int) -> str:
    return CLUSTER_COLOURS[cluster % len(CLUSTER_COLOURS)]


def cluster_scale(clusters: int) -> list[list[Any]]:
    """A stepped colour scale giving the integers 0..clusters-1 (with zmin -0.5, zmax clusters-0.5) their colours."""
    scale = []
    for c in range(clusters):
        scale += [[c / clusters, cluster_colour(c)], [(c + 1) / clusters, cluster_colour(c)]]
    return scale


def log_axis(values: Sequence[float], label: str) -> dict[str, Any]:
    """A log axis fitted to ``values`` (5 % margin), ticks at 1, 2, 5 x 10^k (finer if fewer than 4) in full.

    Plotly's own minor log ticks read "2, 5, 100, 2" and leave the reader to guess the decade.
    """
    lo, hi = math.log10(min(values)), math.log10(max(values))
    pad = max(0.05 * (hi - lo), 0.02)
    lo, hi = lo - pad, hi + pad
    ticks: list[float] = []
    for mantissas in ((1, 2, 5), (1, 2, 3, 5), tuple(range(1, 10))):  # finer steps until at least 4 ticks show
        ticks = [m * 10**k for k in range(math.floor(lo), math.ceil(hi) + 1) for m in mantissas]
        ticks = [t for t in ticks if lo <= math.log10(t) <= hi]
        if len(ticks) >= 4:
            break
    step = min(ticks) if ticks else 10**lo
    if len(ticks) < 4:  # a fraction of a decade: evenly spaced round values
        a, b = 10**lo, 10**hi
        unit = 10 ** math.floor(math.log10((b - a) / 4))
        step = next(unit * m for m in (5, 2, 1) if (b - a) / (unit * m) >= 4)
        ticks = [k * step for k in range(math.ceil(a / step), math.floor(b / step) + 1)]
    decimals = max(0, -math.floor(math.log10(step)))
    return {
        "title": label,
        "type": "log",
        "range": [lo, hi],  # a log axis's range is in log10 units
        "tickvals": ticks,
        "ticktext": [f"{t:,.{decimals}f}" for t in ticks],
    }


def log_hline(fig: go.Figure, y: float, text: str) -> None:
    """A dotted horizontal line at data value ``y`` on a log y axis, labelled at the right.

    A shape's y is in data units but an annotation's y on a log axis is in log10 units; plotly's
    ``add_hline(annotation_text=...)`` puts the label at y itself, which stretches the axis to 10^y.
    """
    fig.add_hline(y=y, line_dash="dot", line_color=METHOD_COLOURS["unpruned"])
    fig.add_annotation(
        x=1, xref="paper", xanchor="right", y=math.log10(y), yref="y", yanchor="bottom", text=text, showarrow=False
    )


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


def layer_bars(values: Sequence[float | None], title_text: str, label: str, horizontal: bool = True) -> go.Figure:
    """One bar per layer; horizontal bars put layer 0 at the bottom, beside a head heatmap."""
    layers = list(range(len(values)))
    bar = go.Bar(x=values, y=layers, orientation="h") if horizontal else go.Bar(x=layers, y=values)
    fig = go.Figure(bar)
    layer_axis = {"title": "layer", "dtick": max(1, len(layers) // 15), "range": [-0.5, len(layers) - 0.5]}
    value_axis = {"title": label}
    fig.update_layout(
        title=title(title_text),
        xaxis=value_axis if horizontal else layer_axis,
        yaxis=layer_axis if horizontal else value_axis,
        height=max(320, 18 * len(layers) + 120) if horizontal else 360,
        **LAYOUT,
    )
    return fig


def layer_lines(
    series: dict[str, Sequence[float]],
    title_text: str,
    label: str,
    bands: dict[str, tuple[Sequence[float], Sequence[float]]] | None = None,
    layers: Sequence[int] | None = None,
    colours: dict[str, str] | None = None,
    reference: str | None = None,
) -> go.Figure:
    """Per-layer curves, layer 0 on the left; ``bands`` shades a (low, high) range around a named curve.

    ``reference`` names the curve others are compared with: it is drawn last, dashed, so that it stays
    visible where another curve lies on it (below the first layer a mask changes, they coincide).
    """
    fig = go.Figure()
    names = sorted(series, key=lambda name: name == reference)  # the reference last, on top
    for name in names:
        ys = series[name]
        xs = list(layers) if layers is not None else list(range(len(ys)))
        colour = (colours or {}).get(name)
        if bands and name in bands:
            low, high = bands[name]
            fig.add_trace(
                go.Scatter(
                    x=xs + xs[::-1],
                    y=list(high) + list(low)[::-1],
                    fill="toself",
                    opacity=0.2,
                    line={"width": 0},
                    fillcolor=colour,
                    name=f"{name} (10-90 % of tokens)",
                    hoverinfo="skip",
                )
            )
        line = {"color": colour, "width": 3, "dash": "dash"} if name == reference else {"color": colour}
        fig.add_trace(go.Scatter(x=xs, y=list(ys), mode="lines+markers", name=name, line=line))
    fig.update_layout(
        title=title(title_text),
        xaxis={"title": "layer", "dtick": 1 if len(fig.data[0].x) <= 32 else None},
        yaxis={"title": label},
        height=380,
        **LAYOUT,
    )
    return fig


def table_height(rows: int) -> int:
    """The pixel height of an ``st.dataframe`` that shows ``rows`` rows and its header without scrolling."""
    return 35 * (rows + 1) + 3


def compact(n: float) -> str:
    """A count as people read it on a chart: 950, 12.3 k, 1.77 M, 2.1 G."""
    for size, suffix in ((1e9, " G"), (1e6, " M"), (1e3, " k")):
        if abs(n) >= size:
            return f"{n / size:.3g}{suffix}"
    return f"{n:g}"


def matched_budget(rows: Sequence[ComparisonRow], axis: str) -> go.Figure:
    """Held-out perplexity of every method at HARP's budget: one row per method, best at the top, HARP a red star.

    The baselines are matched on one budget axis, so most share one x on a perplexity-vs-budget scatter
    and their labels pile up; a dot per method on a log perplexity axis shows the ranking instead, and
    each row's label says what the method saves on ``axis`` (matching saves at least HARP's saving, some
    methods more). The unpruned model is the dotted line.
    """
    ordered = sorted((r for r in rows if r.method != "unpruned"), key=lambda r: r.eval_perplexity)
    unpruned = next((r.eval_perplexity for r in rows if r.method == "unpruned"), None)

    def label(r: ComparisonRow) -> str:
        return f"{r.method} · saves {compact(saved(r.budget, axis))}"

    fig = go.Figure()
    for highlighted in (False, True):
        chosen = [r for r in ordered if (r.method == "harp") == highlighted]
        fig.add_trace(
            go.Scatter(
                x=[r.eval_perplexity for r in chosen],
                y=[label(r) for r in chosen],
                customdata=[r.method for r in chosen],
                mode="markers",
                name="HARP" if highlighted else "other methods",
                marker={
                    "color": [method_colour(r.method) for r in chosen],
                    "size": 20 if highlighted else 12,
                    "symbol": "star" if highlighted else "circle",
                    "line": {"width": 1, "color": "#222222"},
                },
                hovertext=[
                    f"{r.method}<br>perplexity {r.eval_perplexity:,.3f}<br>params removed {r.budget.params_removed:,}"
                    f"<br>KV saved {r.budget.kv_bytes_per_token_saved:,} B/token"
                    f"<br>attention FLOPs saved {r.budget.attention_flops_per_token_saved:,}/token"
                    for r in chosen
                ],
                hoverinfo="text",
                showlegend=False,
            )
        )
    values = [r.eval_perplexity for r in ordered] + ([unpruned] if unpruned else [])
    if unpruned:
        fig.add_vline(x=unpruned, line_dash="dot", line_color=METHOD_COLOURS["unpruned"])
        fig.add_annotation(
            x=math.log10(unpruned),  # log10 units on a log axis
            xref="x",
            xanchor="left",
            y=0,
            yref="paper",
            yanchor="bottom",
            text=" unpruned",
            showarrow=False,
        )
    fig.update_layout(
        title=title("Held-out perplexity at HARP's budget"),
        xaxis=log_axis(values, "evaluation perplexity (log scale; lower is better)"),
        yaxis={"title": "", "categoryorder": "array", "categoryarray": [label(r) for r in ordered][::-1]},
        height=max(320, 34 * len(ordered) + 140),
        **LAYOUT,
    )
    fig.update_layout(margin={"l": 260})  # room for the method names
    return fig


def cluster_grid(
    heads: Sequence[tuple[int, int]], clusters: Sequence[int], num_layers: int, num_heads: int
) -> go.Figure:
    """Layers x heads grid of k-means clusters in the discrete colours of :func:`cluster_colour` (as the map's)."""
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
