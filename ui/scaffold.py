"""What every page shows around its own content: page config, title, callback errors, the sidebar summary.

``app.py`` hands the page ``st.navigation`` chose to :func:`run`; a page file holds only its own
content. Failures anywhere in a page show as ``st.error`` with what to do, never as a traceback; a
widget callback's error shows on the next run, under the title or beside its widget (:func:`safe`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import streamlit as st

from analysis.errors import HeadroomError
from analysis.loading import LoadedModel
from analysis.mask_files import mask_warnings
from ui import session
from ui.backend import model

log = logging.getLogger(__name__)
SLOT_ERRORS = "slot_errors"  # widget slot -> the error its callback raised, shown beside that widget


def run(page: Any, caption: str, *, home: bool = False) -> None:
    """Draw ``page`` (an ``st.Page``) with the shared header; every page but ``home`` gets the model first.

    The home page chooses the model, so it loads the model and draws the summary itself, after its
    settings: a model that fails to load must not hide the settings that fix it.
    """
    st.set_page_config(page_title=f"Headroom · {page.title}", layout="wide")
    st.title("Headroom" if home else page.title)
    st.caption(caption)
    pending = st.session_state.pop(session.MESSAGE, None)
    if pending:
        st.error(pending)
    with guard():
        if not home:
            lm = model()
            with guard():  # a bad link is reported, and the page goes on with the session's mask
                session.follow_link(lm)
            sidebar_summary(lm)
        pending = session.stop_list()
        try:
            page.run()
        except BaseException:  # Streamlit stops a run (closed tab, rerun) by raising through it
            for cancel in pending:
                cancel()
            raise


@contextmanager
def reported() -> Iterator[None]:
    """Show a HeadroomError of the block right here (for work a button runs in the page itself)."""
    try:
        yield
    except HeadroomError as e:
        st.error(str(e))


@contextmanager
def guard() -> Iterator[None]:
    """Show any failure of the block as ``st.error`` with what to do; the page never shows a traceback."""
    try:
        with reported():
            yield
    except Exception as e:  # the app must not die or show a traceback; the log keeps the details
        log.exception("page failed")
        st.error(
            f"Something went wrong: {type(e).__name__}: {e}. Change the settings or go back to the home page and "
            "try again; if it persists, report it with the model and settings you used."
        )


def safe(callback: Callable[..., None], *bound: Any, slot: str | None = None) -> Callable[..., None]:
    """A widget callback (given ``bound`` first) whose HeadroomError is shown as ``st.error`` on the next run.

    The error shows under the page's title, or with a ``slot`` where :func:`errors_at` ``(slot)`` is, beside
    the widget.
    """

    def run(*args: Any, **kwargs: Any) -> None:
        try:
            callback(*bound, *args, **kwargs)
        except HeadroomError as e:
            if slot is None:
                st.session_state[session.MESSAGE] = str(e)
            else:
                st.session_state.setdefault(SLOT_ERRORS, {})[slot] = str(e)

    return run


def errors_at(slot: str) -> None:
    """Show (once) the error the callback of ``slot`` raised on the last interaction."""
    message = st.session_state.get(SLOT_ERRORS, {}).pop(slot, None)
    if message:
        st.error(message)


MARKDOWN_SPECIALS = "\\`*_{}[]()<>#+-.!|~$"


def plain(text: str) -> str:
    """``text`` escaped for ``st.markdown``, so that model output shows as generated, never as formatting."""
    return "".join(f"\\{c}" if c in MARKDOWN_SPECIALS else c for c in text)


def sidebar_summary(lm: LoadedModel) -> None:
    """The session's model, texts and mask, so every page says what it shows."""
    mask = session.current_mask(lm)
    choice = session.choice
    st.sidebar.markdown(
        f"**Model** {lm.name} ({lm.shape.num_layers} x {lm.shape.num_heads} heads)  \n"
        f"**Texts** eval `{choice(session.EVAL_TEXT)}`, calibration `{choice(session.CALIB_TEXT)}`  \n"
        f"**Windows** {choice(session.SEQLEN)} tokens, {choice(session.MAX_TOKENS)} tokens in all  \n"
        f"**Mask** {mask.describe()}"
    )
    for warning in mask_warnings(mask, lm.fingerprint):
        st.sidebar.warning(warning)
