"""What the mask editor draws: the grid of heads and what colours it, the budget meters, the generations.

Only the editor page uses these; its edits are in ``ui.mask_edits``, its live number in ``ui.live_panel``.
"""

from __future__ import annotations

from typing import Any

import plotly.graph_objects as go
import streamlit as st

from analysis.budget import Budget
from analysis.importance import HEAD_METRICS, HeadScores, ranks, stored_head_result
from analysis.loading import LoadedModel
from analysis.masks import Mask
from ui import backend, plots, scaffold, session
from ui.head_grids import grid_figure

MODES = ("full", "drop-QK", "attention removed")
DROP_QK_COLOUR, REMOVED_COLOUR = "#e67e22", "#c0392b"


def mode_of(mask: Mask, layer: int) -> str:
    """The layer's mode as the layer form names it (one of :data:`MODES`)."""
    spec = mask.layer(layer)
    return MODES[2] if spec.alpha == 0 else MODES[1] if spec.drop_qk else MODES[0]


def colour_scores(lm: LoadedModel) -> HeadScores | None:
    """The scores the grid is coloured by: none, one on disk, or a cheap one computed now (then on disk).

    Offered: the head metrics already computed for this model and calibration text, and the cheap ones.
    """
    calib, cache = backend.windows(lm, session.CALIB_TEXT), backend.disk_cache()
    stored = {m: stored_head_result(lm, calib, m, cache) for m in HEAD_METRICS}
    offered = {m: s for m, s in stored.items() if s is not None or HEAD_METRICS[m].cost in ("weights", "forward")}
    chosen = st.selectbox(
        "Colour the grid by",
        ["kept / pruned", *offered],
        key="colour_by",
        help="Head metrics already computed for this model and calibration text (Importance page), and the cheap "
        "ones, computed on first use",
    )
    if chosen == "kept / pruned":
        return None
    return offered[chosen] or backend.head_result(lm, calib, chosen)


def mask_grid(mask: Mask, scores: HeadScores | None) -> go.Figure:
    """The clickable layers x heads grid: kept/pruned, or coloured by a head metric with pruned heads crossed out.

    Rows of drop-QK layers are outlined (dashed), rows whose attention is removed are greyed out,
    and every row has its mode and alpha written at its right.
    """
    status = [["kept" if keep else "pruned" for keep in row] for row in mask.heads]
    if scores is None:
        colour: list[list[Any]] = [[float(keep) for keep in row] for row in mask.heads]
        hover = [
            [f"layer {layer}, head {head}: {s} (click to toggle)" for head, s in enumerate(row)]
            for layer, row in enumerate(status)
        ]
        fig = grid_figure(colour, hover, "Heads (light kept, dark pruned)", None, plots.KEEP_SCALE, 0, 1)
    else:
        colour = [row or [None] * mask.num_heads for row in scores.scores]
        rank = ranks(colour)
        scored = sum(r is not None for row in rank for r in row)
        hover = [
            [
                f"layer {layer}, head {head}: {status[layer][head]} (click to toggle)<br>"
                + (
                    f"{scores.metric}: {v:.4g}, rank {rank[layer][head]} of {scored} (1 = lowest)"
                    if v is not None
                    else "not scored"
                )
                for head, v in enumerate(row)
            ]
            for layer, row in enumerate(colour)
        ]
        title = f"Heads by {scores.metric} (pruned heads crossed out)"
        fig = grid_figure(colour, hover, title, scores.metric, "Viridis")
        pruned = [(layer, head) for layer, row in enumerate(mask.heads) for head, keep in enumerate(row) if not keep]
        fig.add_trace(
            go.Scatter(
                x=[head for _, head in pruned],
                y=[layer for layer, _ in pruned],
                mode="markers",
                marker={"symbol": "x-thin", "size": 12, "line": {"width": 3, "color": "white"}},
                hoverinfo="skip",  # clicks go to the grid's own cell markers underneath
                showlegend=False,
            )
        )
    shapes, notes = [], []
    for layer in range(mask.num_layers):
        mode, alpha = mode_of(mask, layer), mask.alpha[layer]
        row = {"type": "rect", "x0": -0.5, "x1": mask.num_heads - 0.5, "y0": layer - 0.5, "y1": layer + 0.5}
        if mode == MODES[2]:
            shapes.append(row | {"fillcolor": "rgba(128,128,128,0.6)", "line": {"color": REMOVED_COLOUR, "width": 2}})
        elif mode == MODES[1]:
            shapes.append(row | {"line": {"color": DROP_QK_COLOUR, "width": 2, "dash": "dash"}})
        colour_of = {MODES[2]: REMOVED_COLOUR, MODES[1]: DROP_QK_COLOUR}.get(mode, "#000" if alpha != 1 else "#999")
        label = f"{'' if mode == MODES[0] else ('removed' if mode == MODES[2] else mode) + ' '}α={alpha:g}"
        notes.append(
            {
                "x": 1.01,
                "xref": "paper",
                "y": layer,
                "text": label,
                "showarrow": False,
                "xanchor": "left",
                "font": {"size": 10, "color": colour_of},
            }
        )
    fig.update_layout(margin={"r": 130}, shapes=shapes, annotations=notes)  # one update: per-row calls are slow
    return fig


AXES = (  # label, unit, budget fields (saved, whole); parameters are a share of the whole model
    ("Parameters removed", "", ("params_removed", "params_total")),
    ("KV cache saved", " bytes/token", ("kv_bytes_per_token_saved", "kv_bytes_per_token_unpruned")),
    (
        "Attention FLOPs saved",
        " FLOPs/token",
        ("attention_flops_per_token_saved", "attention_flops_per_token_unpruned"),
    ),
)


def target_text(saved_pct: float, target_pct: float) -> str:
    if target_pct <= 0:
        return f"{saved_pct:.1f} % saved (no target set)"
    if saved_pct >= target_pct:
        return f"{saved_pct:.1f} % saved: the {target_pct:g} % target is met"
    return f"{saved_pct:.1f} % saved: {target_pct - saved_pct:.1f} points short of the {target_pct:g} % target"


def budget_meters(b: Budget, targets: dict[str, float]) -> None:
    """The three savings of the mask, each with a bar against the user's target for that axis (in %)."""
    for label, unit, (saved_field, whole_field) in AXES:
        saved, whole = getattr(b, saved_field), getattr(b, whole_field)
        pct = 100 * saved / whole
        of = "of the model" if whole_field == "params_total" else "of attention"
        st.metric(label, f"{saved:,}{unit}", f"{pct:.2f} % {of}", delta_color="off")
        target = targets.get(label, 0.0)
        st.progress(min(pct / target, 1.0) if target > 0 else min(pct / 100, 1.0), text=target_text(pct, target))


def generation(label: str, prompt: str, continuation: str) -> str:
    """Markdown of a prompt and its continuation as generated (escaped, never formatting); the continuation blue."""
    return f"**{label}**\n\n{scaffold.plain(prompt)}:blue[{scaffold.plain(continuation)}]"
