"""Many visitors at once, bounded: 8 concurrent editor sessions on a tiny model for a few seconds.

``bench/demo_load.py`` runs the same load on the default model for the lead's idle-machine figures;
here every check of it must pass: each shown number equals an independent full evaluation of that
session's own mask, no error is shown, the weights are bit-identical afterwards, RSS stays under
the stated bound, no session is starved, and no script thread is left running.
"""

from __future__ import annotations

import itertools
import threading
import time

import pytest

from analysis.architecture import Architecture
from analysis.evaluation import perplexity
from analysis.live import LivePerplexity
from analysis.masks import Mask
from bench.demo_load import GIB, print_report, rss_bytes, run_load
from tests.helpers import random_windows, save_checkpoint, tiny_model, word_text
from ui import session

RSS_GROWTH_BOUND = GIB // 2  # 8 sessions on a tiny model: the pages and the evaluator's stored layers


@pytest.fixture
def tiny_settings(tmp_path, session_cache) -> dict[str, object]:
    save_checkpoint(tmp_path / "tiny-llama")
    (tmp_path / "eval.txt").write_text(word_text(400, 1), encoding="utf-8")
    return {
        session.MODEL: str(tmp_path / "tiny-llama"),
        session.EVAL_TEXT: str(tmp_path / "eval.txt"),
        session.CALIB_TEXT: str(tmp_path / "eval.txt"),
        session.SEQLEN: 16,
        session.MAX_TOKENS: 64,
    }


def test_eight_concurrent_editor_sessions_each_see_their_own_exact_numbers(tiny_settings):
    bound = rss_bytes() + RSS_GROWTH_BOUND
    report = run_load(tiny_settings, sessions=8, seconds=12.0, rss_bound_bytes=bound)
    print_report(report, bound)
    assert report.problems == []
    assert report.numbers_checked >= 16 and min(report.clicks_per_session) >= 2
    assert report.weights_bit_identical and report.script_threads_left == 0 and report.closed_sessions >= 1
    assert report.refinements_left == 0  # a closed session's refinement was cancelled, not left computing


# --- the shared live evaluator driven by several sessions at once (no pages: the backend alone) --------


def test_sessions_driving_the_shared_live_evaluator_at_once_each_get_their_own_exact_numbers():
    """Four threads, each a session with its own masks, refine on one LivePerplexity at the same time.

    Each pauses a moment between answers, as a page does to draw one, so their windows interleave on
    the evaluator (checked from the order its layers ran in); every settled number must still equal an
    independent full evaluation of that session's own mask.
    """
    arch = Architecture(tiny_model("llama"))
    windows = random_windows(n=6, length=25, seed=5)
    shared = LivePerplexity(arch, windows)
    base = Mask.unpruned(arch.shape, "tiny")
    cells = {
        "session-0": [(0, 0), (1, 1), (2, 2)],
        "session-1": [(3, 5), (2, 4), (1, 0)],
        "session-2": [(1, 3), (0, 5), (3, 2)],
    }
    masks = {name: [base.with_heads(c[: k + 1], False) for k in range(3)] for name, c in cells.items()}
    masks["session-3"] = [base.with_layer(2, drop_qk=True, alpha=a) for a in (0.2, 0.5, 0.9)]
    order: list[str] = []
    # Every refresh of a window runs the last layer, whichever layer it starts from.
    handle = arch.layers[-1].register_forward_pre_hook(lambda *_: order.append(threading.current_thread().name))
    settled: dict[str, list[float]] = {name: [] for name in masks}
    failures: list[BaseException] = []
    start = threading.Barrier(len(masks))

    def session(name: str) -> None:
        try:
            start.wait(30)
            for mask in masks[name]:
                answers = []
                for answer in shared.estimates(mask, client=name):
                    answers.append(answer)
                    time.sleep(0.002)  # the page draws the answer
                assert answers[-1].exact
                settled[name].append(answers[-1].perplexity)
        except BaseException as e:  # reported below: an assertion in a thread would otherwise be lost
            failures.append(e)

    threads = [threading.Thread(target=session, args=(name,), name=name) for name in masks]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
    finally:
        handle.remove()
    assert failures == [] and not any(t.is_alive() for t in threads)
    # The sessions really ran at once: some session's refinement was entered by another between its windows.
    switches = sum(a != b for a, b in itertools.pairwise(order))
    assert switches > sum(len(m) for m in masks.values()), order
    for name, session_masks in masks.items():
        expected = [perplexity(arch, windows, mask).perplexity for mask in session_masks]
        assert settled[name] == pytest.approx(expected, rel=1e-6), name
    assert len({p for values in settled.values() for p in values}) == 12  # twelve masks, twelve numbers
