"""Live perplexity: the estimate and its interval against a direct computation, the settled number, cancellation."""

from __future__ import annotations

import dataclasses
import math
import random
import threading
import time

import numpy as np
import pytest
import torch
from scipy import stats

from analysis.architecture import Architecture
from analysis.errors import HeadroomError
from analysis.evaluation import IncrementalEvaluator, perplexity
from analysis.intervention import apply_mask
from analysis.live import BLOCKS_PER_WINDOW, LivePerplexity, window_order
from analysis.masks import Mask
from tests.helpers import count_layer_calls, random_mask, random_windows, tiny_model

WINDOWS, LENGTH = 6, 25  # 24 predicted tokens per window: 8 blocks of 3


def tiny_arch_of(family: str) -> Architecture:
    return Architecture(tiny_model(family))


def plain_token_nll(model: torch.nn.Module, ids: torch.Tensor) -> np.ndarray:
    """Per-token next-token NLL from plain transformers logits and cross_entropy."""
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1]
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
    return nll.view(ids.shape[0], -1).double().numpy()


def test_first_estimate_and_interval_equal_a_direct_computation(tiny_arch):
    windows = random_windows(n=WINDOWS, length=LENGTH)
    live = LivePerplexity(tiny_arch, windows)
    mask = Mask.unpruned(tiny_arch.shape, "tiny").with_head(1, 2, False).with_layer(2, drop_qk=True, alpha=0.6)
    answers = list(live.estimates(mask))
    assert [a.exact for a in answers] == [False] * (WINDOWS - 1) + [True]
    assert [a.predicted_tokens for a in answers] == [24 * k for k in range(1, WINDOWS + 1)]

    base = plain_token_nll(tiny_arch.model, windows.input_ids)
    with apply_mask(tiny_arch, mask):
        pruned = plain_token_nll(tiny_arch.model, windows.input_ids)
    for k in (1, 3):
        done = window_order(mask, WINDOWS)[:k]
        blocks = (pruned - base)[done].reshape(k * BLOCKS_PER_WINDOW, -1).mean(axis=1)  # equal blocks of 3
        scale = math.sqrt((1 - k / WINDOWS) * blocks.var(ddof=1) / len(blocks))
        low, high = stats.t.interval(0.95, len(blocks) - 1, loc=base.mean() + blocks.mean(), scale=scale)
        answer = answers[k - 1]
        assert answer.perplexity == pytest.approx(math.exp(base.mean() + blocks.mean()), rel=1e-5)
        assert (answer.perplexity_low, answer.perplexity_high) == pytest.approx(
            (math.exp(low), math.exp(high)), rel=1e-5
        )
        assert answer.unpruned_perplexity == pytest.approx(math.exp(base.mean()), rel=1e-5)


def test_the_settled_number_is_the_incremental_and_the_full_one(tiny_arch):
    windows = random_windows(n=WINDOWS, length=LENGTH)
    live = LivePerplexity(tiny_arch, windows)
    batched = IncrementalEvaluator(tiny_arch, windows)
    rng = random.Random(1)
    mask = Mask.unpruned(tiny_arch.shape, "tiny")
    for _ in range(6):
        mask = random_mask(mask, rng)
        settled = list(live.estimates(mask))[-1]
        assert settled.exact and settled.perplexity_low == settled.perplexity == settled.perplexity_high
        assert settled.perplexity == batched.perplexity(mask).perplexity  # to the last digit
        full = perplexity(tiny_arch, windows, mask).perplexity
        assert settled.perplexity == pytest.approx(full, rel=1e-6)


def test_a_mask_seen_before_is_answered_exactly_at_once():
    arch = tiny_arch_of("llama")
    windows = random_windows(n=WINDOWS, length=LENGTH)
    live = LivePerplexity(arch, windows)
    mask = Mask.unpruned(arch.shape, "tiny").with_head(0, 1, False)
    first = list(live.estimates(mask))[-1]
    list(live.estimates(mask.with_head(3, 0, False)))
    calls, handles = count_layer_calls(arch)
    try:
        again = list(live.estimates(mask))
        unpruned = list(live.estimates(Mask.unpruned(arch.shape, "tiny")))
    finally:
        for h in handles:
            h.remove()
    assert calls == [0, 0, 0, 0] and again == [first]
    assert len(unpruned) == 1 and unpruned[0].exact and unpruned[0].perplexity == first.unpruned_perplexity


def test_a_newer_request_cancels_the_older_between_windows():
    arch = tiny_arch_of("llama")
    windows = random_windows(n=WINDOWS, length=LENGTH)
    live = LivePerplexity(arch, windows)
    base = Mask.unpruned(arch.shape, "tiny")
    older = live.estimates(base.with_head(0, 0, False), client="a")
    assert not next(older).exact
    newer = live.estimates(base.with_head(1, 1, False), client="a")
    other_client = live.estimates(base.with_head(2, 2, False), client="b")  # not cancelled by "a"
    calls, handles = count_layer_calls(arch)
    try:
        assert list(older) == []  # its remaining windows are dropped
    finally:
        for h in handles:
            h.remove()
    assert calls == [0, 0, 0, 0]
    for answers, mask in ((newer, base.with_head(1, 1, False)), (other_client, base.with_head(2, 2, False))):
        settled = list(answers)[-1]
        assert settled.exact and settled.perplexity == pytest.approx(
            perplexity(arch, windows, mask).perplexity, rel=1e-6
        )


