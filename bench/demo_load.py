"""Many visitors at once: concurrent mask-editor sessions on one shared model, checked number by number.

Each session is Streamlit's own test client (``AppTest``) running the editor page in a thread of
this process, so all of them share the cached model and live evaluator exactly as browser tabs of
one ``streamlit run`` do. For a fixed time each session toggles heads of its own (disjoint cells,
pruned one by one then restored, so a session's masks are new until its cells run out) and records
the number the page shows and how long the click took to show it. Meanwhile a "closer" opens a
session, clicks and closes it mid-computation (the test client's timeout stops its script as a
closed tab's session does), again and again.

Afterwards every shown number is compared with ``analysis.evaluation.perplexity`` run independently
on the same windows and that session's own mask (rebuilt from its clicks, not read from the page),
the shared model's weights with a copy taken before, and no script thread may be left running.

    .venv/bin/python -m bench.demo_load --sessions 8 --seconds 60        # default model, on the idle machine

Prints one line per session (clicks, wrong numbers, errors), latency p50/p95/max, peak RSS against
its bound and the load average; exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest.mock import MagicMock, patch

import torch
from streamlit.testing.v1 import AppTest

from analysis.corpus import load_text, make_windows
from analysis.evaluation import perplexity
from analysis.masks import Mask
from ui import backend, session

ROOT = Path(__file__).resolve().parent.parent
APP = ROOT / "app.py"
EDITOR = "app_pages/4_Mask_editor.py"
LIVE = "Live perplexity"  # the editor's metric label
SCRIPT_THREAD = "ScriptRunner.scriptThread"  # Streamlit's name for the thread that runs a page
REFINE_THREAD = "headroom-live-refine"  # analysis.live.Refinement's background thread
GIB = 2**30
FAIR_SHARE = 4  # no session may get fewer than a quarter of the clicks of the busiest one


@dataclass(frozen=True)
class Click:
    """One click of one session: the heads it had pruned afterwards, what the page showed, and how long it took."""

    session: int
    pruned: frozenset[tuple[int, int]]
    shown: str
    latency_s: float


@dataclass(frozen=True)
class LoadReport:
    """What :func:`run_load` measured; ``problems`` lists every failed check (empty when all passed)."""

    sessions: int
    seconds: float
    clicks_per_session: list[int]
    latency_p50_s: float
    latency_p95_s: float
    latency_max_s: float
    numbers_checked: int
    closed_sessions: int
    closed_work_max_s: float  # longest a closed session's script kept running after it was closed
    rss_before_bytes: int
    rss_peak_bytes: int
    weights_bit_identical: bool
    script_threads_left: int
    refinements_left: int  # live refinements still computing once every session is gone: stale work
    problems: list[str] = field(default_factory=list)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (nearest rank) of ``values``; nan when empty."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)] if ordered else math.nan


def session_cells(shape, session: int, sessions: int) -> list[tuple[int, int]]:
    """This session's heads: every ``sessions``-th cell in layer-major order, so sessions never share a head."""
    cells = [(layer, head) for layer in range(shape.num_layers) for head in range(shape.num_heads)]
    return cells[session::sessions]


def open_editor(settings: dict[str, object], timeout_s: float) -> AppTest:
    """A new visitor: the app opened on the editor page, with ``settings`` as the session's choices."""
    at = AppTest.from_file(str(APP), default_timeout=timeout_s)
    for key, value in settings.items():
        at.session_state[key] = value
    at.switch_page(EDITOR)
    return at.run()


def toggle(at: AppTest, layer: int, head: int, timeout_s: float | None = None) -> AppTest:
    """Toggle one head the way a visitor does without a mouse: the editor's layer/head form."""
    at.number_input(key="toggle_layer").set_value(layer)
    at.number_input(key="toggle_head").set_value(head)
    button = next(b for b in at.button if b.label == "Toggle head")
    return button.click().run(timeout=timeout_s)


def shown_problems(at: AppTest) -> list[str]:
    return [str(e) for e in at.exception] + [e.value for e in at.error]


