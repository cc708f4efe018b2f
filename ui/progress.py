"""Progress bars for long work: a ``Progress`` callback ``(done, total)`` that draws ``st.progress``."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import streamlit as st


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


@contextmanager
def progress_bar(text: str) -> Iterator[ProgressBar]:
    """A :class:`ProgressBar` removed when the block ends, however it ends."""
    bar = ProgressBar(text)
    try:
        yield bar
    finally:
        bar.done()
