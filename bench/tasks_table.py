"""The README's task table: every mask of the HARP comparison (unpruned, HARP, the matched baselines) on every task.

For each N of ``--layers`` the comparison of ``python -m analysis compare --layers N --match AXIS``
(the same calibration and evaluation windows: 2,048 tokens of ``default-calib`` and of
``default-eval``, seqlen 256) gives the masks; each is run through the whole task suite, and one
markdown row per mask is printed (unpruned once). Everything is cached, so a rerun prints at once;
the first run costs the suite's time per mask (see ``bench.tasks``): run it on an idle machine,
under ``nice``, in the background.

    nice -n 10 .venv/bin/python -m bench.tasks_table [--layers 4,8] [--match params] [--methods unpruned,harp]
        [--mask "search KV 12,288=search.mask.json" ...]
"""

from __future__ import annotations

import argparse
import sys

from analysis.baselines import AXES
from analysis.comparison import compare
from analysis.corpus import load_text, make_windows
from analysis.evaluation import cached_perplexity
from analysis.harp import top_layers
from analysis.loading import load_model
from analysis.masks import Mask
from analysis.task_suite import BUILT_IN, run_suite
from bench.common import file_mask, load_average


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default="4,8", help="HARP's N, comma-separated (default 4,8)")
    parser.add_argument("--match", choices=AXES, default="params", help="the budget axis of the baselines")
    parser.add_argument("--methods", default=None, help="only these rows of the comparison, comma-separated")
    parser.add_argument(
        "--mask", action="append", default=[], metavar="LABEL=FILE", help="one more row: a mask file (repeatable)"
    )
    args = parser.parse_args()

    lm = load_model("default")
    windows = {
        name: make_windows(lm.tokenizer, load_text(name), 256, 2048, lm.max_positions)
        for name in ("default-calib", "default-eval")
    }
    wanted = args.methods.split(",") if args.methods else None
    header: list[str] = []

    def print_row(label: str, mask: Mask, eval_perplexity: float) -> None:
        results = run_suite(lm, BUILT_IN, mask)
        figures = {k: v for result in results.values() for k, v in result.headline().items()}
        if not header:
            header.extend(figures)
            print("| mask | eval ppl (2k, seqlen 256) | " + " | ".join(header) + " |")
            print("|---" * (len(header) + 2) + "|")
        cells = " | ".join(f"{figures[k]:.3f}" if k in figures else "-" for k in header)
        print(f"| {label} | {eval_perplexity:.2f} | {cells} |", flush=True)
        print(f"  ({load_average()})", file=sys.stderr)

    seen_unpruned = False
    for n in (int(x) for x in args.layers.split(",") if x.strip()):
        layers = top_layers(lm.shape.num_layers, n)
        comparison = compare(lm, windows["default-calib"], windows["default-eval"], layers, args.match)
        for row in comparison.rows:
            if (wanted and row.method not in wanted) or (row.method == "unpruned" and seen_unpruned):
                continue
            seen_unpruned |= row.method == "unpruned"
            print_row(
                row.method if row.method == "unpruned" else f"N = {n}: {row.method}", row.mask, row.eval_perplexity
            )
    for spec in args.mask:
        label, _, path = spec.rpartition("=")
        mask = file_mask(lm, path)
        print_row(
            label or path, mask, cached_perplexity(lm.arch, lm.fingerprint, windows["default-eval"], mask).perplexity
        )


if __name__ == "__main__":
    main()
