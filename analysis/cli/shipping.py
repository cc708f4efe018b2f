"""The commands whose output goes to another machine: ``export`` (the masked model as a Hugging Face
directory) and ``cache pack`` / ``cache unpack`` (one model's cached results in a tar file)."""

from __future__ import annotations

import argparse
from pathlib import Path

from analysis.cache import DiskCache
from analysis.cache_pack import CONFLICT_CHOICES, pack, unpack
from analysis.cli.command import Command, Result, before_load, command, progress_bar
from analysis.cli.options import read_mask, read_windows, text_arguments
from analysis.export import KINDS, export_model
from analysis.export_folder import check_destination
from analysis.loading import DEFAULT_MODEL, DTYPES, LoadedModel, model_fingerprint
from analysis.model_card import export_command


def _export_arguments(p: argparse.ArgumentParser) -> None:
    text_arguments(p, "--text", "default-eval", max_tokens=2048)
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


@before_load(lambda args: check_destination(args.out, args.force))
@command("write the masked model as a Hugging Face directory, with a model card", _export_arguments)
def cmd_export(args: argparse.Namespace, lm: LoadedModel) -> Result:
    mask = read_mask(lm, args.mask)
    windows = read_windows(lm, args)
    command_line = export_command(
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
        lm,
        mask,
        args.out,
        args.kind,
        force=args.force,
        windows=windows,
        command=command_line,
        progress=progress_bar("export"),
    )
    return result.to_json()


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
"""The actions of ``cache``: one model's results moved between machines (``analysis/cache_pack.py``)."""
