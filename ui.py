"""What every Streamlit page shares: the cached model, the user's choices and the current mask.

Pages call these instead of touching ``st.session_state`` keys or the backend's caches themselves,
so a choice made on one page carries to every other and the model is loaded once per process.
Nothing here computes a number: that is ``analysis/``'s job.
"""

from __future__ import annotations

from dataclasses import dataclass

import streamlit as st

from analysis.cache import DiskCache, default_root
from analysis.corpus import Windows, load_text, make_windows
from analysis.loading import DEFAULT_MODEL, LoadedModel, load_model
from analysis.masks import Mask, parse_mask

# st.session_state keys; a page never spells them out.
MODEL = "model_spec"
EVAL_TEXT = "eval_text"
CALIB_TEXT = "calib_text"
SEQLEN = "seqlen"
MAX_TOKENS = "max_tokens"
MASK = "mask_json"

DEFAULTS: dict[str, object] = {
    MODEL: DEFAULT_MODEL,
    EVAL_TEXT: "default-eval",
    CALIB_TEXT: "default-calib",
    SEQLEN: 256,
    MAX_TOKENS: 2048,
}


@st.cache_resource(show_spinner="Loading the model (the first start converts the GGUF, about 30 s)…")
def shared_model(spec: str) -> LoadedModel:
    """One model per spec per process, shared read-only by every session (masks go through hooks)."""
    return load_model(spec)


@st.cache_resource
def disk_cache() -> DiskCache:
    return DiskCache(default_root())


def choice(key: str) -> object:
    """The session's value for ``key`` (one of the constants above), or its default."""
    return st.session_state.get(key, DEFAULTS.get(key))


def model() -> LoadedModel:
    """The model the user picked on the home page (raises HeadroomError for a bad spec)."""
    return shared_model(str(choice(MODEL)))


def windows(lm: LoadedModel, which: str = EVAL_TEXT) -> Windows:
    """Evaluation (``EVAL_TEXT``) or calibration (``CALIB_TEXT``) windows at the session's settings."""
    return _windows(lm.name, lm.fingerprint, str(choice(which)), int(choice(SEQLEN)), int(choice(MAX_TOKENS)))


@st.cache_resource(max_entries=16)
def _windows(name: str, fingerprint: str, text_spec: str, seqlen: int, max_tokens: int) -> Windows:
    lm = model()
    assert lm.fingerprint == fingerprint, "windows requested for a model that is not the session's"
    return make_windows(lm.tokenizer, load_text(text_spec), seqlen, max_tokens, lm.max_positions)


def current_mask(lm: LoadedModel) -> Mask:
    """The session's mask for ``lm``; unpruned when none is set or it was made for another model."""
    obj = st.session_state.get(MASK)
    if obj is not None and obj.get("model") == lm.name:
        return parse_mask(obj, lm.shape, lm.name, lm.fingerprint)
    return Mask.unpruned(lm.shape, lm.name, lm.fingerprint)


def set_mask(mask: Mask) -> None:
    """Make ``mask`` the session's mask (the editor, HARP and head-map pages all write through this)."""
    st.session_state[MASK] = mask.to_json()


@dataclass
class ProgressBar:
    """A ``Progress`` callback drawing an ``st.progress`` bar; ``done()`` removes it."""

    text: str

    def __post_init__(self) -> None:
        self._bar = st.progress(0.0, text=self.text)

    def __call__(self, done: int, total: int) -> None:
        self._bar.progress(min(done / max(total, 1), 1.0), text=f"{self.text} ({done}/{total})")

    def done(self) -> None:
        self._bar.empty()

