"""What a CLI command is: its help, arguments, work and text rendering; and its progress bar on stderr.

A command is written once, as a function ``cmd_NAME`` decorated with :func:`command`, which gives its help
and arguments; stacked above it, :func:`renders` says how its result reads as text and :func:`before_load`
checks its arguments. The function gets the parsed arguments and the loaded model and returns its result
as a JSON-ready dict; :func:`analysis.cli.main.execute` adds what every command reports.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from tqdm import tqdm

from analysis.evaluation import Progress
from analysis.loading import LoadedModel

Result = dict[str, Any]
Work = Callable[[argparse.Namespace, LoadedModel], Result]
"""A command's work: the parsed arguments and the loaded model in, the JSON-ready result out."""
Lines = Callable[[Any], Iterator[str]]
"""Renders one value of a result as text lines (without its heading)."""


@dataclass(frozen=True)
class Command:
    """One CLI command, as :func:`command` makes it."""

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


def command(help: str, arguments: Callable[[argparse.ArgumentParser], None]) -> Callable[[Work], Command]:
    """Make the decorated ``cmd_NAME(args, lm) -> dict`` the command NAME (``cmd_head_map``: ``head-map``).

    ``arguments`` adds the command's own options (the model options, ``--json`` and ``--debug`` are
    added to every command). :func:`renders` and :func:`before_load`, stacked above, add to the command.
    """

    def make(work: Work) -> Command:
        return Command(work.__name__.removeprefix("cmd_").replace("_", "-"), help, arguments, work)

    return make


def renders(**lines: Lines) -> Callable[[Command], Command]:
    """How the result's keys named here read as text (the rest: ``key: value``)."""
    return lambda cmd: replace(cmd, text=lines)


def before_load(check: Callable[[argparse.Namespace], None]) -> Callable[[Command], Command]:
    """``check`` the arguments alone before the model loads (e.g. an output path we could not write)."""
    return lambda cmd: replace(cmd, before_load=check)


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


def progress_bar(desc: str) -> Progress:
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
