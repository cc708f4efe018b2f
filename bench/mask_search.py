"""The budgeted search: its time, and the ratio against the same search without the incremental evaluator.

Runs one search (default: ``--save kv:12288`` on the default model, 2,048 tokens of default-calib at
seqlen 256, the CLI's defaults) and prints its time and how many masks it evaluated on the proxy
windows and on the whole calibration set. The search always runs (``refresh``) and its result is
stored in the disk cache, so ``python -m analysis search`` with the same options then answers at
once, with its held-out perplexity. A search without the incremental evaluator would run a full
forward per evaluated mask; that is too slow to run whole, so it is measured on a sample of moves
(spread over the layers, each a candidate from the unpruned model, as the proxy phase makes them):
the median full-forward time on the proxy windows and on the whole calibration set, times the
search's counts, is the estimate. The sample also checks that both ways give the same NLL. Every
figure is printed with the load average beside it.

    .venv/bin/python -m bench.mask_search [--save kv:12288] [--compensate] [--moves KINDS] [--sample 6]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import replace

from analysis.budget_targets import parse_targets
from analysis.corpus import default_text, make_windows
from analysis.errors import HeadroomError
from analysis.evaluation import IncrementalEvaluator, perplexity
from analysis.loading import load_model
from analysis.masks import Mask
from analysis.search import PROXY_WINDOWS, SHORTLIST, cached_search
from analysis.search_moves import MOVE_KINDS, all_moves, apply_move, check_move_kinds


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--save", action="append", default=None, help="AXIS:AMOUNT (default kv:12288)")
    parser.add_argument("--max-tokens", type=int, default=2048)
    parser.add_argument("--sample", type=int, default=6, help="moves timed with a full forward each")
    parser.add_argument("--compensate", action="store_true", help="FLAP's bias compensation as in `search`")
    parser.add_argument("--moves", default=",".join(MOVE_KINDS), help="structural moves, comma-separated")
    args = parser.parse_args()
    kinds = args.moves.split(",")
    try:
        check_move_kinds(kinds)
    except HeadroomError as e:
        parser.error(str(e))  # the usage line and the message, no traceback

    lm = load_model(args.model)
    calib = make_windows(lm.tokenizer, default_text("default-calib"), 256, args.max_tokens, lm.max_positions)
    proxy = replace(calib, input_ids=calib.input_ids[:PROXY_WINDOWS])
    targets = parse_targets(args.save or ["kv:12288"])
    print(f"{lm.name}: search {targets}, {calib.num_windows} calibration windows, proxy {PROXY_WINDOWS}  [{load()}]")

    t = time.perf_counter()
    result = cached_search(
        lm, calib, targets, 256, SHORTLIST, PROXY_WINDOWS, refresh=True, compensate=args.compensate, kinds=kinds
    )
    search_s = time.perf_counter() - t
    print(
        f"search: {search_s:.1f} s, {result.proxy_evaluations} proxy + {result.full_evaluations} full evaluations, "
        f"calib perplexity {result.calib_perplexity:.3f}  [{load()}]"
    )

    moves = all_moves(lm.shape, result.settings["moves"])  # the kinds the search itself used
    sample = moves[:: max(1, len(moves) // args.sample)][: args.sample]
    unpruned = Mask.unpruned(lm.shape, lm.name)
    naive = {"proxy": [], "full": []}
    incremental = {"proxy": [], "full": []}
    for name, windows in (("proxy", proxy), ("full", calib)):
        evaluator = IncrementalEvaluator(lm.arch, windows)
        for move in sample:
            mask = apply_move(unpruned, move, lm.shape)
            t = time.perf_counter()
            fast = evaluator.perplexity(mask).mean_nll
            incremental[name].append(time.perf_counter() - t)
            evaluator.perplexity(unpruned)  # back, so that the next move is again one layer's change
            t = time.perf_counter()
            slow = perplexity(lm.arch, windows, mask).mean_nll
            naive[name].append(time.perf_counter() - t)
            assert abs(fast - slow) <= 1e-6 * abs(slow), (move, fast, slow)
        print(
            f"{name} windows, {len(sample)} moves: median {statistics.median(incremental[name]):.3f} s incremental, "
            f"{statistics.median(naive[name]):.3f} s full forward; same NLL  [{load()}]"
        )
    estimate = result.proxy_evaluations * statistics.median(naive["proxy"])
    estimate += result.full_evaluations * statistics.median(naive["full"])
    print(f"search without the incremental evaluator, estimated: {estimate:.1f} s  [{load()}]")
    print(f"ratio: {estimate / search_s:.2f}x")


if __name__ == "__main__":
    main()