@contextmanager
def one_runtime() -> Iterator[None]:
    """One Streamlit runtime, configuration and script cache for every test-client session, as a real server has.

    ``AppTest`` sets each of these up for one run and takes it down when the run ends, which is fine
    one session at a time; with sessions in threads, one session's end would pull them from under
    another that is still running:

    - the runtime: a session starting while another ends would find none;
    - the ``global.appTest`` option, which ``AppTest`` turns on by patching ``config.get_option`` for
      the run: restored by one session mid-way through another's run, that run's widgets stop
      recording what the test client reads back (a KeyError on ``$$ID-...`` in the test thread);
    - the script cache, new per run, so every click of every session would parse the page again, in
      threads at once. Under CPython 3.11 a parse interrupted by another thread (garbage collection
      can switch threads inside ``ast.parse``) fails with ``SystemError: AST constructor recursion
      depth mismatch``, a counter being shared by all threads. A server compiles each page once;
    - the wait for a run's end: ``AppTest`` polls every millisecond and scans *all* the run's events
      each time (one per message the page sent: the editor's "Refining… s" line adds several per
      second), holding the GIL. Eight sessions waiting so starved the evaluator's thread of the GIL
      between its torch operations that clicks took minutes; a server waits on its event loop.
      :func:`wait_for_run` polls every 10 ms and looks at new events only.

    Errors from those would be artefacts of the harness, never something a visitor sees.
    """
    from streamlit import runtime
    from streamlit.runtime import Runtime
    from streamlit.runtime.caching.storage.dummy_cache_storage import MemoryCacheStorageManager
    from streamlit.runtime.dataframe_source_manager import DataframeSourceManager
    from streamlit.runtime.media_file_manager import MediaFileManager
    from streamlit.runtime.memory_media_file_storage import MemoryMediaFileStorage
    from streamlit.runtime.scriptrunner.script_cache import ScriptCache
    from streamlit.testing.v1 import app_test, local_script_runner
    from streamlit.testing.v1.util import patch_config_options

    shared = MagicMock(spec=Runtime)
    shared.media_file_mgr = MediaFileManager(MemoryMediaFileStorage("/mock/media"))
    shared.cache_storage_manager = MemoryCacheStorageManager()
    shared.dataframe_source_mgr = DataframeSourceManager()
    scripts = ScriptCache()
    with (
        patch.object(runtime, "get_instance", return_value=shared),
        patch.object(runtime, "exists", return_value=True),
        patch_config_options({"global.appTest": True}),  # for the whole load, not per run
        patch.object(app_test, "patch_config_options", lambda overrides: nullcontext()),
        patch.object(app_test, "ScriptCache", return_value=scripts),
        patch.object(local_script_runner, "ScriptCache", return_value=scripts),
        patch.object(local_script_runner, "require_widgets_deltas", wait_for_run),
    ):
        yield


def wait_for_run(runner: Any, timeout: float = 3) -> None:
    """``local_script_runner.require_widgets_deltas`` without its GIL-heavy polling (see :func:`one_runtime`)."""
    from streamlit.runtime.scriptrunner import ScriptRunnerEvent

    t0, seen = time.time(), 0
    while time.time() - t0 < timeout:
        time.sleep(0.01)
        events = runner.events
        count = len(events)
        if ScriptRunnerEvent.SHUTDOWN in events[seen:count]:
            return
        seen = count
    runner.request_stop()  # as AppTest does on its timeout: stop the script, then report
    runner.join()
    raise RuntimeError(f"AppTest script run timed out after {timeout}(s)")


