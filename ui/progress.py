"""Progress bars for long work: a ``Progress`` callback ``(done, total)`` that draws ``st.progress``.

A bar names its units (windows, heads, candidates), the time elapsed and what is left at the pace so
far. A bar given a :class:`Job` also records the job's measured speed when it finishes
(``analysis.throughput``), so that the next time the page can say before the button how long it
will take on this model and machine.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import streamlit as st

from analysis.cache import DiskCache
from analysis.throughput import duration_text, measured_rate, record


@dataclass(frozen=True)
class Job:
    """A kind of long work on one model, whose speed is worth remembering."""

    cache: DiskCache
    model: dict[str, str]  # LoadedModel.cache_key(): fingerprint and dtype
    name: str  # e.g. "harp", "head_metric:gradient"
    unit: str  # what one progress step is, plural: "windows", "heads", "candidates"

    def expected(self, units: int | None = None) -> str:
        """'about 3 min 10 s for 44 candidates (measured here: 2.4 s per candidate)', or why there is no estimate.

        ``units`` defaults to the size of the last run, for jobs whose size is known only once they run.
        """
        rate = measured_rate(self.cache, self.model, self.name)
        if rate is None:
            size = f" ({units} {self.unit})" if units else ""
            return f"no estimate yet: the first run on this model and machine measures its speed{size}"
        units = rate.last_units if units is None else units
        return (
            f"about {duration_text(rate.seconds(units))} for {units} {self.unit} "
            f"(measured here: {rate.seconds_per_unit:.2g} s per {self.unit.rstrip('s')}, {rate.runs} run(s))"
        )


class ProgressBar:
    """A ``Progress`` callback drawing an ``st.progress`` bar; ``done()`` removes it."""

    def __init__(self, text: str, job: Job | None = None) -> None:
        self.text = text
        self.job = job
        self.unit = job.unit if job else "steps"
        self._start = time.perf_counter()
        self._bar = st.progress(0.0, text=f"{text}: starting…")

    def __call__(self, done: int, total: int) -> None:
        elapsed = time.perf_counter() - self._start
        left = f" · about {duration_text(elapsed / done * (total - done))} left" if 0 < done < total else ""
        self._bar.progress(
            min(done / max(total, 1), 1.0),
            text=f"{self.text}: {done}/{total} {self.unit} · {duration_text(elapsed)} elapsed{left}",
        )
        if done == total and self.job is not None:
            job = self.job
            record(job.cache, job.model, job.name, job.unit, total, elapsed)

    def done(self) -> None:
        self._bar.empty()


@contextmanager
def progress_bar(text: str, job: Job | None = None) -> Iterator[ProgressBar]:
    """A :class:`ProgressBar` removed when the block ends, however it ends."""
    bar = ProgressBar(text, job)
    try:
        yield bar
    finally:
        bar.done()
