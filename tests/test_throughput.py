"""Measured job speed: stored per model, job and machine, folded over runs, and turned into estimates."""

from __future__ import annotations

import pytest
import torch

from analysis import throughput
from analysis.cache import DiskCache, model_key
from analysis.throughput import duration_text, measured_rate, record

MODEL_A = model_key("a" * 16, torch.float32)


def test_a_job_that_never_ran_has_no_estimate(tmp_path):
    assert measured_rate(DiskCache(tmp_path), MODEL_A, "harp") is None


def test_rates_fold_runs_with_the_newest_weighted_by_memory(tmp_path):
    cache = DiskCache(tmp_path)
    first = record(cache, MODEL_A, "harp", "candidates", units=10, seconds=20.0)
    assert (first.seconds_per_unit, first.runs, first.last_units) == (2.0, 1, 10)
    second = record(cache, MODEL_A, "harp", "candidates", units=4, seconds=16.0)  # 4 s per candidate
    expected = throughput.MEMORY * 4.0 + (1 - throughput.MEMORY) * 2.0
    assert second.seconds_per_unit == pytest.approx(expected)
    assert (second.runs, second.last_units) == (2, 4)
    assert measured_rate(cache, MODEL_A, "harp").seconds(30) == pytest.approx(30 * expected)


def test_rates_are_kept_apart_by_model_job_device_and_machine(tmp_path, monkeypatch):
    cache = DiskCache(tmp_path)
    record(cache, MODEL_A, "harp", "candidates", units=1, seconds=3.0)
    assert measured_rate(cache, model_key("b" * 16, torch.float32), "harp") is None
    assert measured_rate(cache, MODEL_A, "compare") is None
    assert measured_rate(cache, MODEL_A, "harp", device="cuda") is None
    assert measured_rate(cache, model_key("a" * 16, torch.bfloat16), "harp") is None
    monkeypatch.setattr(throughput, "machine", lambda: "another machine")  # a cache copied to a laptop
    assert measured_rate(cache, MODEL_A, "harp") is None


def test_a_run_without_units_is_refused(tmp_path):
    with pytest.raises(ValueError, match="at least one unit"):
        record(DiskCache(tmp_path), MODEL_A, "harp", "candidates", units=0, seconds=1.0)


@pytest.mark.parametrize(("seconds", "text"), [(0.4, "0 s"), (59.4, "59 s"), (125, "2 min 05 s"), (3780, "1 h 03 min")])
def test_durations_read_as_a_person_says_them(seconds, text):
    assert duration_text(seconds) == text