def run_load(
    settings: dict[str, object],
    sessions: int = 8,
    seconds: float = 60.0,
    rss_bound_bytes: int = 3 * GIB,
    page_timeout_s: float = 600.0,
    log: Callable[[str], None] = lambda line: None,
) -> LoadReport:
    """Run ``sessions`` editor sessions for ``seconds`` on ``settings`` (``ui.session`` keys); check them."""
    lm = backend.shared_model(str(settings.get(session.MODEL, session.DEFAULTS[session.MODEL])))
    weights = {k: v.detach().clone() for k, v in lm.model.state_dict().items()}
    rss_before = rss_bytes()
    peak = [rss_before]
    done = threading.Event()

    def sample_rss() -> None:
        while not done.wait(0.05):
            peak[0] = max(peak[0], rss_bytes())

    clicks: list[Click] = []
    problems: list[str] = []
    closed_work: list[float] = []
    lock = threading.Lock()
    deadline = [math.inf]

    def set_deadline() -> None:  # run once every page is open, before any session clicks
        deadline[0] = time.monotonic() + seconds

    start = threading.Barrier(sessions + 1, action=set_deadline)

    def visitor(i: int) -> None:
        try:
            at = open_editor(settings, page_timeout_s)
            cells = session_cells(lm.shape, i, sessions)
            pruned: set[tuple[int, int]] = set()
            start.wait()
            step = 0
            while time.monotonic() < deadline[0]:
                cell = cells[step % len(cells)]
                step += 1
                t = time.perf_counter()
                toggle(at, *cell)
                latency = time.perf_counter() - t
                pruned ^= {cell}
                seen = shown_problems(at)
                with lock:
                    problems.extend(f"session {i}: {p}" for p in seen)
                    shown = next(m.value for m in at.metric if m.label == LIVE)
                    clicks.append(Click(i, frozenset(pruned), shown, latency))
        except Exception as e:  # a crashed visitor is a failed check, reported with the others
            with lock:
                problems.append(f"session {i} crashed: {type(e).__name__}: {e}")
            if start.n_waiting:
                start.abort()

    def closer() -> None:
        """Open a session, click, and close it while the click is being computed; repeat until the deadline."""
        n = 0
        while time.monotonic() < deadline[0]:
            at = open_editor(settings, page_timeout_s)
            layer, head = session_cells(lm.shape, n % sessions, sessions)[0]
            # A quarter of the median click: the script is waiting for the evaluator or in it.
            close_after = (statistics.median(c.latency_s for c in clicks) if clicks else 0.1) / 4
            t = time.perf_counter()
            try:
                toggle(at, layer, head, timeout_s=close_after)
            except RuntimeError:  # the test client's timeout: it stopped the script and waited for it to end
                closed_work.append(time.perf_counter() - t - close_after)
            n += 1

    sampler = threading.Thread(target=sample_rss, daemon=True)
    sampler.start()
    with one_runtime():
        threads = [threading.Thread(target=visitor, args=(i,), name=f"visitor-{i}") for i in range(sessions)]
        for thread in threads:
            thread.start()
        with suppress(threading.BrokenBarrierError):  # a session that failed to open is reported as crashed
            start.wait()
        closing = threading.Thread(target=closer, name="closer")
        closing.start()
        for thread in [*threads, closing]:
            thread.join()
    done.set()
    sampler.join()
    # A refinement stops between layers once cancelled: a second is ample. One that runs on computes for nobody.
    grace = time.monotonic() + 2.0
    while time.monotonic() < grace and any(t.name == REFINE_THREAD and t.is_alive() for t in threading.enumerate()):
        time.sleep(0.05)
    refining = sum(t.name == REFINE_THREAD and t.is_alive() for t in threading.enumerate())
    log(f"load over: {len(clicks)} clicks; checking every number against the backend")

    evaluation = make_windows(
        lm.tokenizer,
        load_text(str(settings.get(session.EVAL_TEXT, session.DEFAULTS[session.EVAL_TEXT]))),
        int(settings.get(session.SEQLEN, session.DEFAULTS[session.SEQLEN])),
        int(settings.get(session.MAX_TOKENS, session.DEFAULTS[session.MAX_TOKENS])),
        lm.max_positions,
    )
    base = Mask.unpruned(lm.shape, lm.name)
    reference: dict[frozenset[tuple[int, int]], float] = {}
    for click in clicks:
        if click.pruned not in reference:
            reference[click.pruned] = perplexity(lm.arch, evaluation, base.with_heads(click.pruned, False)).perplexity
        expected = reference[click.pruned]
        # Equal at the page's three decimals; the incremental and the full pass may differ in float rounding.
        if abs(float(click.shown.replace(",", "")) - expected) > 5e-4 + 1e-6 * expected:
            problems.append(f"session {click.session} showed {click.shown} for {sorted(click.pruned)}: {expected:.6f}")
    identical = all(torch.equal(v, lm.model.state_dict()[k]) for k, v in weights.items())
    left = sum(t.name == SCRIPT_THREAD and t.is_alive() for t in threading.enumerate())
    counts = [sum(c.session == i for c in clicks) for i in range(sessions)]
    latencies = [c.latency_s for c in clicks]
    if not identical:
        problems.append("the shared model's weights changed")
    if left:
        problems.append(f"{left} script threads still running after every session closed")
    if refining:
        problems.append(f"{refining} live refinements still computing after every session closed")
    if peak[0] > rss_bound_bytes:
        problems.append(f"peak RSS {peak[0] / GIB:.2f} GiB is over the bound of {rss_bound_bytes / GIB:.2f} GiB")
    if min(counts, default=0) < max(counts, default=0) / FAIR_SHARE:
        problems.append(f"a session was starved (fewer than 1/{FAIR_SHARE} of the busiest's clicks): {counts}")
    return LoadReport(
        sessions=sessions,
        seconds=seconds,
        clicks_per_session=counts,
        latency_p50_s=percentile(latencies, 0.5),
        latency_p95_s=percentile(latencies, 0.95),
        latency_max_s=max(latencies, default=math.nan),
        numbers_checked=len(clicks),
        closed_sessions=len(closed_work),
        closed_work_max_s=max(closed_work, default=0.0),
        rss_before_bytes=rss_before,
        rss_peak_bytes=peak[0],
        weights_bit_identical=identical,
        script_threads_left=left,
        refinements_left=refining,
        problems=problems,
    )


