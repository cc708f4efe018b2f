"""Headless command line: ``python -m analysis COMMAND ...``.

Each command is written once, as a function decorated with :func:`command` that names it, its
arguments and how its result reads as text. The function gets the parsed arguments and the loaded
model and returns its result as a JSON-ready dict; :func:`run` adds what every command reports (the
model card and the seconds the work took) and prints the result, as one JSON object (``--json``) or
as text.

Errors a user can fix are printed to stderr as one line, with exit status 2 and no traceback
(``--debug`` shows it).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from analysis.baselines import AXES
from analysis.budget_targets import parse_targets
from analysis.cache import DiskCache
from analysis.cache_pack import CONFLICT_CHOICES, pack, unpack
from analysis.comparison import compare
from analysis.corpus import Windows, load_text, make_windows
from analysis.drift import cached_mask_drift
from analysis.errors import HeadroomError
from analysis.evaluation import Progress, cached_perplexity
from analysis.export import KINDS, export_model
from analysis.export_folder import check_destination
from analysis.harp import DEFAULT_GRID, cached_chosen_harp, cached_harp, top_layers
from analysis.head_map import DEFAULT_CLUSTERS, DEFAULT_METRICS, cached_head_map
from analysis.importance import HEAD_METRICS, cached_head_result
from analysis.lm_eval_tasks import write_lm_eval
from analysis.loading import DEFAULT_MODEL, DTYPE_CHOICES, DTYPES, LoadedModel, load_model, model_fingerprint
from analysis.masks import Mask, budget, load_mask, mask_warnings
from analysis.model_card import export_command
from analysis.pareto import pareto
from analysis.rescale import cached_rescale
from analysis.search import PROXY_WINDOWS, SHORTLIST, cached_search
from analysis.search_moves import MOVE_KINDS, check_move_kinds
from analysis.task_files import cached_user_task, load_task_file
from analysis.task_suite import BUILT_IN, check_task_names, run_suite

Result = dict[str, Any]
Work = Callable[[argparse.Namespace, LoadedModel], Result]
"""A command's work: the parsed arguments and the loaded model in, the JSON-ready result out."""
Lines = Callable[[Any], Iterator[str]]
"""Renders one value of a result as text lines (without its heading)."""


@dataclass(frozen=True)
class Command:
    """One CLI command, as :func:`command` registers it."""

    name: str
    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    work: Work
    text: Mapping[str, Lines] = field(default_factory=dict)
    """How the result's keys that are not plain values or flat dicts read as text (the rest: ``key: value``)."""
    before_load: Callable[[argparse.Namespace], None] | None = None
    """Checks of the arguments alone, run before the model loads (e.g. an output path we could not write)."""
    loads_model: bool = True
    """False for commands on the cache alone (``cache pack``, ``cache unpack``): ``work`` gets ``lm=None``."""


COMMANDS: dict[str, Command] = {}


def command(
    name: str,
    help: str,
    arguments: Callable[[argparse.ArgumentParser], None],
    text: Mapping[str, Lines] | None = None,
    before_load: Callable[[argparse.Namespace], None] | None = None,
) -> Callable[[Work], Work]:
    """Register the decorated ``work(args, lm) -> dict`` as the command ``name``.

    ``arguments`` adds the command's own options (the model options, ``--json`` and ``--debug`` are
    added to every command); ``text`` renders the result's non-flat keys as text.
    """

    def register(work: Work) -> Work:
        COMMANDS[name] = Command(name, help, arguments, work, dict(text or {}), before_load)
        return work

    return register


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="'default' (embedded SmolLM2-135M-Instruct), a HF directory, a .gguf file or a hub id",
    )
    p.add_argument(
        "--device", default="cpu", choices=["cpu", "cuda", "auto"], help="where the model runs (default: cpu)"
    )
    p.add_argument(
        "--dtype",
        default="auto",
        choices=DTYPE_CHOICES,
        help="dtype of the weights (default auto: bfloat16 on a CUDA GPU, float32 on the CPU); "
        "logits are upcast to float32 and sums kept in float64 whatever it is",
    )
    p.add_argument(
        "--device-map",
        default=None,
        help="'auto' spreads a model that does not fit one device over GPUs and CPU (accelerate)",
    )
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow a model directory's own Python code to run (off by default)",
    )
    _output_args(p)


