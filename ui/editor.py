"""What the mask editor draws: the grid of heads, the live number, the budget meters, and errors where they arose.

Only the editor page uses these. The live number is a fragment: it asks the shared live evaluator
(``analysis.live``) for the mask, shows the first estimate with its interval as soon as it comes and
replaces it in place until the number is exact, so a number never redraws the rest of the page.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import plotly.graph_objects as go
import streamlit as st

from analysis.errors import HeadroomError
from analysis.importance import HeadScores, ranks
from analysis.live import LiveEstimate, LivePerplexity
from analysis.loading import LoadedModel
from analysis.masks import Budget, Mask, parse_mask
from ui import head_grids, plots, scaffold, session

MODES = ("full", "drop-QK", "attention removed")
DROP_QK_COLOUR, REMOVED_COLOUR = "#e67e22", "#c0392b"
LAST_CHANGE = "editor_last_change"  # {"what", "before", "after"}: the session's last edit of the mask
ERRORS = "editor_errors"  # widget slot -> the error its callback raised, shown beside that widget
LIVE_CLIENT = "editor_live_client"  # this session's name towards the shared live evaluator
LIVE_REQUEST = "editor_live_request"  # (mask, Refinement) started early in this run, for the live panel
POLL_S = 0.1  # how often the live panel looks for the next answer (and lets a newer click interrupt it)


def mode_of(mask: Mask, layer: int) -> str:
    """The layer's mode as the layer form names it (one of :data:`MODES`)."""
    spec = mask.layer(layer)
    return MODES[2] if spec.alpha == 0 else MODES[1] if spec.drop_qk else MODES[0]


def change(lm: LoadedModel, mask: Mask, what: str) -> None:
    """Make ``mask`` the session's mask (undoable) and remember ``what`` changed, for the "what changed" line."""
    before = session.current_mask(lm)
    session.change_mask(lm, mask)
    st.session_state[LAST_CHANGE] = {"what": what, "before": before.to_json(), "after": mask.to_json()}


def undo(lm: LoadedModel) -> None:
    before = session.current_mask(lm)
    if session.undo():
        after = session.current_mask(lm)
        st.session_state[LAST_CHANGE] = {"what": "undo", "before": before.to_json(), "after": after.to_json()}


def last_change(lm: LoadedModel, mask: Mask) -> tuple[str, Mask] | None:
    """What the last edit did and the mask before it, if it produced ``mask`` (a link or another page may not have)."""
    entry = st.session_state.get(LAST_CHANGE)
    if entry is None or entry["after"] != mask.to_json():
        return None
    return entry["what"], parse_mask(entry["before"], lm.shape, lm.name, lm.fingerprint)


def guarded(slot: str, callback: Callable[..., None], *bound: Any) -> Callable[..., None]:
    """A widget callback whose HeadroomError is shown by :func:`errors_at` ``(slot)``, beside that widget."""

    def run(*args: Any, **kwargs: Any) -> None:
        try:
            callback(*bound, *args, **kwargs)
        except HeadroomError as e:
            st.session_state.setdefault(ERRORS, {})[slot] = str(e)

    return run


def errors_at(slot: str) -> None:
    """Show (once) the error the callback of ``slot`` raised on the last interaction."""
    message = st.session_state.get(ERRORS, {}).pop(slot, None)
    if message:
        st.error(message)


@contextmanager
def reported() -> Iterator[None]:
    """Show a HeadroomError of the block right here (for work a button runs in the page itself)."""
    try:
        yield
    except HeadroomError as e:
        st.error(str(e))


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
        fig = head_grids.grid_figure(colour, hover, "Heads (light kept, dark pruned)", None, plots.KEEP_SCALE, 0, 1)
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
        fig = head_grids.grid_figure(colour, hover, title, scores.metric, "Viridis")
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


def _client() -> str:
    """This browser session (a token of its own): a newer request of a session cancels its older one."""
    return st.session_state.setdefault(LIVE_CLIENT, uuid.uuid4().hex)


