"""Live perplexity for the mask editor: an estimate after one window, then the exact number.

The evaluator refreshes the live windows one at a time under the requested mask, in an order drawn
at random per mask (seeded by the mask, so reproducible), and after each window answers with an
estimate and its 95 % interval; after the last window the answer is exact, the very number
:class:`~analysis.evaluation.IncrementalEvaluator` gives (same per-token NLL, added in the same order).

Estimator (a paired difference estimator). For every predicted token the unpruned NLL is known
from the evaluator's capturing pass; a window refreshed under the mask gives the per-token
differences ``delta = NLL_mask - NLL_unpruned`` on the same tokens. The two NLLs are strongly
correlated, so ``delta`` varies far less than the NLL itself, and the difficulty of a window (which
dominates its NLL) largely cancels. After ``k`` of ``K`` windows, each done window is cut into
:data:`BLOCKS_PER_WINDOW` contiguous blocks of tokens (sums ``y_i`` over ``x_i`` tokens, ``m = kB``
blocks):

* mean delta per token ``D = sum(y) / sum(x)`` (ratio estimator; the windows are a random sample
  without replacement, so it is unbiased for the mean over the live set to first order);
* ``se^2 = (1 - k/K) * sum((y_i - D x_i)^2) / ((m - 1) m xbar^2)`` (finite-population correction:
  the last window leaves no uncertainty);
* mean NLL ``= unpruned mean NLL over all K windows + D``, a Student-t interval with ``m - 1``
  degrees of freedom around it, and the perplexity and its interval are ``exp`` of those.

Blocks rather than windows are the sampling units so that one window already gives an interval.
Within a window, block means differ by position (early tokens see less context), which inflates the
spread (conservative); neighbouring blocks are correlated, which deflates it. ``bench/live_eval.py
--coverage`` measures how often the interval holds the exact value on the real model.

Requests: a newer request from the same client (a page session) cancels the refinement of an older
one between layers (so does :meth:`Refinement.cancel`, e.g. when its page is closed), and the
evaluator is shared by every client behind one lock, taken per window, so clients take turns. A
mask seen recently is answered exactly at once.
"""

from __future__ import annotations

import math
import queue
import random
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from scipy.stats import t as student_t

from analysis.architecture import Architecture
from analysis.corpus import Windows
from analysis.errors import HeadroomError
from analysis.evaluation import IncrementalEvaluator, PerplexityResult, Progress
from analysis.masks import Mask

BLOCKS_PER_WINDOW = 8
CONFIDENCE = 0.95


@dataclass(frozen=True)
class LiveEstimate:
    """A live answer: an estimate with its interval while windows remain, the exact number after the last."""

    perplexity: float
    perplexity_low: float
    perplexity_high: float
    unpruned_perplexity: float  # on the same tokens: the whole live set
    predicted_tokens: int  # tokens evaluated under the mask that this number rests on
    total_predicted_tokens: int
    exact: bool
    confidence: float
    seqlen: int
    text: str
    text_sha256: str
    mask: Any  # Mask.summary()


def window_order(mask: Mask, num_windows: int) -> list[int]:
    """The order the windows are refreshed in for ``mask``: a random permutation seeded by the mask."""
    key = repr([mask.layer(i) for i in range(mask.num_layers)])
    return random.Random(key).sample(range(num_windows), num_windows)


def paired_estimate(
    deltas: Sequence[torch.Tensor], num_windows: int, blocks: int = BLOCKS_PER_WINDOW, confidence: float = CONFIDENCE
) -> tuple[float, float]:
    """Mean per-token NLL difference over the live set, and the half-width of its interval.

    ``deltas`` are the per-token differences of the windows done so far (one 1-D tensor each), a
    random sample of ``num_windows`` windows; see the module docstring for the formulas.
    """
    parts = [block for delta in deltas for block in delta.double().tensor_split(min(blocks, len(delta)))]
    sums = torch.stack([block.sum() for block in parts])
    sizes = torch.tensor([len(block) for block in parts], dtype=torch.float64)
    mean = (sums.sum() / sizes.sum()).item()
    done = len(deltas)
    if done >= num_windows or len(parts) < 2:
        return mean, 0.0 if done >= num_windows else math.inf
    m = len(parts)
    spread = ((sums - mean * sizes) ** 2).sum().item() / (m - 1)
    se = math.sqrt((1 - done / num_windows) * spread / m) / sizes.mean().item()
    return mean, student_t.ppf(0.5 + confidence / 2, m - 1) * se