def _output_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--debug", action="store_true", help="show the traceback of errors")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m analysis",
        description="Headroom: analyse and prune the attention heads of causal language models.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for cmd in COMMANDS.values():
        p = sub.add_parser(cmd.name, help=cmd.help)
        _common(p)
        cmd.arguments(p)
        p.set_defaults(command=cmd)
    _cache_commands(sub)
    return parser


def execute(cmd: Command, args: argparse.Namespace) -> Result:
    """Run ``cmd``: its checks, the model, its work; the result with the model card and the seconds of work."""
    if cmd.before_load is not None:
        cmd.before_load(args)
    if not cmd.loads_model:
        return cmd.work(args, None)
    lm = _load(args)
    start = time.perf_counter()
    result = cmd.work(args, lm)
    return {**result, "model": lm.card(), "seconds": round(time.perf_counter() - start, 3)}


def main(argv: list[str] | None = None) -> int:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # stderr is for our progress and the one error line
    args = build_parser().parse_args(argv)
    try:
        out = execute(args.command, args)
    except HeadroomError as e:
        if args.debug:
            raise
        print(f"error: {_options(e, args)}{e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; nothing partial was written", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        for line in as_text(out, args.command.text):
            print(line)
    return 0


OPTION_OF = {"targets": "save"}
"""The option of a backend setting whose name is not the option's (the rest: ``max_tokens`` is --max-tokens)."""


def _options(e: HeadroomError, args: argparse.Namespace) -> str:
    """argparse's wording, ``argument --seqlen: ``, for the settings of ``e`` that are options of this command."""
    names = [OPTION_OF.get(s, s) for s in e.settings]
    flags = ["--" + name.replace("_", "-") for name in names if name in vars(args)]
    return f"argument{'s' * (len(flags) > 1)} {', '.join(flags)}: " if flags else ""


def as_text(out: Result, special: Mapping[str, Lines]) -> Iterator[str]:
    """``key: value`` per plain value, a block per dict, and the command's own rendering of ``special`` keys."""
    for key, value in out.items():
        if key in special:
            yield f"{key}:"
            yield from special[key](value)
        elif isinstance(value, dict):
            yield f"{key}:"
            yield from (f"  {k}: {v}" for k, v in value.items())
        else:
            yield f"{key}: {value}"


# --- arguments shared by several commands ---------------------------------------------------------------


def _text_args(
    p: argparse.ArgumentParser, flag: str = "--text", default: str = "default-eval", max_tokens: int | None = None
) -> None:
    p.add_argument(
        flag, default=default, help="a UTF-8 text file, default-eval or default-calib (the fixed Lee corpus split)"
    )
    p.add_argument("--encoding", default="utf-8", help="encoding of a text file (default utf-8)")
    p.add_argument("--seqlen", type=int, default=256, help="window length in tokens (default 256)")
    p.add_argument(
        "--max-tokens",
        type=int,
        default=max_tokens,
        help=f"keep the first N // seqlen windows (default: {max_tokens or 'the whole text'})",
    )


def _calib_args(p: argparse.ArgumentParser) -> None:
    _text_args(p, "--calib", "default-calib", max_tokens=2048)


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--eval", default="default-eval", help="held-out text: a file, default-eval or default-calib")
    p.add_argument("--eval-max-tokens", type=int, default=2048, help="evaluation tokens (default 2048)")


def _layer_choice(p: argparse.ArgumentParser, choose: bool = False) -> None:
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--layers", type=int, help="prune the top N layers")
    which.add_argument("--layer-set", type=_int_list, help="prune these layers, e.g. 26,27")
    if choose:
        which.add_argument(
            "--choose-layers", type=int, help="choose N layers by greedy selection on calibration perplexity"
        )
    p.add_argument("--grid", type=_float_list, default=DEFAULT_GRID, help="alpha candidates (default 0,0.1,...,1)")


def _name_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of layer indices") from None


def _float_list(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of numbers") from None


# --- what commands share ----------------------------------------------------------------------------------


def _load(args: argparse.Namespace) -> LoadedModel:
    return load_model(
        args.model,
        device=args.device,
        device_map=args.device_map,
        trust_remote_code=args.trust_remote_code,
        dtype=args.dtype,
    )


def _mask(lm: LoadedModel, path: str) -> Mask:
    """The mask file at ``path`` for ``lm``; what the user should know about it goes to stderr as warnings."""
    mask = load_mask(path, lm.shape, lm.name, lm.fingerprint)
    for warning in mask_warnings(mask, lm.fingerprint):
        print(f"warning: {warning}", file=sys.stderr)
    return mask


def _windows(lm: LoadedModel, args: argparse.Namespace, which: str = "text") -> Windows:
    """Windows of the text of option ``which`` (text, calib or eval).

    Beside a calibration text the evaluation text has its own ``--eval-max-tokens``; alone (``pareto``) it
    takes ``--max-tokens`` like any other text.
    """
    max_tokens = args.eval_max_tokens if which == "eval" and "eval_max_tokens" in args else args.max_tokens
    try:
        text = load_text(getattr(args, which), args.encoding)
        return make_windows(lm.tokenizer, text, args.seqlen, max_tokens, lm.max_positions)
    except HeadroomError as e:
        if which == "eval":
            e.settings = tuple("eval_max_tokens" if s == "max_tokens" else s for s in e.settings)
        raise


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


def _progress(desc: str) -> Progress:
    """A tqdm bar on stderr, opened at the first update so that early errors print alone."""
    bars: list[tqdm] = []

    def update(done: int, total: int) -> None:
        if not bars:
            bars.append(tqdm(desc=desc, total=total, unit="step", file=sys.stderr, leave=False))
        bars[0].total = total
        bars[0].n = done
        bars[0].refresh()
        if done == total:
            bars[0].close()

    return update


def _layers(lm: LoadedModel, args: argparse.Namespace) -> list[int]:
    return list(top_layers(lm.shape.num_layers, args.layers)) if args.layers else args.layer_set


def _held_out(lm: LoadedModel, args: argparse.Namespace, mask: Mask) -> Result:
    evaluation = _windows(lm, args, "eval")
    result = cached_perplexity(lm.arch, lm.fingerprint, evaluation, mask, progress=_progress("held-out eval"))
    return {"eval_perplexity": result.perplexity, "eval": evaluation.metadata()}


# --- how results read as text ----------------------------------------------------------------------------


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


def _drift_table(report: Result) -> Iterator[str]:
    yield f"  KL(unpruned || masked) of the next-token distribution: {report['kl_nats_per_token']:.4f} nats/token"
    yield "  layer  |h| unpruned (q10 q50 q90)     |h| masked (q10 q50 q90)      cos"
    for row in report["layers"]:
        u, m = row["unpruned"], row["masked"]
        yield (
            f"  {row['layer']:>5}  {u['l2_mean']:7.2f} ({u['l2_q10']:.1f} {u['l2_q50']:.1f} {u['l2_q90']:.1f})"
            f"   {m['l2_mean']:7.2f} ({m['l2_q10']:.1f} {m['l2_q50']:.1f} {m['l2_q90']:.1f})   {row['cosine_mean']:.4f}"
        )


def _score_rows(scores: list[list[float] | None]) -> Iterator[str]:
    for i, row in enumerate(scores):
        yield f"  {i:>3}: " + ("-" if row is None else " ".join(f"{v:9.4g}" for v in row))


def _map_summary(head_map: Result) -> Iterator[str]:
    yield f"  {len(head_map['heads'])} heads, features {', '.join(head_map['feature_names'])}"


def _trace(steps: list[Result]) -> Iterator[str]:
    yield "  " + ", ".join(f"L{s['layer']} a={s['alpha']}: {s['perplexity']:.3f}" for s in steps)


# --- the commands ------------------------------------------------------------------------------------------


def _eval_arguments(p: argparse.ArgumentParser) -> None:
    _text_args(p)
    p.add_argument("--mask", default=None, help="a v1 mask JSON file (default: unpruned)")
    p.add_argument("--no-cache", action="store_true", help="recompute even if the result is cached")


@command("eval", "protocol perplexity of a model, optionally under a mask, with its budget", _eval_arguments)
def cmd_eval(args: argparse.Namespace, lm: LoadedModel) -> Result:
    windows = _windows(lm, args)
    mask = _mask(lm, args.mask) if args.mask else Mask.unpruned(lm.shape, lm.name, lm.fingerprint)
    result = cached_perplexity(
        lm.arch, lm.fingerprint, windows, mask, progress=_progress("eval"), refresh=args.no_cache
    )
    return {**result.to_json(), "budget": budget(mask, lm.shape, args.seqlen).to_json()}


def _harp_arguments(p: argparse.ArgumentParser) -> None:
    _calib_args(p)
    _layer_choice(p, choose=True)
    p.add_argument("--out", default=None, help="write the resulting v1 mask JSON here")
    p.add_argument("--no-cache", action="store_true", help="search again even if the result is cached")


@command(
    "harp",
    "HARP: drop-QK on the top layers with a greedy alpha search; writes the mask",
    _harp_arguments,
    text={"trace": _trace},
    before_load=_check_output,
)
def cmd_harp(args: argparse.Namespace, lm: LoadedModel) -> Result:
    calib = _windows(lm, args, "calib")
    if args.choose_layers:
        bar = _progress("layer selection + alpha search")
        result = cached_chosen_harp(lm, calib, args.choose_layers, None, args.grid, progress=bar, refresh=args.no_cache)
    else:
        bar = _progress("alpha search")
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


@command(
    "compare",
    "HARP against the baselines at a matched budget, on held-out text",
    _compare_arguments,
    text={"rows": _comparison_table},
)
def cmd_compare(args: argparse.Namespace, lm: LoadedModel) -> Result:
    calib = _windows(lm, args, "calib")
    evaluation = _windows(lm, args, "eval")
    result = compare(lm, calib, evaluation, _layers(lm, args), args.match, args.grid, _progress("evaluations"))
    return {**result.to_json(), "calib": calib.metadata(), "eval": evaluation.metadata()}


def _importance_arguments(p: argparse.ArgumentParser) -> None:
    _text_args(p, "--text", "default-calib", max_tokens=2048)
    p.add_argument("--metric", required=True, choices=sorted(HEAD_METRICS), help="the importance metric")
    p.add_argument("--layers", type=_int_list, default=None, help="only these layers, e.g. 28,29 (others: null)")


@command(
    "importance",
    "per-head importance scores of one metric, one row per layer",
    _importance_arguments,
    text={"scores": _score_rows},
)
def cmd_importance(args: argparse.Namespace, lm: LoadedModel) -> Result:
    windows = _windows(lm, args)
    result = cached_head_result(lm, windows, args.metric, args.layers, progress=_progress(args.metric))
    return {**result.to_json(), "windows": windows.metadata()}


def _head_map_arguments(p: argparse.ArgumentParser) -> None:
    _text_args(p, "--text", "default-calib", max_tokens=2048)
    p.add_argument(
        "--metrics",
        type=_name_list,
        default=list(DEFAULT_METRICS),
        help=f"importance metrics among the features (default {','.join(DEFAULT_METRICS)})",
    )
    p.add_argument("--clusters", type=int, default=DEFAULT_CLUSTERS, help="k-means clusters")
    p.add_argument("--seed", type=int, default=0, help="seed of UMAP and k-means (same seed, same map)")


@command(
    "head-map",
    "every head placed by its features (PCA and UMAP) and clustered",
    _head_map_arguments,
    text={"map": _map_summary},
)
def cmd_head_map(args: argparse.Namespace, lm: LoadedModel) -> Result:
    windows = _windows(lm, args)
    head_map = cached_head_map(lm, windows, args.metrics, args.clusters, args.seed, progress=_progress("head map"))
    return {"map": head_map.to_json(), "cluster_members": head_map.cluster_members(), "windows": windows.metadata()}


def _drift_arguments(p: argparse.ArgumentParser) -> None:
    _text_args(p, "--text", "default-eval", max_tokens=2048)
    p.add_argument("--mask", required=True, help="a v1 mask JSON file")


@command(
    "drift",
    "per-layer residual-norm drift of a mask against the unpruned model",
    _drift_arguments,
    text={"mask": _drift_table, "without_rescaling": _drift_table},
)
def cmd_drift(args: argparse.Namespace, lm: LoadedModel) -> Result:
    """The mask's drift; for a mask with drop-QK layers also the same mask with alpha = 1 there."""
    return cached_mask_drift(lm, _windows(lm, args), _mask(lm, args.mask)).to_json()


def _export_arguments(p: argparse.ArgumentParser) -> None:
    _text_args(p, "--text", "default-eval", max_tokens=2048)
    p.add_argument("--mask", required=True, help="a v1 mask JSON file")
    p.add_argument("--out", required=True, help="the folder to write (must not exist or be empty, unless --force)")
    p.add_argument(
        "--kind",
        choices=KINDS,
        default="compact",
        help="compact: pruned weights removed, loads with trust_remote_code=True (default); "
        "stock: source architecture with pruned heads zeroed, no remote code, no drop-QK",
    )
    p.add_argument("--force", action="store_true", help="replace an existing folder (only once the export is done)")


@command(
    "export",
    "write the masked model as a Hugging Face directory, with a model card",
    _export_arguments,
    before_load=lambda args: check_destination(args.out, args.force),
)
def cmd_export(args: argparse.Namespace, lm: LoadedModel) -> Result:
    mask = _mask(lm, args.mask)
    windows = _windows(lm, args)
    command = export_command(
        args.model,
        args.mask,
        args.out,
        args.kind,
        args.text,
        args.seqlen,
        args.max_tokens,
        args.encoding,
        args.force,
        lm.dtype,
    )
    result = export_model(
        lm, mask, args.out, args.kind, force=args.force, windows=windows, command=command, progress=_progress("export")
    )
    return result.to_json()


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
        type=_name_list,
        default=list(MOVE_KINDS),
        help=f"structural moves to combine, comma-separated (default all: {','.join(MOVE_KINDS)})",
    )
    p.add_argument("--out", default=None, help="write the mask found as JSON here")
    p.add_argument("--no-cache", action="store_true", help="search again even if the result is cached")


def _check_search(args: argparse.Namespace) -> None:
    _check_output(args)
    parse_targets(args.save)
    check_move_kinds(args.moves)


@command(
    "search",
    "the mask of lowest calibration perplexity that saves at least a budget",
    _search_arguments,
    before_load=_check_search,
)
def cmd_search(args: argparse.Namespace, lm: LoadedModel) -> Result:
    calib = _windows(lm, args, "calib")
    targets = parse_targets(args.save)
    result = cached_search(
        lm,
        calib,
        targets,
        args.seqlen,
        args.shortlist,
        args.proxy_windows,
        None,
        _progress("search"),
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


@command(
    "rescale",
    "per-layer alpha for every changed layer of a mask (closed form, then search)",
    _rescale_arguments,
    before_load=_check_output,
)
def cmd_rescale(args: argparse.Namespace, lm: LoadedModel) -> Result:
    mask = _mask(lm, args.mask)
    calib = _windows(lm, args, "calib")
    result = cached_rescale(lm, mask, calib, search=not args.closed_form, progress=_progress("alpha search"))
    return {
        **result.to_json(),
        **_held_out(lm, args, result.mask),
        "budget": budget(result.mask, lm.shape, args.seqlen).to_json(),
        **_save_mask(result.mask, args),
    }


def _pareto_arguments(p: argparse.ArgumentParser) -> None:
    _text_args(p, "--eval", "default-eval", max_tokens=2048)
    p.add_argument("--axis", choices=AXES, default="kv", help="the saving axis (default kv)")
    p.add_argument("--all", action="store_true", help="list every point as text, not only the front (JSON: always)")


def _pareto_lines(points: list[dict[str, Any]]) -> Iterator[str]:
    yield "  (* on the front)  held-out ppl       saving  method: mask"
    for p in points:
        mark = "*" if p["on_front"] else " "
        yield f"  {mark} {p['eval_perplexity']:12.3f} {p['saving']:>12,}  {p['method']}: {p['label']}"


@command(
    "pareto",
    "every cached mask of the model: held-out perplexity vs saving on an axis, and the Pareto front",
    _pareto_arguments,
    text={"points": _pareto_lines},
)
def cmd_pareto(args: argparse.Namespace, lm: LoadedModel) -> Result:
    result = pareto(lm, _windows(lm, args, "eval"), args.axis, progress=_progress("held-out evals"))
    out = result.to_json()
    if not args.json:  # as text: the front (every point with --all), without the masks
        shown = range(len(result.points)) if args.all else result.front
        points = [{k: v for k, v in out["points"][i].items() if k != "mask"} for i in shown]
        out["points"] = [{**p, "on_front": i in result.front} for i, p in zip(shown, points, strict=True)]
        del out["front"]
    return out


def _tasks_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mask", default=None, help="a mask JSON file (default: unpruned)")
    p.add_argument(
        "--tasks", type=_name_list, default=list(BUILT_IN), help=f"comma-separated (default {','.join(BUILT_IN)})"
    )
    p.add_argument(
        "--task-file",
        action="append",
        default=[],
        help='a JSONL file of {"prompt", "target"} or {"prompt", "choices", "answer"} items; repeat for several',
    )
    p.add_argument(
        "--write-lm-eval",
        metavar="DIR",
        default=None,
        help="instead of scoring, write the tasks (and task files) as lm-evaluation-harness YAMLs with data into DIR",
    )
    p.add_argument("--no-cache", action="store_true", help="recompute even if the results are cached")


def _check_tasks(args: argparse.Namespace) -> None:
    """Bad task names and task files stop before the model loads; the parsed files ride on ``args``."""
    args.tasks = check_task_names(args.tasks)
    args.user_tasks = tuple(load_task_file(path) for path in args.task_file)


def _task_names(tasks: Result) -> Iterator[str]:
    yield f"  {', '.join(tasks)} (every number with --json)"


@command(
    "tasks",
    "offline tasks under a mask: passkey, induction, last word, continuation, long-context perplexity",
    _tasks_arguments,
    text={"tasks": _task_names},
    before_load=_check_tasks,
)
def cmd_tasks(args: argparse.Namespace, lm: LoadedModel) -> Result:
    if args.write_lm_eval:
        return write_lm_eval(lm, args.write_lm_eval, args.user_tasks).to_json()
    mask = _mask(lm, args.mask) if args.mask else None
    results = {**run_suite(lm, args.tasks, mask, progress=_progress("tasks"), refresh=args.no_cache)}
    for task in args.user_tasks:
        bar = _progress(task.name)
        results[f"user:{task.name}"] = cached_user_task(lm, task, mask, progress=bar, refresh=args.no_cache)
    return {
        "headline": {k: v for result in results.values() for k, v in result.headline().items()},
        "tasks": {name: result.to_json() for name, result in results.items()},
        "mask": mask.summary() if mask else "unpruned",
    }


# --- the cache, without a model -------------------------------------------------------------------------


def _cache_pack(args: argparse.Namespace, _lm: None) -> Result:
    name, fingerprint = model_fingerprint(args.model)
    dtype = None if args.dtype == "all" else args.dtype
    return pack(DiskCache(), fingerprint, Path(args.out), dtype, name).to_json()


def _cache_unpack(args: argparse.Namespace, _lm: None) -> Result:
    return unpack(DiskCache(), Path(args.archive), args.on_conflict).to_json()


def _pack_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help="the model whose results to pack (as elsewhere; not loaded)")
    p.add_argument("--dtype", default="all", choices=["all", *DTYPES], help="only results of this dtype (default all)")
    p.add_argument("out", help="the tar file to write")


def _unpack_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("archive", help="a tar file written by `cache pack`")
    p.add_argument(
        "--on-conflict",
        default="refuse",
        choices=CONFLICT_CHOICES,
        help="an entry that differs from a valid one in the cache: refuse the whole pack (default), "
        "keep the cache's, or replace it with the pack's",
    )


CACHE_COMMANDS = (
    Command(
        "pack", "write every cached result of one model to a tar file", _pack_arguments, _cache_pack, loads_model=False
    ),
    Command(
        "unpack", "verify a pack and add its results to this cache", _unpack_arguments, _cache_unpack, loads_model=False
    ),
)


def _cache_commands(sub: argparse._SubParsersAction) -> None:
    """``cache pack`` and ``cache unpack``: one model's results moved between machines (``analysis/cache_pack.py``)."""
    cache = sub.add_parser("cache", help="move one model's cached results to another machine (pack, unpack)")
    actions = cache.add_subparsers(dest="action", required=True, metavar="ACTION")
    for cmd in CACHE_COMMANDS:
        p = actions.add_parser(cmd.name, help=cmd.help)
        cmd.arguments(p)
        _output_args(p)
        p.set_defaults(command=cmd)
