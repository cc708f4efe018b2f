"""Plot builders and colours the pages share; every plot puts layer 0 at the bottom (heatmaps) or on the left (curves).

Colours that carry meaning are defined here once, so that a colour means the same on every page:
kept / pruned heads, k-means clusters, and methods (the unpruned model, HARP, each baseline family).
Titles sit just above the plotting area, below the plotly toolbar at the top of the figure. The
layers x heads grids are built in ``ui.head_grids``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import plotly.colors
import plotly.graph_objects as go

# The toolbar takes the top ~30 px of a figure; the title is anchored to the plotting area below it.
# A title is left-aligned on the plotting area's top edge, below the toolbar; LAYOUT carries the placement,
# so a page passing a plain string title with ``**LAYOUT`` gets it too.
TITLE = {"x": 0, "xanchor": "left", "xref": "paper", "y": 1, "yanchor": "bottom", "yref": "paper", "pad": {"b": 10}}
LAYOUT = {"margin": {"l": 60, "r": 20, "t": 80, "b": 50}, **{f"title_{k}": v for k, v in TITLE.items()}}

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
AXIS_LABELS = {  # the budget axes (``analysis.baselines.AXES``) as the charts name them
    "params": "attention parameters removed",
    "kv": "KV-cache bytes per token saved",
    "flops": "attention FLOPs per token saved",
}


def title(text: str) -> dict[str, Any]:
    """A title placed as :data:`TITLE` says: left-aligned just above the plotting area, clear of the toolbar."""
    return {"text": text, **TITLE}


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


def selection_points(event: Any) -> list[dict[str, Any]]:
    """The selected points of a ``st.plotly_chart(..., on_select=...)`` event (a dict or an attribute object)."""
    if isinstance(event, dict):
        return event.get("selection", {}).get("points", [])
    if event is not None and hasattr(event, "selection"):
        return event.selection.get("points", [])
    return []


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
