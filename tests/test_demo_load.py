"""Many visitors at once, bounded: 8 concurrent editor sessions on a tiny model for a few seconds.

``bench/demo_load.py`` runs the same load on the default model for the lead's idle-machine figures;
here every check of it must pass: each shown number equals an independent full evaluation of that
session's own mask, no error is shown, the weights are bit-identical afterwards, RSS stays under
the stated bound, no session is starved, and no script thread is left running.
"""

from __future__ import annotations

import pytest

from bench.demo_load import GIB, print_report, rss_bytes, run_load
from tests.test_loading import save_checkpoint, word_text
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
    report = run_load(tiny_settings, sessions=8, seconds=6.0, rss_bound_bytes=bound)
    print_report(report, bound)
    assert report.problems == []
    assert report.numbers_checked >= 16 and min(report.clicks_per_session) >= 2
    assert report.weights_bit_identical and report.script_threads_left == 0 and report.closed_sessions >= 1
