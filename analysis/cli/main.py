"""``python -m analysis COMMAND ...``: the parser of every command, running one, and how it ends.

:func:`execute` adds what every command reports (the model card and the seconds the work took) and
:func:`main` prints the result, as one JSON object (``--json``) or as text.

Errors a user can fix are printed to stderr as one line, with exit status 2 and no traceback
(``--debug`` shows it).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from analysis.cli.command import Command, Result, as_text
from analysis.cli.measuring import cmd_drift, cmd_eval, cmd_head_map, cmd_importance, cmd_tasks
from analysis.cli.methods import cmd_compare, cmd_harp, cmd_pareto, cmd_rescale, cmd_search
from analysis.cli.shipping import CACHE_COMMANDS, cmd_export
from analysis.errors import HeadroomError
from analysis.loading import DEFAULT_MODEL, DTYPE_CHOICES, LoadedModel, load_model

COMMANDS = (
    cmd_eval,
    cmd_harp,
    cmd_compare,
    cmd_importance,
    cmd_head_map,
    cmd_drift,
    cmd_export,
    cmd_search,
    cmd_rescale,
    cmd_pareto,
    cmd_tasks,
)
"""The commands that load a model, in the order ``--help`` lists them (``cache`` comes last)."""


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
    for cmd in COMMANDS:
        p = sub.add_parser(cmd.name, help=cmd.help)
        _common(p)
        cmd.arguments(p)
        p.set_defaults(command=cmd)
    _cache_commands(sub)
    return parser


def _cache_commands(sub: argparse._SubParsersAction) -> None:
    """``cache pack`` and ``cache unpack``: one model's results moved between machines (``analysis/cache_pack.py``)."""
    cache = sub.add_parser("cache", help="move one model's cached results to another machine (pack, unpack)")
    actions = cache.add_subparsers(dest="action", required=True, metavar="ACTION")
    for cmd in CACHE_COMMANDS:
        p = actions.add_parser(cmd.name, help=cmd.help)
        cmd.arguments(p)
        _output_args(p)
        p.set_defaults(command=cmd)


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


def _load(args: argparse.Namespace) -> LoadedModel:
    return load_model(
        args.model,
        device=args.device,
        device_map=args.device_map,
        trust_remote_code=args.trust_remote_code,
        dtype=args.dtype,
    )


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
