"""Live perplexity: incremental evaluator vs full recompute, side by side in one run.

For one head toggled at 1/4, 1/2, 3/4 depth and in the top layer of the default model, on the
default eval slice (2,048 tokens at seqlen 256), prints the median time of each and their ratio.
Every repetition prunes a different head of that layer, so no result is served from the
evaluator's memory of recent masks.
Also prints the model load time from the converted cache and the peak RSS of the process.

    .venv/bin/python -m bench.live_eval [--model default] [--repeats 5]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

from analysis.corpus import default_text, make_windows
from analysis.evaluation import IncrementalEvaluator, perplexity
from analysis.loading import load_model
from analysis.masks import Mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    load_model(args.model)  # converts on the very first run; the timed load below reads the cache
    start = time.perf_counter()
    lm = load_model(args.model)
    load_s = time.perf_counter() - start
    windows = make_windows(lm.tokenizer, default_text("default-eval"), 256, 2048)
    evaluator = IncrementalEvaluator(lm.arch, windows)
    base = Mask.unpruned(lm.shape, lm.name)
    layers = lm.shape.num_layers
    print(f"model {lm.name} ({layers} layers), {windows.predicted_tokens} predicted tokens, seqlen {windows.seqlen}")
    print(f"load from cache: {load_s:.2f} s")
    print(f"{'toggled layer':>14} {'incremental s':>14} {'full s':>8} {'ratio':>6}")
    for layer in (layers // 4, layers // 2, 3 * layers // 4, layers - 1):
        fast, full = [], []
        for r in range(args.repeats):
            mask = base.with_head(layer, r % lm.shape.num_heads, False)  # a new mask each time, changed at `layer`
            t = time.perf_counter()
            a = evaluator.perplexity(mask).perplexity
            fast.append(time.perf_counter() - t)
            t = time.perf_counter()
            b = perplexity(lm.arch, windows, mask).perplexity
            full.append(time.perf_counter() - t)
            assert abs(a - b) / b < 1e-5, (a, b)
        f, g = statistics.median(fast), statistics.median(full)
        print(f"{layer:>14} {f:>14.3f} {g:>8.3f} {g / f:>5.1f}x")
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GB")


if __name__ == "__main__":
    main()