def start_live(live: LivePerplexity, mask: Mask) -> None:
    """Start refining ``mask`` now, so the evaluator works while the page draws; :func:`live_panel` shows it."""
    refinement = live.start(mask, _client())
    st.session_state[LIVE_REQUEST] = (mask, refinement)
    session.on_stop(refinement.cancel)  # a run stopped before the live panel takes it over


@st.fragment
def live_panel(live: LivePerplexity, mask: Mask, changed: tuple[str, Mask] | None) -> None:
    """The live perplexity of ``mask``, estimate first, then exact; the unpruned model on the same tokens beside it.

    Takes over the refinement :func:`start_live` started for ``mask`` in this run, else starts one.
    """
    number, reference = st.columns(2)
    shown, unpruned = number.empty(), reference.empty()
    note, delta, status = st.empty(), st.empty(), st.empty()
    before = live.remembered(changed[1]) if changed else None
    started_for, refinement = st.session_state.pop(LIVE_REQUEST, (None, None))
    if started_for != mask or refinement is None:
        refinement = live.start(mask, _client())
    first: LiveEstimate | None = None
    started = time.perf_counter()
    try:
        while not refinement.finished:
            answer = refinement.next(POLL_S)
            if answer is None:
                if not refinement.finished:  # also the point where a newer click or a closed tab stops this run
                    status.caption(f"Refining… {time.perf_counter() - started:.1f} s")
                continue
            first = first or answer
            _draw(answer, first, shown, unpruned, note)
            if changed is not None:
                delta.markdown(_change_line(changed[0], answer, before.perplexity if before else None))
    except BaseException:  # the run was stopped (tab closed, or rerun): nobody waits for this number any more
        refinement.cancel()
        raise
    status.empty()


def _draw(answer: LiveEstimate, first: LiveEstimate, shown: Any, unpruned: Any, note: Any) -> None:
    p, u = answer.perplexity, answer.unpruned_perplexity
    unpruned.metric("Unpruned, same tokens", f"{u:.3f}")
    if not answer.exact:
        shown.metric(
            "Live perplexity",
            f"≈ {p:.2f}",
            f"95 % interval {answer.perplexity_low:.2f} to {answer.perplexity_high:.2f}",
            delta_color="off",
        )
        note.caption(
            f"Estimate from {answer.predicted_tokens:,} of {answer.total_predicted_tokens:,} tokens (the paired "
            "difference to the unpruned model on the same windows); refining to the exact number…"
        )
        return
    shown.metric("Live perplexity", f"{p:.3f}", f"{p - u:+.3f} vs unpruned", delta_color="inverse")
    estimate = (
        f" First estimate, from {first.predicted_tokens:,} tokens: {first.perplexity:.3f} "
        f"(95 % interval {first.perplexity_low:.3f} to {first.perplexity_high:.3f})."
        if not first.exact
        else " Seen before: answered from memory."
    )
    note.caption(
        f"Exact on {answer.text} (seqlen {answer.seqlen}, {answer.total_predicted_tokens:,} predicted tokens): the "
        f"slice of Home's unpruned perplexity and of the export card (text and tokens are set on Home).{estimate}"
    )


def _change_line(what: str, answer: LiveEstimate, before: float | None) -> str:
    if before is None:
        return f"**Last change:** {what} (the mask before it was not settled, so no Δ)"
    if answer.exact:
        return f"**Last change:** {what}: Δ perplexity {answer.perplexity - before:+.3f} (from {before:.3f})"
    low, high = answer.perplexity_low - before, answer.perplexity_high - before
    return f"**Last change:** {what}: Δ perplexity ≈ {answer.perplexity - before:+.2f} ({low:+.2f} to {high:+.2f})"


def generation(label: str, prompt: str, continuation: str) -> str:
    """Markdown of a prompt and its continuation as generated (escaped, never formatting); the continuation blue."""
    return f"**{label}**\n\n{scaffold.plain(prompt)}:blue[{scaffold.plain(continuation)}]"