def print_report(report: LoadReport, rss_bound_bytes: int) -> None:
    print(f"{report.sessions} sessions for {report.seconds:g} s; load average {os.getloadavg()}")
    print(
        f"clicks per session: {report.clicks_per_session} (min {min(report.clicks_per_session)}, "
        f"max {max(report.clicks_per_session)})"
    )
    print(
        f"click-to-number latency: p50 {report.latency_p50_s:.3f} s, p95 {report.latency_p95_s:.3f} s, "
        f"max {report.latency_max_s:.3f} s over {report.numbers_checked} clicks, every number checked"
    )
    print(
        f"closed mid-computation: {report.closed_sessions} sessions; their scripts ran at most "
        f"{report.closed_work_max_s:.3f} s after closing; script threads left: {report.script_threads_left}, "
        f"live refinements left: {report.refinements_left}"
    )
    print(
        f"RSS: {report.rss_before_bytes / GIB:.2f} GiB before, peak {report.rss_peak_bytes / GIB:.2f} GiB "
        f"(bound {rss_bound_bytes / GIB:.2f} GiB); weights bit-identical: {report.weights_bit_identical}"
    )
    for problem in report.problems:
        print(f"PROBLEM: {problem}")
    print("all checks passed" if not report.problems else f"{len(report.problems)} problems")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=session.DEFAULTS[session.MODEL])
    parser.add_argument("--text", default=session.DEFAULTS[session.EVAL_TEXT])
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--seqlen", type=int, default=session.DEFAULTS[session.SEQLEN])
    parser.add_argument("--tokens", type=int, default=session.DEFAULTS[session.MAX_TOKENS], help="evaluation tokens")
    parser.add_argument("--rss-bound-gib", type=float, default=3.0)
    args = parser.parse_args()
    settings = {
        session.MODEL: args.model,
        session.EVAL_TEXT: args.text,
        session.SEQLEN: args.seqlen,
        session.MAX_TOKENS: args.tokens,
    }
    bound = int(args.rss_bound_gib * GIB)
    report = run_load(settings, args.sessions, args.seconds, bound, log=print)
    print_report(report, bound)
    sys.exit(1 if report.problems else 0)


if __name__ == "__main__":
    main()
