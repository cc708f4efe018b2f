"""Time per task of the offline task suite on the default model under one mask, then the suite again from the cache.

The first pass computes into a fresh, temporary result cache (the converted model itself still comes
from ``$HEADROOM_CACHE``; ``--keep DIR`` computes into a new folder and keeps it, e.g. to copy its
``results/task`` entries into the main cache), so it measures the work; the second pass reads that cache. Targets: the
whole suite in 10 min or less on the 2-core machine, the second pass in 5 s or less. The load
average is printed beside every figure: quote figures measured on an idle machine only.

    .venv/bin/python -m bench.tasks [--harp 8 | --mask FILE | --unpruned] [--keep DIR]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from analysis.cache import DiskCache
from analysis.loading import load_model
from analysis.task_suite import BUILT_IN, cached_task, check_task_names, run_suite
from bench.common import HARP_ALPHAS, file_mask, harp_mask, load_average


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--harp", type=int, choices=sorted(HARP_ALPHAS), default=8, help="HARP mask N (default 8)")
    which.add_argument("--mask", default=None, help="a mask JSON file instead")
    which.add_argument("--unpruned", action="store_true", help="no mask")
    parser.add_argument("--tasks", default=",".join(BUILT_IN), help="comma-separated task names")
    parser.add_argument(
        "--keep", type=Path, default=None, metavar="DIR", help="compute into DIR (must be empty or new) and keep it"
    )
    args = parser.parse_args()
    names = check_task_names([n.strip() for n in args.tasks.split(",") if n.strip()])

    lm = load_model("default")
    mask = None if args.unpruned else file_mask(lm, args.mask) if args.mask else harp_mask(lm, args.harp)
    described = mask.describe() if mask else "none (unpruned)"
    print(f"{lm.name}, {lm.dtype}, {torch.get_num_threads()} torch threads; mask: {described}")
    if args.keep and args.keep.exists() and any(args.keep.iterdir()):
        parser.error(f"--keep {args.keep}: the folder is not empty; name a new one so the first pass computes")
    with tempfile.TemporaryDirectory() as tmp:
        cache = DiskCache(args.keep or Path(tmp))
        total = 0.0
        for name in names:
            start = time.perf_counter()
            result = cached_task(lm, name, mask, cache)
            seconds = time.perf_counter() - start
            total += seconds
            figures = ", ".join(f"{k} {v:.4g}" for k, v in result.headline().items())
            print(f"{name:14} {seconds:8.1f} s   {load_average()}   ({figures})")
        print(f"{'whole suite':14} {total:8.1f} s   {load_average()}")
        start = time.perf_counter()
        run_suite(lm, names, mask, cache)
        print(f"{'again, cached':14} {time.perf_counter() - start:8.2f} s   {load_average()}")


if __name__ == "__main__":
    main()