class LivePerplexity:
    """Progressive perplexity of masks on one set of windows, shared by every client (see the module docstring)."""

    def __init__(self, arch: Architecture, windows: Windows, progress: Progress | None = None) -> None:
        self.windows = windows
        self.evaluator = IncrementalEvaluator(arch, windows, progress, tokens_per_batch=windows.input_ids.shape[1])
        self.unpruned = self.evaluator.perplexity(Mask.unpruned(arch.shape, ""))  # from the capture: no compute
        self._lock = threading.Lock()
        self._latest: dict[str, object] = {}  # client -> its newest request

    def remembered(self, mask: Mask) -> PerplexityResult | None:
        """The exact perplexity of ``mask`` if it was settled recently, else None (never computes)."""
        with self._lock:
            return self.evaluator.remembered(mask)

    def exact(self, mask: Mask) -> PerplexityResult:
        """The exact perplexity at once (no estimates), taking its turn on the lock."""
        with self._lock:
            return self.evaluator.perplexity(mask)

    def estimates(self, mask: Mask, client: str = "") -> Iterator[LiveEstimate]:
        """Answers for ``mask``, one per window, the last exact; stops early when ``client`` asks again.

        The request counts from this call (not from the first ``next``), so a later call cancels it
        even before it is iterated.
        """
        shape = self.evaluator.arch.shape
        if (mask.num_layers, mask.num_heads) != (shape.num_layers, shape.num_heads):
            raise HeadroomError(
                f"the mask is {mask.num_layers} layers x {mask.num_heads} heads but the model is "
                f"{shape.num_layers} x {shape.num_heads}; use a mask made for this model"
            )
        request = object()
        self._latest[client] = request
        return self._refine(mask, lambda: self._latest.get(client) is not request)

    def start(self, mask: Mask, client: str = "") -> Refinement:
        """:meth:`estimates` computed in a background thread, so that the caller stays free (a page can be rerun)."""
        answers = self.estimates(mask, client)
        request = self._latest[client]

        def cancel() -> None:  # this request only: a newer one of the client keeps running
            if self._latest.get(client) is request:
                self._latest[client] = object()

        return Refinement(answers, cancel)

    def _refine(self, mask: Mask, cancelled: Any) -> Iterator[LiveEstimate]:
        known = self.remembered(mask)
        if known is not None:
            yield self._answer(mask, known.mean_nll, 0.0, self.windows.predicted_tokens)
            return
        unpruned = self.evaluator.unpruned_token_nll
        deltas: list[torch.Tensor] = []
        for window in window_order(mask, self.windows.num_windows):
            with self._lock:
                if cancelled() or not self.evaluator.refresh(window, mask, cancelled):
                    return
                deltas.append((self.evaluator.token_nll(window) - unpruned[window]).flatten())
                if len(deltas) == self.windows.num_windows:
                    exact = self.evaluator.perplexity(mask)  # every window is fresh: only the sum is taken
            if len(deltas) < self.windows.num_windows:
                mean, half = paired_estimate(deltas, self.windows.num_windows)
                yield self._answer(mask, self.unpruned.mean_nll + mean, half, sum(len(d) for d in deltas))
        yield self._answer(mask, exact.mean_nll, 0.0, self.windows.predicted_tokens)

    def _answer(self, mask: Mask, mean_nll: float, half_width: float, tokens: int) -> LiveEstimate:
        return LiveEstimate(
            perplexity=math.exp(mean_nll),
            perplexity_low=math.exp(mean_nll - half_width),
            perplexity_high=math.exp(mean_nll + half_width),
            unpruned_perplexity=self.unpruned.perplexity,
            predicted_tokens=tokens,
            total_predicted_tokens=self.windows.predicted_tokens,
            exact=tokens == self.windows.predicted_tokens and half_width == 0.0,
            confidence=CONFIDENCE,
            seqlen=self.windows.seqlen,
            text=self.windows.text_name,
            text_sha256=self.windows.text_sha256,
            mask=mask.summary(),
        )


class Refinement:
    """The answers of one request, produced by a background thread; :meth:`next` waits for each.

    Dropping a refinement does not stop its thread: :meth:`cancel` or a newer request from the same
    client (:meth:`LivePerplexity.estimates`) does, between layers.
    """

    def __init__(self, answers: Iterator[LiveEstimate], cancel: Callable[[], None] = lambda: None) -> None:
        self.finished = False  # the last answer was taken, or the request was cancelled
        self.cancel = cancel  # stop computing this request's answers (nobody waits for them any more)
        self._answers: queue.Queue[LiveEstimate | BaseException | None] = queue.Queue()
        threading.Thread(target=self._run, args=(answers,), name="headroom-live-refine", daemon=True).start()

    def _run(self, answers: Iterator[LiveEstimate]) -> None:
        try:
            for answer in answers:
                self._answers.put(answer)
        except Exception as e:  # handed to the caller of next(), who reports it
            self._answers.put(e)
        self._answers.put(None)

    def next(self, timeout_s: float) -> LiveEstimate | None:
        """The next answer, or None if none came within ``timeout_s`` or the request is over (see :attr:`finished`)."""
        if self.finished:
            return None
        try:
            item = self._answers.get(timeout=timeout_s)
        except queue.Empty:
            return None
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        self.finished = item is None
        return item


_WARMER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="headroom-live-warm")


def warm(arch: Architecture, windows: Windows, progress: Progress | None = None) -> Future[LivePerplexity]:
    """Build a :class:`LivePerplexity` (one full capturing pass) in the background, e.g. as soon as a model loads.

    ``progress`` is called from the background thread.
    """
    return _WARMER.submit(LivePerplexity, arch, windows, progress)
