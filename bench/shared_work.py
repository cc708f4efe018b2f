"""Work the pages share, run once: the comparison's baselines with and without the Importance page's gradient.

The matched baselines rank heads by every metric of ``analysis.baselines.BASELINE_METRICS``; the
costliest, the head-gate gradient (a backward pass per calibration window), is also what the
Importance page scores and caches. This measures, in fresh disk caches, on the default model:

1. the Importance page scoring heads by gradient (``cached_head_result``, cold);
2. the comparison's baselines after it (``cached_baselines``: the gradient read from that entry);
3. the baselines in a cache the Importance page never filled (the gradient scored again);

so that 3 - 2 is the time the sharing saves for a user who visits both pages, and checks that both
ways build the same masks. HARP runs on the top ``--n`` layers first (it is the reference mask).
Every figure is printed with the load average beside it: run it on an idle machine.

    .venv/bin/python -m bench.shared_work [--max-tokens 2048] [--n 4]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from analysis.cache import DiskCache
from analysis.comparison import cached_baselines
from analysis.corpus import default_text, make_windows
from analysis.harp import DEFAULT_GRID, cached_harp, top_layers
from analysis.importance import cached_head_result
from analysis.loading import load_model


def _load() -> str:
    return "load average " + ", ".join(f"{v:.1f}" for v in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--max-tokens", type=int, default=2048)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--axis", default="params")
    args = parser.parse_args()

    lm = load_model(args.model)
    calib = make_windows(lm.tokenizer, default_text("default-calib"), 256, args.max_tokens, lm.max_positions)
    with tempfile.TemporaryDirectory() as tmp:
        shared, alone = DiskCache(Path(tmp) / "shared"), DiskCache(Path(tmp) / "alone")
        reference = cached_harp(lm, calib, top_layers(lm.shape.num_layers, args.n), DEFAULT_GRID, shared).mask
        print(f"{lm.name}, {calib.num_windows} calibration windows, reference HARP N = {args.n}, axis {args.axis}")

        start = time.perf_counter()
        cached_head_result(lm, calib, "gradient", None, shared)
        scored = time.perf_counter() - start
        print(f"1. Importance page, gradient scored:            {scored:7.1f} s   ({_load()})")

        start = time.perf_counter()
        after = cached_baselines(lm, calib, reference, args.axis, 256, shared)
        reused = time.perf_counter() - start
        print(f"2. baselines, gradient read from its entry:     {reused:7.1f} s   ({_load()})")

        start = time.perf_counter()
        fresh = cached_baselines(lm, calib, reference, args.axis, 256, alone)
        again = time.perf_counter() - start
        print(f"3. baselines, gradient scored again:            {again:7.1f} s   ({_load()})")

        same = {k: m.heads for k, m in after.items()} == {k: m.heads for k, m in fresh.items()}
        print(f"saved by sharing: {again - reused:.1f} s of {scored + again:.1f} s for both pages; same masks: {same}")


if __name__ == "__main__":
    main()
