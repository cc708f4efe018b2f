"""What the HARP page draws: alpha per layer, the search trace, and the matched-budget comparison.

Colours are the methods' own (``ui.plots.method_colour``), as on every page.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import plotly.graph_objects as go
import streamlit as st

from analysis.baselines import saved
from analysis.comparison import ComparisonRow
from analysis.harp import HarpResult
from ui.plots import LAYOUT, METHOD_COLOURS, log_axis, log_hline, method_colour, table_height, title


def alpha_bars(result: HarpResult) -> go.Figure:
    """The searched and the norm-matching alpha of every drop-QK layer, side by side."""
    layers = list(result.layers)
    fig = go.Figure(
        [
            go.Bar(x=layers, y=[result.alpha[i] for i in layers], name="searched", marker_color=method_colour("harp")),
            go.Bar(
                x=layers,
                y=[result.norm_matching_alpha[i] for i in layers],
                name="norm-matching",
                marker_color=method_colour("harp-norm-matching-alpha"),
            ),
        ]
    )
    fig.update_layout(
        title=title("alpha per layer"),
        xaxis={"title": "layer", "dtick": 1, "type": "category"},
        yaxis_title="alpha (branch scale)",
        **LAYOUT,
    )
    return fig


def search_trace(result: HarpResult) -> go.Figure:
    """Each layer's alpha search as a curve (top layer first) on a log perplexity axis, the unpruned model dotted."""
    fig = go.Figure()
    for layer in sorted(result.layers, reverse=True):
        steps = [s for s in result.trace if s.layer == layer]
        fig.add_trace(
            go.Scatter(
                x=[s.alpha for s in steps],
                y=[s.perplexity for s in steps],
                mode="lines+markers",
                name=f"layer {layer} (chose {result.alpha[layer]:g})",
            )
        )
    log_hline(fig, result.unpruned_perplexity, f"unpruned {result.unpruned_perplexity:.2f}")
    fig.update_layout(
        title=title("Search trace, top layer first"),
        xaxis_title="alpha",
        yaxis=log_axis([s.perplexity for s in result.trace] + [result.unpruned_perplexity], "calibration perplexity"),
        **LAYOUT,
    )
    return fig


def comparison_table(rows: Sequence[ComparisonRow]) -> list[int]:
    """The compared methods with their perplexity and savings, one selectable row each; the rows selected."""
    table = st.dataframe(
        {
            "method": [r.method for r in rows],
            "eval perplexity": [round(r.eval_perplexity, 3) for r in rows],
            "params removed": [r.budget.params_removed for r in rows],
            "KV B/token saved": [r.budget.kv_bytes_per_token_saved for r in rows],
            "attn FLOPs/token saved": [r.budget.attention_flops_per_token_saved for r in rows],
        },
        column_config={
            name: st.column_config.NumberColumn(format="localized")
            for name in ("params removed", "KV B/token saved", "attn FLOPs/token saved")
        },
        height=table_height(len(rows)),
        hide_index=True,
        key="comparison_table",
        on_select="rerun",
        selection_mode="single-row",
    )
    return table.selection.rows if table is not None and hasattr(table, "selection") else []


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
