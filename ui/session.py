"""The user's choices and mask, kept in ``st.session_state`` so that they carry from page to page.

Pages read and write them through these functions and the key constants below, never through
literal keys. A mask lives only in the session (per browser tab); the shared cached resources never
hold one between calls. On the first page load of a session, a mask in the URL (a link someone sent)
becomes the session's mask; the editor mirrors the current mask into the URL.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import streamlit as st

from analysis.errors import HeadroomError
from analysis.loading import DEFAULT_MODEL, LoadedModel
from analysis.mask_files import parse_mask
from analysis.mask_links import QUERY_KEYS, mask_from_query, mask_to_query
from analysis.masks import Mask

MODEL = "model_spec"
DTYPE = "dtype"  # the weights' dtype: auto (bfloat16 on a CUDA GPU, float32 on the CPU), float32, bfloat16, float16
EVAL_TEXT = "eval_text"
CALIB_TEXT = "calib_text"
SEQLEN = "seqlen"
MAX_TOKENS = "max_tokens"
MASK = "mask_json"
HISTORY = "mask_history"  # earlier masks of this session, for undo
HARP_RUN = "harp_run"  # the session's last HARP request (a ui.backend.HarpRun)
MESSAGE = "pending_error"  # an error raised in a widget callback, shown on the next run
UPLOADS = "uploaded_texts"  # the paths of the texts this session uploaded, oldest first
LINK_READ = "url_read"  # set once the session's first page load has looked for a mask in the URL
ON_STOP = "on_stop"  # what this run started in the background and must stop if the run is stopped

DEFAULTS: dict[str, object] = {
    MODEL: DEFAULT_MODEL,
    DTYPE: "auto",
    EVAL_TEXT: "default-eval",
    CALIB_TEXT: "default-calib",
    SEQLEN: 256,
    MAX_TOKENS: 2048,
}
UNDO_DEPTH = 100


def on_stop(cancel: Callable[[], None]) -> None:
    """Call ``cancel`` if this run is stopped (a closed tab, a rerun) before it ends; see :func:`stop_list`."""
    st.session_state.setdefault(ON_STOP, []).append(cancel)


def stop_list() -> list[Callable[[], None]]:
    """A new, empty list of what this run must cancel if it is stopped; :func:`on_stop` appends to it.

    Take it before the page runs and call its items without touching ``st.session_state``: once a
    run is asked to stop, Streamlit raises its ``StopException`` again from session-state access.
    """
    pending: list[Callable[[], None]] = []
    st.session_state[ON_STOP] = pending
    return pending


def choice(key: str) -> object:
    """The session's value for ``key`` (one of the constants above), or its default."""
    return st.session_state.get(key, DEFAULTS.get(key))


def setting(widget: Callable[..., Any], label: str, key: str, **kwargs: Any) -> Any:
    """A widget whose value is the session's ``choice(key)`` and survives page switches.

    Streamlit forgets a widget's state on pages that do not draw it, so the widget gets its own key
    and writes the value through to ``key`` on change.
    """
    widget_key = f"widget_{key}"
    if widget_key not in st.session_state:
        st.session_state[widget_key] = choice(key)
    return widget(label, key=widget_key, on_change=_store, args=(key, widget_key), **kwargs)


def _store(key: str, widget_key: str) -> None:
    st.session_state[key] = st.session_state[widget_key]


def current_mask(lm: LoadedModel) -> Mask:
    """The session's mask for ``lm``; unpruned when none is set or it was made for another model."""
    obj = st.session_state.get(MASK)
    if obj is not None and obj.get("model", {}).get("name") == lm.name and _fits(obj, lm):
        return parse_mask(obj, lm.shape, lm.name, lm.fingerprint)
    return Mask.unpruned(lm.shape, lm.name, lm.fingerprint)


def _fits(obj: dict[str, Any], lm: LoadedModel) -> bool:
    model_info = obj.get("model", {})
    return (model_info.get("num_layers"), model_info.get("num_heads")) == (lm.shape.num_layers, lm.shape.num_heads)


def set_mask(mask: Mask) -> None:
    """Make ``mask`` the session's mask (the editor, HARP and head-map pages all write through this)."""
    st.session_state[MASK] = mask.to_json()


def change_mask(lm: LoadedModel, mask: Mask) -> None:
    """:func:`set_mask`, remembering the mask it replaces so that :func:`undo` can bring it back."""
    history = st.session_state.setdefault(HISTORY, [])
    history.append(current_mask(lm).to_json())
    del history[:-UNDO_DEPTH]
    set_mask(mask)


def undo() -> bool:
    """Go back to the mask before the last :func:`change_mask`; False when there is none."""
    history = st.session_state.get(HISTORY) or []
    if not history:
        return False
    st.session_state[MASK] = history.pop()
    return True


def follow_link(lm: LoadedModel) -> None:
    """On the session's first page load, make a mask carried by the URL the session's mask.

    A link that does not fit ``lm`` raises HeadroomError (the mask stays as it was); later loads do nothing.
    """
    if LINK_READ in st.session_state:
        return
    st.session_state[LINK_READ] = True
    query = {k: st.query_params[k] for k in QUERY_KEYS if k in st.query_params}
    if query:
        try:
            set_mask(mask_from_query(query, lm.shape, lm.name, lm.fingerprint))
        except HeadroomError as e:
            raise HeadroomError(f"{e}; starting unpruned instead") from None


def show_in_link(mask: Mask) -> None:
    """Mirror ``mask`` in the URL, so that the address bar is a link to it."""
    st.query_params.from_dict(mask_to_query(mask))
