"""Head importance: the time of every metric, and the ablation sweep incremental vs naive, in one run.

On the default model and 1,024 calibration tokens (default-calib, seqlen 256):
- every head metric computed directly (no cache), then through the disk cache twice: the second
  request must be a cache hit (target under 1 s);
- the ablation sweep over all heads with the incremental evaluator (target under 12 minutes), and
  naive leave-one-out (a full forward pass per pruned head) on a sample of one head per layer
  (``--naive all`` runs every head): the per-head time ratio (target at least 1.5x) and the largest
  score difference between the two (target 1e-4 in mean NLL);
- integrated gradients' completeness check.

``--ig-steps 4,8,16``: integrated gradients alone at each number of steps, with its time and its
error against the most steps (largest score difference, Spearman rank correlation, overlap of the
cheapest num_heads heads, completeness error), then exits: how few steps are enough.

    .venv/bin/python -m bench.importance [--model default] [--max-tokens 1024] [--naive sample|all]
    .venv/bin/python -m bench.importance --ig-steps 4,8,16 [--max-tokens 1024]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

from analysis.cache import DiskCache
from analysis.corpus import Windows, default_text, make_windows
from analysis.evaluation import perplexity
from analysis.importance import HEAD_METRICS, cached_head_result, lowest_heads
from analysis.loading import LoadedModel, load_model
from analysis.loss_metrics import ablation, integrated_gradients
from analysis.masks import Mask


def ig_steps(lm: LoadedModel, windows: Windows, steps: list[int]) -> None:
    """Integrated gradients at each step count, against the largest one."""
    from scipy.stats import spearmanr

    results = {}
    for n in sorted(steps):
        t = time.perf_counter()
        results[n] = integrated_gradients(lm.arch, windows, steps=n)
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
        print(f"  {n:>3} steps: {time.perf_counter() - t:7.1f} s (load average {load})", flush=True)
    best = results[max(steps)]
    k = lm.shape.num_heads
    cheapest = set(lowest_heads(best.scores.tolist(), k))
    print(f"\n{'steps':>6} {'max |diff|':>11} {'spearman':>9} {'cheapest ' + str(k):>11} {'completeness':>13}")
    for n, r in results.items():
        diff = (r.scores - best.scores).abs().max().item()
        rho = spearmanr(r.scores.flatten().numpy(), best.scores.flatten().numpy()).statistic
        overlap = len(cheapest & set(lowest_heads(r.scores.tolist(), k)))
        print(f"{n:>6} {diff:>11.2e} {rho:>9.4f} {overlap:>8}/{k:<2} {r.completeness_error:>13.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--max-tokens", type=int, default=1024)
    parser.add_argument("--naive", choices=["sample", "all"], default="sample")
    parser.add_argument("--ig-steps", default="", help="e.g. 4,8,16: integrated gradients' error by step count")
    parser.add_argument("--metrics", default=",".join(m for m in HEAD_METRICS if m != "ablation"))
    args = parser.parse_args()

    lm = load_model(args.model)
    windows = make_windows(lm.tokenizer, default_text("default-calib"), 256, args.max_tokens)
    shape = lm.shape
    heads = shape.num_layers * shape.num_heads
    print(f"model {lm.name}: {shape.num_layers} layers x {shape.num_heads} heads, {windows.predicted_tokens} tokens")
    if args.ig_steps:
        ig_steps(lm, windows, [int(n) for n in args.ig_steps.split(",")])
        return

    print(f"\n{'metric':>22} {'direct s':>9} {'cached: 1st s':>14} {'2nd s':>7}")
    with tempfile.TemporaryDirectory() as tmp:
        cache = DiskCache(Path(tmp))
        for metric in args.metrics.split(","):
            t = time.perf_counter()
            HEAD_METRICS[metric](lm.arch, windows, None, None)
            direct = time.perf_counter() - t
            t = time.perf_counter()
            result = cached_head_result(lm, windows, metric, cache=cache)
            first = time.perf_counter() - t
            t = time.perf_counter()
            cached_head_result(lm, windows, metric, cache=cache)
            second = time.perf_counter() - t
            print(f"{metric:>22} {direct:>9.1f} {first:>14.1f} {second:>7.3f}")
            if metric == "integrated_gradients":
                d = result.details
                print(
                    f"{'':>22} completeness: sum of attributions {d['attribution_sum']:.5f} vs "
                    f"L(no heads) - L(all heads) {d['loss_no_heads'] - d['loss_all_heads']:.5f} "
                    f"(error {d['completeness_error']:.2e}, {d['steps']} steps)"
                )

    t = time.perf_counter()
    scores = ablation(lm.arch, windows)
    incremental = time.perf_counter() - t
    base = Mask.unpruned(shape, lm.name)
    reference = perplexity(lm.arch, windows).mean_nll
    sample = [(layer, head) for layer in range(shape.num_layers) for head in range(shape.num_heads)]
    if args.naive == "sample":
        sample = [(layer, layer % shape.num_heads) for layer in range(shape.num_layers)]
    times, diffs = [], []
    for layer, head in sample:
        t = time.perf_counter()
        naive = perplexity(lm.arch, windows, base.with_head(layer, head, False)).mean_nll - reference
        times.append(time.perf_counter() - t)
        diffs.append(abs(naive - scores[layer, head].item()))
    naive_sweep = statistics.mean(times) * heads
    print(f"\nablation sweep, {heads} heads on {windows.predicted_tokens} tokens")
    print(f"  incremental: {incremental:.1f} s ({incremental / 60:.1f} min, {incremental / heads:.2f} s per head)")
    how = "measured" if args.naive == "all" else f"{len(sample)} heads measured, x {heads / len(sample):.0f}"
    print(f"  naive:       {naive_sweep:.1f} s ({naive_sweep / 60:.1f} min; {how})")
    print(f"  ratio:       {naive_sweep / incremental:.2f}x")
    print(f"  largest |incremental - naive| score: {max(diffs):.2e} nats ({len(diffs)} heads)")
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GB")


if __name__ == "__main__":
    main()
