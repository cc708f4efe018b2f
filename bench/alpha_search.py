"""HARP's alpha search: cached (incremental evaluator) vs naive (full forward per candidate).

Both run the same greedy search on the same calibration windows (default: 2,048 tokens of
default-calib at seqlen 256, the top 8 layers, grid 0, 0.1, ..., 1), side by side in one run; the
script checks that they choose the same alphas and prints their times and the ratio. It also times a
whole ``harp()`` call (capture + norm-matching alpha + search), which is what the CLI and app run.

    .venv/bin/python -m bench.alpha_search [--layers 8] [--max-tokens 2048]
"""

from __future__ import annotations

import argparse
import time

from analysis.corpus import default_text, make_windows
from analysis.evaluation import IncrementalEvaluator, perplexity
from analysis.harp import DEFAULT_GRID, greedy_alpha_search, harp, top_layers
from analysis.loading import load_model
from analysis.masks import Mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=2048)
    args = parser.parse_args()

    lm = load_model(args.model)
    calib = make_windows(lm.tokenizer, default_text("default-calib"), 256, args.max_tokens)
    layers = top_layers(lm.shape.num_layers, args.layers)
    start = Mask.unpruned(lm.shape, lm.name).with_drop_qk(layers)
    print(f"{lm.name}: top {args.layers} layers, {len(DEFAULT_GRID)} candidates each, {calib.predicted_tokens} tokens")

    t = time.perf_counter()
    evaluator = IncrementalEvaluator(lm.arch, calib)
    cached_mask, cached_trace = greedy_alpha_search(
        start, layers, DEFAULT_GRID, lambda m: evaluator.perplexity(m).perplexity
    )
    cached_s = time.perf_counter() - t

    t = time.perf_counter()
    naive_mask, naive_trace = greedy_alpha_search(
        start, layers, DEFAULT_GRID, lambda m: perplexity(lm.arch, calib, m).perplexity
    )
    naive_s = time.perf_counter() - t

    assert cached_mask.alpha == naive_mask.alpha, (cached_mask.alpha, naive_mask.alpha)
    worst = max(abs(a.perplexity - b.perplexity) / b.perplexity for a, b in zip(cached_trace, naive_trace, strict=True))
    alphas = {i: cached_mask.alpha[i] for i in layers}
    print(f"chosen alphas (low -> high layer): {alphas}; same in both; max relative perplexity difference {worst:.1e}")
    print(f"search, cached: {cached_s:7.1f} s")
    print(f"search, naive:  {naive_s:7.1f} s")
    print(f"ratio:          {naive_s / cached_s:7.2f}x")

    t = time.perf_counter()
    result = harp(lm.arch, lm.name, calib, layers)
    print(
        f"whole harp() incl. capture and norm-matching alpha: {time.perf_counter() - t:.1f} s; "
        f"calib perplexity {result.unpruned_perplexity:.2f} unpruned, {result.alpha1_perplexity:.2f} alpha=1, "
        f"{result.calib_perplexity:.2f} searched, {result.norm_matching_perplexity:.2f} norm-matching"
    )


if __name__ == "__main__":
    main()
