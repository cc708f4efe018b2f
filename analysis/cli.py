"""Headless command line: ``python -m analysis COMMAND ...``.

Errors a user can fix are printed to stderr as one line, with exit status 2 and no traceback
(``--debug`` shows it).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from tqdm import tqdm

from analysis.cache import DiskCache
from analysis.corpus import load_text, make_windows
from analysis.errors import HeadroomError
from analysis.evaluation import perplexity
from analysis.loading import DEFAULT_MODEL, LoadedModel, load_model
from analysis.masks import Mask, budget, load_mask


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
        "--device-map",
        default=None,
        help="'auto' spreads a model that does not fit one device over GPUs and CPU (accelerate)",
    )
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow a model directory's own Python code to run (off by default)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--debug", action="store_true", help="show the traceback of errors")


def _text_args(p: argparse.ArgumentParser, flag: str = "--text", default: str = "default-eval") -> None:
    p.add_argument(
        flag, default=default, help="a UTF-8 text file, default-eval or default-calib (the fixed Lee corpus split)"
    )
    p.add_argument("--encoding", default="utf-8", help="encoding of a text file (default utf-8)")
    p.add_argument("--seqlen", type=int, default=256, help="window length in tokens (default 256)")
    p.add_argument(
        "--max-tokens", type=int, default=None, help="keep the first N // seqlen windows (default: the whole text)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m analysis",
        description="Headroom: analyse and prune the attention heads of causal language models.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    ev = sub.add_parser("eval", help="protocol perplexity of a model, optionally under a mask, with its budget")
    _common(ev)
    _text_args(ev)
    ev.add_argument("--mask", default=None, help="a v1 mask JSON file (default: unpruned)")
    ev.add_argument("--no-cache", action="store_true", help="recompute even if the result is cached")
    ev.set_defaults(func=cmd_eval)
    return parser


def _load(args: argparse.Namespace) -> LoadedModel:
    return load_model(
        args.model, device=args.device, device_map=args.device_map, trust_remote_code=args.trust_remote_code
    )


def _progress(desc: str):
    bar = tqdm(desc=desc, unit="batch", file=sys.stderr, leave=False)

    def update(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()
        if done == total:
            bar.close()

    return update


def cmd_eval(args: argparse.Namespace) -> dict[str, Any]:
    lm = _load(args)
    text = load_text(args.text, args.encoding)
    windows = make_windows(lm.tokenizer, text, args.seqlen, args.max_tokens, lm.max_positions)
    mask = (
        load_mask(args.mask, lm.shape, lm.name, lm.fingerprint)
        if args.mask
        else Mask.unpruned(lm.shape, lm.name, lm.fingerprint)
    )
    start = time.perf_counter()
    parts = {
        "model": lm.fingerprint,
        "text_sha256": text.sha256,
        "seqlen": args.seqlen,
        "windows": windows.num_windows,
        "mask": mask.to_json() | {"note": "", "model": None},
    }

    def compute() -> dict[str, Any]:
        return perplexity(lm.arch, windows, mask, _progress("eval")).to_json()

    cache = DiskCache()
    result = compute() if args.no_cache else cache.json("perplexity", parts, compute)
    if args.no_cache:
        cache.put_json("perplexity", parts, result)
    return {
        **result,
        "model": lm.card(),
        "budget": budget(mask, lm.shape, args.seqlen).to_json(),
        "seconds": round(time.perf_counter() - start, 3),
    }


def _print_text(out: dict[str, Any]) -> None:
    for key, value in out.items():
        if isinstance(value, dict):
            print(f"{key}:")
            for k, v in value.items():
                print(f"  {k}: {v}")
        else:
            print(f"{key}: {value}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        out = args.func(args)
    except HeadroomError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; nothing partial was written", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        _print_text(out)
    return 0
