"""The mask editor's live perplexity: a fragment that shows the number of the session's mask as it settles.

It asks the shared live evaluator (``analysis.live``) for the mask, shows the first estimate with its
interval as soon as it comes and replaces it in place until the number is exact, so a number never
redraws the rest of the page. :func:`start` sets the evaluator to work early in the page's run,
:func:`show` draws the panel last.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import streamlit as st

from analysis.live import LiveEstimate, LivePerplexity
from analysis.masks import Mask
from ui import session

CLIENT = "editor_live_client"  # this session's name towards the shared live evaluator
REQUEST = "editor_live_request"  # (mask, Refinement) started early in this run, for the live panel
POLL_S = 0.1  # how often the live panel looks for the next answer (and lets a newer click interrupt it)


def _client() -> str:
    """This browser session (a token of its own): a newer request of a session cancels its older one."""
    return st.session_state.setdefault(CLIENT, uuid.uuid4().hex)


def start(live: LivePerplexity, mask: Mask) -> None:
    """Start refining ``mask`` now, so the evaluator works while the page draws; :func:`show` shows it."""
    refinement = live.start(mask, _client())
    st.session_state[REQUEST] = (mask, refinement)
    session.on_stop(refinement.cancel)  # a run stopped before the live panel takes it over


@st.fragment
def show(live: LivePerplexity, mask: Mask, changed: tuple[str, Mask] | None) -> None:
    """The live perplexity of ``mask``, estimate first, then exact; the unpruned model on the same tokens beside it.

    Takes over the refinement :func:`start` started for ``mask`` in this run, else starts one.
    """
    number, reference = st.columns(2)
    shown, unpruned = number.empty(), reference.empty()
    note, delta, status = st.empty(), st.empty(), st.empty()
    before = live.remembered(changed[1]) if changed else None
    started_for, refinement = st.session_state.pop(REQUEST, (None, None))
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
