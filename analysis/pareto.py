"""Every mask the cache holds for a model, as held-out perplexity against a saving, and the Pareto front.

The masks come from the results the disk cache already keeps for the model (same fingerprint and
dtype): HARP on fixed layers (with its norm-matching variant), HARP on chosen layers, rescaled masks,
budgeted searches, the matched baselines of every comparison, and the masks saved under a name in
the model's collection. A mask calibrated on the evaluation text itself is left out: its perplexity
there would not be held out. Each mask is evaluated on the evaluation windows through the
perplexity cache, so a second look costs nothing.

A point is on the front when no other point has both a lower (or equal) perplexity and a higher
(or equal) saving, one of them strictly.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import groupby
from typing import Any

from analysis.baselines import AXES, saved
from analysis.budget import Budget, budget
from analysis.cache import DiskCache
from analysis.corpus import Windows
from analysis.errors import HeadroomError
from analysis.evaluation import Progress, cached_perplexity
from analysis.harp import top_layers
from analysis.loading import LoadedModel
from analysis.mask_files import parse_mask
from analysis.masks import Mask
from analysis.search_moves import MOVE_KINDS

COLLECTION = "collection"  # cache kind of the named masks, one entry per model
UNPRUNED = "unpruned"


@dataclass(frozen=True)
class Point:
    """One mask: the method that made it (the colour of the plot), what exactly it is, and its cost."""

    method: str  # e.g. "HARP top-N", "search", "flap_wifv-global-compensated", "saved"
    label: str  # e.g. "HARP top-8", "search kv:12288", "matched on kv to HARP top-8", a saved name
    eval_perplexity: float
    budget: Budget
    mask: Mask

    def saving(self, axis: str) -> int:
        return saved(self.budget, axis)

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "label": self.label,
            "eval_perplexity": self.eval_perplexity,
            "budget": self.budget.to_json(),
            "mask": self.mask.to_json(),
        }


@dataclass(frozen=True)
class Front:
    """Every point and the indices of those on the Pareto front on ``axis``, the front by growing saving."""

    axis: str
    eval: dict[str, Any]  # the evaluation windows' metadata
    points: tuple[Point, ...]
    front: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "axis": self.axis,
            "eval": self.eval,
            "front": list(self.front),
            "points": [{**p.to_json(), "saving": p.saving(self.axis)} for p in self.points],
        }


def pareto_front(pairs: Sequence[tuple[float, float]]) -> tuple[int, ...]:
    """Indices of the non-dominated ``(perplexity, saving)`` pairs, by growing saving (then perplexity).

    Lower perplexity and higher saving are better. One sweep from the largest saving down keeps a
    pair when its perplexity is below every perplexity seen at a larger saving; pairs tied on both
    are all kept (neither dominates the other).
    """
    order = sorted(range(len(pairs)), key=lambda i: (-pairs[i][1], pairs[i][0]))
    kept: list[int] = []
    best = math.inf  # lowest perplexity at a strictly larger saving
    for _, same_saving in groupby(order, key=lambda i: pairs[i][1]):
        group = list(same_saving)  # lowest perplexity first
        lowest = pairs[group[0]][0]
        if lowest < best:
            kept += [j for j in group if pairs[j][0] == lowest]
            best = lowest
    return tuple(sorted(kept, key=lambda j: (pairs[j][1], pairs[j][0])))


def front(points: Sequence[Point], axis: str, evaluation: Windows) -> Front:
    """The points and their Pareto front on ``axis``."""
    if axis not in AXES:
        raise HeadroomError(f"unknown saving axis '{axis}'; use one of {', '.join(AXES)}")
    pairs = [(p.eval_perplexity, float(p.saving(axis))) for p in points]
    return Front(axis, evaluation.metadata(), tuple(points), pareto_front(pairs))


# The named collection ------------------------------------------------------------------------------


def named_masks(lm: LoadedModel, cache: DiskCache | None = None) -> dict[str, Mask]:
    """The masks saved under a name for ``lm``, by name."""
    value = (cache or DiskCache()).get_json(COLLECTION, lm.cache_key()) or {}
    return {name: parse_mask(obj, lm.shape, lm.name, lm.fingerprint) for name, obj in sorted(value.items())}


def save_named(lm: LoadedModel, name: str, mask: Mask, cache: DiskCache | None = None) -> None:
    """Keep ``mask`` in ``lm``'s collection under ``name`` (replacing a mask of that name).

    Read, change, write: two sessions saving at the same instant may lose one name.
    """
    name = name.strip()
    if not name:
        raise HeadroomError("give the mask a name, e.g. 'search kv 12288, hand-tuned'")
    if (mask.num_layers, mask.num_heads) != (lm.shape.num_layers, lm.shape.num_heads):
        raise HeadroomError(f"this mask is for another model shape than {lm.name}; load it for its own model")
    cache = cache or DiskCache()
    value = cache.get_json(COLLECTION, lm.cache_key()) or {}
    cache.put_json(COLLECTION, lm.cache_key(), {**value, name: mask.to_json()})


# Collecting the masks of the cache --------------------------------------------------------------


def _harp_label(layers: list[int], num_layers: int) -> tuple[str, str]:
    n = len(layers)
    if tuple(layers) == top_layers(num_layers, n):
        return "HARP top-N", f"HARP top-{n}"
    return "HARP layer set", f"HARP layers {layers}"


def cached_masks(lm: LoadedModel, evaluation: Windows, cache: DiskCache) -> Iterator[tuple[str, str, Mask]]:
    """``(method, label, mask)`` of every mask the cache holds for ``lm`` not calibrated on ``evaluation``."""
    where = lm.cache_key()
    num_layers = lm.shape.num_layers

    def mask(obj: dict[str, Any]) -> Mask:
        return parse_mask(obj, lm.shape, lm.name, lm.fingerprint)

    def held_out(kind: str) -> Iterator[tuple[dict[str, Any], Any]]:
        for parts, value in cache.entries(kind, where):
            if parts.get("text_sha256") != evaluation.text_sha256:
                yield parts, value

    yield UNPRUNED, UNPRUNED, Mask.unpruned(lm.shape, lm.name, lm.fingerprint)
    for _, value in held_out("harp"):
        method, label = _harp_label(value["layers"], num_layers)
        harp = mask(value["mask"])
        yield method, label, harp
        matched = harp
        for layer, alpha in value["norm_matching"]["alpha"].items():
            matched = matched.with_layer(int(layer), alpha=alpha)
        yield f"{method}, norm-matching alpha", f"{label}, norm-matching alpha", matched
    for parts, value in held_out("harp_chosen"):
        yield "HARP chosen layers", f"HARP chosen {parts['choose']}: layers {value['layers']}", mask(value["mask"])
    for parts, value in held_out("search"):
        targets = " ".join(f"{axis}:{amount}" for axis, amount in parts["targets"].items())
        how = " compensated" if parts.get("compensate") else ""
        how += "" if len(parts["moves"]) == len(MOVE_KINDS) else f" ({', '.join(parts['moves'])})"
        how += "" if "alpha_phase" in parts else ", whole alpha grid"  # cached by the search before `descend`
        yield "search", f"search {targets}{how}", mask(value["mask"])
    for _, value in held_out("rescale"):
        rescaled = mask(value["mask"])
        yield "rescaled", f"rescaled: {rescaled.note or rescaled.describe()}", rescaled
    for parts, value in held_out("baselines"):
        layers = len(parts["reference"].get("drop_qk", []))  # the reference: HARP's mask, as a rule
        to = f" to {layers} drop-QK layers" if layers else ""
        for name, obj in value.items():
            yield name, f"{name} (matched on {parts['axis']}{to})", mask(obj)
    for name, saved_mask in named_masks(lm, cache).items():
        yield "saved", name, saved_mask


def collect(
    lm: LoadedModel,
    evaluation: Windows,
    cache: DiskCache | None = None,
    progress: Progress | None = None,
) -> list[Point]:
    """Every cached mask of ``lm`` as a point, its perplexity on ``evaluation`` (cached; computed once).

    The same mask reached twice by one label counts once; by two labels it is two points.
    """
    cache = cache or DiskCache()
    found: dict[tuple[str, str], tuple[str, str, Mask]] = {}
    for method, label, mask in cached_masks(lm, evaluation, cache):
        key = (label, json.dumps(mask.cache_key(), sort_keys=True))
        found.setdefault(key, (method, label, mask))
    points = []
    for i, (method, label, mask) in enumerate(found.values()):
        ppl = cached_perplexity(lm.arch, lm.fingerprint, evaluation, mask, cache).perplexity
        points.append(Point(method, label, ppl, budget(mask, lm.shape, evaluation.seqlen), mask))
        if progress:
            progress(i + 1, len(found))
    return points


def pareto(
    lm: LoadedModel,
    evaluation: Windows,
    axis: str,
    cache: DiskCache | None = None,
    progress: Progress | None = None,
) -> Front:
    """:func:`collect` and :func:`front` in one call."""
    if axis not in AXES:  # before evaluating anything
        raise HeadroomError(f"unknown saving axis '{axis}'; use one of {', '.join(AXES)}")
    return front(collect(lm, evaluation, cache, progress), axis, evaluation)
