"""Live perplexity: incremental evaluator vs full recompute, the progressive answers, and the interval's coverage.

Default: for one head toggled at 1/4, 1/2, 3/4 depth and in the top layer of the default model, on
the default eval slice (2,048 tokens at seqlen 256), prints the median time of the incremental
evaluator and of a full recompute and their ratio, then the median time of the live evaluator's
first answer (an estimate after one window) and of its exact answer. Every repetition prunes a
different head of that layer, so no result is served from the evaluators' memory of recent masks.
Also prints the model load time from the converted cache, the live evaluator's build time (the
capturing pass the app runs in the background when it loads the model), the peak RSS and the load
average.

``--coverage N``: N random single-head toggles (a random walk from the unpruned model, back to it
every 25 toggles) through the live evaluator; prints how often the 95 % interval of the answer
after 1, 2 and 4 windows holds the exact value, and the interval's median half-width.

    .venv/bin/python -m bench.live_eval [--model default] [--repeats 5] [--tokens 2048]
    .venv/bin/python -m bench.live_eval --coverage 300
"""

from __future__ import annotations

import argparse
import math
import os
import random
import resource
import statistics
import time

from analysis.corpus import Windows, default_text, make_windows
from analysis.evaluation import IncrementalEvaluator, perplexity
from analysis.live import LivePerplexity
from analysis.loading import LoadedModel, load_model
from analysis.masks import Mask

STAGES = (1, 2, 4)  # windows after which coverage is counted


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def speed(lm: LoadedModel, windows: Windows, repeats: int) -> None:
    evaluator = IncrementalEvaluator(lm.arch, windows)
    t = time.perf_counter()
    live = LivePerplexity(lm.arch, windows)
    print(f"live evaluator build (the app warms it at model load): {time.perf_counter() - t:.2f} s ({load()})")
    base = Mask.unpruned(lm.shape, lm.name)
    layers = lm.shape.num_layers
    columns = ("incremental s", "full s", "ratio", "live first s", "live exact s")
    print(f"{'toggled layer':>14} " + " ".join(f"{c:>{max(6, len(c))}}" for c in columns))
    for layer in (layers // 4, layers // 2, 3 * layers // 4, layers - 1):
        fast, full, first, exact = [], [], [], []
        for r in range(repeats):
            mask = base.with_head(layer, r % lm.shape.num_heads, False)  # a new mask each time, changed at `layer`
            t = time.perf_counter()
            a = evaluator.perplexity(mask).perplexity
            fast.append(time.perf_counter() - t)
            t = time.perf_counter()
            b = perplexity(lm.arch, windows, mask).perplexity
            full.append(time.perf_counter() - t)
            assert abs(a - b) / b < 1e-5, (a, b)
            t = time.perf_counter()
            answers = live.estimates(mask.with_head(layer, (r + 1) % lm.shape.num_heads, False))
            next(answers)
            first.append(time.perf_counter() - t)
            *_, settled = answers
            exact.append(time.perf_counter() - t)
            assert settled.exact
        f, g = statistics.median(fast), statistics.median(full)
        print(
            f"{layer:>14} {f:>13.3f} {g:>6.3f} {g / f:>5.1f}x {statistics.median(first):>12.3f}"
            f" {statistics.median(exact):>12.3f}   ({load()})"
        )


def coverage(lm: LoadedModel, windows: Windows, toggles: int, seed: int) -> None:
    live = LivePerplexity(lm.arch, windows)
    rng = random.Random(seed)
    base = Mask.unpruned(lm.shape, lm.name)
    mask, hits, widths, trials = base, {k: 0 for k in STAGES}, {k: [] for k in STAGES}, 0
    start = time.perf_counter()
    for i in range(toggles):
        if i % 25 == 0:
            mask = base
        layer, head = rng.randrange(lm.shape.num_layers), rng.randrange(lm.shape.num_heads)
        mask = mask.with_head(layer, head, not mask.heads[layer][head])
        answers = list(live.estimates(mask))
        if len(answers) == 1:  # seen before: answered exactly at once
            continue
        trials += 1
        settled = answers[-1]
        for k in STAGES:
            a = answers[min(k, len(answers)) - 1]
            hits[k] += a.perplexity_low <= settled.perplexity <= a.perplexity_high
            widths[k].append((a.perplexity_high - a.perplexity_low) / 2)
        if (i + 1) % 25 == 0:
            print(f"  {i + 1}/{toggles} toggles, {time.perf_counter() - start:.0f} s ({load()})", flush=True)
    for k in STAGES:
        share = hits[k] / trials
        se = math.sqrt(share * (1 - share) / trials)
        print(
            f"after {k} window(s) ({k * windows.predicted_tokens // windows.num_windows} tokens): "
            f"{hits[k]}/{trials} = {100 * share:.1f} % (± {196 * se:.1f}) of 95 % intervals hold the exact value; "
            f"median half-width {statistics.median(widths[k]):.3f} perplexity"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=2048, help="live evaluation tokens")
    parser.add_argument("--coverage", type=int, default=0, metavar="N", help="measure the interval on N toggles")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    load_model(args.model)  # converts on the very first run; the timed load below reads the cache
    start = time.perf_counter()
    lm = load_model(args.model)
    load_s = time.perf_counter() - start
    windows = make_windows(lm.tokenizer, default_text("default-eval"), 256, args.tokens)
    print(f"model {lm.name} ({lm.shape.num_layers} layers), {windows.predicted_tokens} predicted tokens, seqlen 256")
    print(f"load from cache: {load_s:.2f} s ({load()})")
    if args.coverage:
        coverage(lm, windows, args.coverage, args.seed)
    else:
        speed(lm, windows, args.repeats)
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GB ({load()})")


if __name__ == "__main__":
    main()
