"""The commands that find or weigh masks: harp, compare, search, rescale, pareto.

They read a calibration text (``--calib``) to choose and most of them an evaluation text (``--eval``) to
report held-out perplexity; those that find a mask write it to ``--out`` when asked.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from analysis.baselines import AXES
from analysis.budget import budget
from analysis.budget_targets import parse_targets
from analysis.cli.command import Result, before_load, command, progress_bar, renders
from analysis.cli.options import float_list, int_list, name_list, read_mask, read_windows, text_arguments
from analysis.comparison import compare
from analysis.errors import HeadroomError
from analysis.evaluation import cached_perplexity
from analysis.harp import DEFAULT_GRID, cached_chosen_harp, cached_harp, top_layers
from analysis.loading import LoadedModel
from analysis.masks import Mask
from analysis.pareto import pareto
from analysis.rescale import cached_rescale
from analysis.search import PROXY_WINDOWS, SHORTLIST, cached_search
from analysis.search_moves import MOVE_KINDS, check_move_kinds

# --- what these commands share ----------------------------------------------------------------------------


def _calib_args(p: argparse.ArgumentParser) -> None:
    text_arguments(p, "--calib", "default-calib", max_tokens=2048)


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--eval", default="default-eval", help="held-out text: a file, default-eval or default-calib")
    p.add_argument("--eval-max-tokens", type=int, default=2048, help="evaluation tokens (default 2048)")


def _layer_choice(p: argparse.ArgumentParser, choose: bool = False) -> None:
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--layers", type=int, help="prune the top N layers")
    which.add_argument("--layer-set", type=int_list, help="prune these layers, e.g. 26,27")
    if choose:
        which.add_argument(
            "--choose-layers", type=int, help="choose N layers by greedy selection on calibration perplexity"
        )
    p.add_argument("--grid", type=float_list, default=DEFAULT_GRID, help="alpha candidates (default 0,0.1,...,1)")


def _layers(lm: LoadedModel, args: argparse.Namespace) -> list[int]:
    return list(top_layers(lm.shape.num_layers, args.layers)) if args.layers else args.layer_set


def _held_out(lm: LoadedModel, args: argparse.Namespace, mask: Mask) -> Result:
    evaluation = read_windows(lm, args, "eval")
    result = cached_perplexity(lm.arch, lm.fingerprint, evaluation, mask, progress=progress_bar("held-out eval"))
    return {"eval_perplexity": result.perplexity, "eval": evaluation.metadata()}


def _check_output(args: argparse.Namespace) -> None:
    """Refuse an ``--out`` file we could not write, before any long computation."""
    if args.out is None:
        return
    out = Path(args.out)
    if out.is_dir():
        raise HeadroomError(f"--out {args.out} is a directory; give a file name such as {out / 'mask.json'}")
    if not out.parent.is_dir():
        raise HeadroomError(f"--out {args.out}: folder {out.parent} does not exist; create it first")


def _save_mask(mask: Mask, args: argparse.Namespace) -> dict[str, str | None]:
    """Write ``mask`` to ``--out`` if given; the ``mask_file`` field of the result."""
    if args.out is not None:
        mask.save(Path(args.out))
    return {"mask_file": args.out}


# --- the commands -----------------------------------------------------------------------------------------


def _harp_arguments(p: argparse.ArgumentParser) -> None:
    _calib_args(p)
    _layer_choice(p, choose=True)
    p.add_argument("--out", default=None, help="write the resulting v1 mask JSON here")
    p.add_argument("--no-cache", action="store_true", help="search again even if the result is cached")


def _trace(steps: list[Result]) -> Iterator[str]:
    yield "  " + ", ".join(f"L{s['layer']} a={s['alpha']}: {s['perplexity']:.3f}" for s in steps)


@renders(trace=_trace)
@before_load(_check_output)
@command("HARP: drop-QK on the top layers with a greedy alpha search; writes the mask", _harp_arguments)
def cmd_harp(args: argparse.Namespace, lm: LoadedModel) -> Result:
    calib = read_windows(lm, args, "calib")
    if args.choose_layers:
        bar = progress_bar("layer selection + alpha search")
        result = cached_chosen_harp(lm, calib, args.choose_layers, None, args.grid, progress=bar, refresh=args.no_cache)
    else:
        bar = progress_bar("alpha search")
        result = cached_harp(lm, calib, _layers(lm, args), args.grid, progress=bar, refresh=args.no_cache)
    report = result.to_json()
    del report["mask"]
    return {
        **report,
        "calib": calib.metadata(),
        "budget": budget(result.mask, lm.shape, args.seqlen).to_json(),
        **_save_mask(result.mask, args),
    }


def _compare_arguments(p: argparse.ArgumentParser) -> None:
    _calib_args(p)
    _eval_args(p)
    _layer_choice(p)
    p.add_argument("--match", choices=AXES, default="params", help="the budget axis baselines are matched on")


def _comparison_table(rows: list[Result]) -> Iterator[str]:
    header = ("method", "eval ppl", "params removed", "KV B/token saved", "attn FLOPs/token saved")
    yield "  {:<28} {:>9} {:>16} {:>17} {:>23}".format(*header)
    for row in rows:
        b = row["budget"]
        params = f"{b['params_removed']:,} ({b['params_removed_pct']:.2f}%)"
        yield (
            f"  {row['method']:<28} {row['eval_perplexity']:>9.2f} {params:>16} "
            f"{b['kv_bytes_per_token_saved']:>17,} {b['attention_flops_per_token_saved']:>23,}"
        )


@renders(rows=_comparison_table)
@command("HARP against the baselines at a matched budget, on held-out text", _compare_arguments)
def cmd_compare(args: argparse.Namespace, lm: LoadedModel) -> Result:
    calib = read_windows(lm, args, "calib")
    evaluation = read_windows(lm, args, "eval")
    result = compare(lm, calib, evaluation, _layers(lm, args), args.match, args.grid, progress_bar("evaluations"))
    return {**result.to_json(), "calib": calib.metadata(), "eval": evaluation.metadata()}


def _search_arguments(p: argparse.ArgumentParser) -> None:
    _calib_args(p)
    _eval_args(p)
    p.add_argument(
        "--save", action="append", required=True, help="AXIS:AMOUNT, e.g. kv:12288; repeat for several axes at once"
    )
    p.add_argument("--shortlist", type=int, default=SHORTLIST, help="moves rescored per step on the whole calib")
    p.add_argument("--proxy-windows", type=int, default=PROXY_WINDOWS, help="windows of the first, cheap scoring")
    p.add_argument(
        "--compensate", action="store_true", help="pruned heads come with FLAP's bias compensation (mask v2)"
    )
    p.add_argument(
        "--moves",
        type=name_list,
        default=list(MOVE_KINDS),
        help=f"structural moves to combine, comma-separated (default all: {','.join(MOVE_KINDS)})",
    )
    p.add_argument("--out", default=None, help="write the mask found as JSON here")
    p.add_argument("--no-cache", action="store_true", help="search again even if the result is cached")


def _check_search(args: argparse.Namespace) -> None:
    _check_output(args)
    parse_targets(args.save)
    check_move_kinds(args.moves)


@before_load(_check_search)
@command("the mask of lowest calibration perplexity that saves at least a budget", _search_arguments)
def cmd_search(args: argparse.Namespace, lm: LoadedModel) -> Result:
    calib = read_windows(lm, args, "calib")
    targets = parse_targets(args.save)
    result = cached_search(
        lm,
        calib,
        targets,
        args.seqlen,
        args.shortlist,
        args.proxy_windows,
        None,
        progress_bar("search"),
        args.no_cache,
        args.compensate,
        args.moves,
    )
    return {
        **result.to_json(),
        **_held_out(lm, args, result.mask),
        "calib": calib.metadata(),
        **_save_mask(result.mask, args),
    }


def _rescale_arguments(p: argparse.ArgumentParser) -> None:
    _calib_args(p)
    _eval_args(p)
    p.add_argument("--mask", required=True, help="a mask JSON file")
    p.add_argument("--closed-form", action="store_true", help="only the norm-matching alphas, no search")
    p.add_argument("--out", default=None, help="write the rescaled mask JSON here")


@before_load(_check_output)
@command("per-layer alpha for every changed layer of a mask (closed form, then search)", _rescale_arguments)
def cmd_rescale(args: argparse.Namespace, lm: LoadedModel) -> Result:
    mask = read_mask(lm, args.mask)
    calib = read_windows(lm, args, "calib")
    result = cached_rescale(lm, mask, calib, search=not args.closed_form, progress=progress_bar("alpha search"))
    return {
        **result.to_json(),
        **_held_out(lm, args, result.mask),
        "budget": budget(result.mask, lm.shape, args.seqlen).to_json(),
        **_save_mask(result.mask, args),
    }


def _pareto_arguments(p: argparse.ArgumentParser) -> None:
    text_arguments(p, "--eval", "default-eval", max_tokens=2048)
    p.add_argument("--axis", choices=AXES, default="kv", help="the saving axis (default kv)")
    p.add_argument("--all", action="store_true", help="list every point as text, not only the front (JSON: always)")


def _pareto_lines(points: list[dict[str, Any]]) -> Iterator[str]:
    yield "  (* on the front)  held-out ppl       saving  method: mask"
    for p in points:
        mark = "*" if p["on_front"] else " "
        yield f"  {mark} {p['eval_perplexity']:12.3f} {p['saving']:>12,}  {p['method']}: {p['label']}"


@renders(points=_pareto_lines)
@command(
    "every cached mask of the model: held-out perplexity vs saving on an axis, and the Pareto front", _pareto_arguments
)
def cmd_pareto(args: argparse.Namespace, lm: LoadedModel) -> Result:
    result = pareto(lm, read_windows(lm, args, "eval"), args.axis, progress=progress_bar("held-out evals"))
    out = result.to_json()
    if not args.json:  # as text: the front (every point with --all), without the masks
        shown = range(len(result.points)) if args.all else result.front
        points = [{k: v for k, v in out["points"][i].items() if k != "mask"} for i in shown]
        out["points"] = [{**p, "on_front": i in result.front} for i, p in zip(shown, points, strict=True)]
        del out["front"]
    return out