def test_a_request_from_another_thread_cancels_one_inside_a_window():
    arch = tiny_arch_of("llama")
    windows = random_windows(n=WINDOWS, length=LENGTH)
    live = LivePerplexity(arch, windows)
    base = Mask.unpruned(arch.shape, "tiny")
    inside, go = threading.Event(), threading.Event()

    def pause(module, args, output):
        if threading.current_thread().name == "older" and not inside.is_set():
            inside.set()
            go.wait(10)

    handle = arch.layers[1].register_forward_hook(pause)
    calls, counters = count_layer_calls(arch)
    older_answers: list = []
    worker = threading.Thread(
        target=lambda: older_answers.extend(live.estimates(base.with_head(0, 0, False), client="s")), name="older"
    )
    try:
        worker.start()
        assert inside.wait(10)
        newer = live.estimates(base.with_head(2, 1, False), client="s")
        go.set()
        worker.join(10)
        assert calls == [1, 1, 0, 0]  # the older stopped after layer 1 of its first window
    finally:
        handle.remove()
        for h in counters:
            h.remove()
    assert older_answers == []
    settled = list(newer)[-1]
    expected = perplexity(arch, windows, base.with_head(2, 1, False)).perplexity
    assert settled.exact and settled.perplexity == pytest.approx(expected, rel=1e-6)
    # The half-done window of the older mask is repaired when that mask is asked for again.
    again = list(live.estimates(base.with_head(0, 0, False)))[-1]
    assert again.perplexity == pytest.approx(
        perplexity(arch, windows, base.with_head(0, 0, False)).perplexity, rel=1e-6
    )


def test_the_interval_covers_the_exact_value_in_about_95_percent_of_random_toggles():
    """A statistical check of the estimator on a tiny model: first answers (one window of 10) of 150 toggles.

    At a true 95 %, 150 trials fall under 90 % with probability about 0.5 %.
    """
    arch = tiny_arch_of("qwen2")
    windows = random_windows(n=10, length=33, seed=3)
    live = LivePerplexity(arch, windows)
    rng = random.Random(7)
    mask, hits, trials = Mask.unpruned(arch.shape, "tiny"), 0, 150
    for _ in range(trials):
        mask = random_mask(mask, rng)
        answers = list(live.estimates(mask))
        if len(answers) == 1:  # seen before: no estimate to check
            trials -= 1
            continue
        first, settled = answers[0], answers[-1]
        hits += first.perplexity_low <= settled.perplexity <= first.perplexity_high
    assert hits / trials >= 0.90, (hits, trials)


def test_a_refinement_hands_over_the_answers_of_a_background_thread_then_finishes():
    arch = tiny_arch_of("llama")
    windows = random_windows(n=WINDOWS, length=LENGTH)
    live = LivePerplexity(arch, windows)
    mask = Mask.unpruned(arch.shape, "tiny").with_head(2, 3, False)
    refinement = live.start(mask, client="page")
    answers = []
    deadline = time.monotonic() + 60
    while not refinement.finished and time.monotonic() < deadline:
        answer = refinement.next(0.05)
        if answer is not None:
            answers.append(answer)
    assert refinement.finished and refinement.next(0.0) is None
    assert answers == list(LivePerplexity(arch, windows).estimates(mask))  # the same answers, in the same order
    assert answers[-1].exact and answers[-1].perplexity == pytest.approx(perplexity(arch, windows, mask).perplexity)


def drain(refinement, seconds: float = 60) -> list:
    answers, deadline = [], time.monotonic() + seconds
    while not refinement.finished and time.monotonic() < deadline:
        answer = refinement.next(0.05)
        if answer is not None:
            answers.append(answer)
    return answers


def test_cancelling_a_refinement_stops_its_work_but_not_a_newer_request_of_the_client():
    """What a closed tab does: its request stops before its next window; the client's newer request goes on."""
    arch = tiny_arch_of("llama")
    windows = random_windows(n=WINDOWS, length=LENGTH)
    live = LivePerplexity(arch, windows)
    base = Mask.unpruned(arch.shape, "tiny")
    with live._lock:  # the refinement's thread waits for its first window
        closed = live.start(base.with_head(0, 1, False), client="tab")
        closed.cancel()
    calls, handles = count_layer_calls(arch)
    try:
        assert drain(closed) == [] and closed.finished  # no window was computed for it
    finally:
        for h in handles:
            h.remove()
    assert calls == [0, 0, 0, 0]
    older = live.start(base.with_head(1, 2, False), client="tab")
    newer = live.start(base.with_head(3, 0, False), client="tab")
    older.cancel()  # too late to matter, and it must not touch the newer request
    settled = drain(newer)[-1]
    assert settled.exact
    assert settled.perplexity == pytest.approx(perplexity(arch, windows, base.with_head(3, 0, False)).perplexity)


def test_a_refinement_raises_the_error_of_its_thread_in_the_caller():
    arch = tiny_arch_of("llama")
    live = LivePerplexity(arch, random_windows(n=WINDOWS, length=LENGTH))

    def fail(module, args, output):
        raise RuntimeError("layer 1 failed")

    handle = arch.layers[1].register_forward_hook(fail)
    try:
        refinement = live.start(Mask.unpruned(arch.shape, "tiny").with_head(0, 0, False))
        with pytest.raises(RuntimeError, match="layer 1 failed"):
            while not refinement.finished:
                refinement.next(1.0)
    finally:
        handle.remove()
    assert refinement.finished


def test_a_mask_for_another_model_is_refused_at_once():
    arch = tiny_arch_of("llama")
    live = LivePerplexity(arch, random_windows(n=WINDOWS, length=LENGTH))
    wrong = Mask.unpruned(dataclasses.replace(arch.shape, num_layers=arch.shape.num_layers - 1), "other")
    with pytest.raises(HeadroomError, match="3 layers x 6 heads but the model is 4 x 6"):
        live.start(wrong)
