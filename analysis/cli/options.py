"""The options several commands share, and reading them: a text into windows, a mask file, comma lists."""

from __future__ import annotations

import argparse
import sys

from analysis.corpus import Windows, load_text, make_windows
from analysis.errors import HeadroomError
from analysis.loading import LoadedModel
from analysis.mask_files import load_mask, mask_warnings
from analysis.masks import Mask


def text_arguments(
    p: argparse.ArgumentParser, flag: str = "--text", default: str = "default-eval", max_tokens: int | None = None
) -> None:
    """A text option (``flag``) and the options that cut it into windows."""
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


def name_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of layer indices") from None


def float_list(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of numbers") from None


def read_mask(lm: LoadedModel, path: str) -> Mask:
    """The mask file at ``path`` for ``lm``; what the user should know about it goes to stderr as warnings."""
    mask = load_mask(path, lm.shape, lm.name, lm.fingerprint)
    for warning in mask_warnings(mask, lm.fingerprint):
        print(f"warning: {warning}", file=sys.stderr)
    return mask


def read_windows(lm: LoadedModel, args: argparse.Namespace, which: str = "text") -> Windows:
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
