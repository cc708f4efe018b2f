"""Budget targets: what a mask must save at least, per axis (``{"kv": 12288, "params": 3981312}``).

``budget.budget`` measures a mask exactly, per KV group; this module says whether that meets the
targets and how far a change goes toward them.
"""

from __future__ import annotations

from collections.abc import Sequence

from analysis.architecture import ModelShape
from analysis.baselines import AXES, saved
from analysis.budget import Budget, budget
from analysis.errors import HeadroomError
from analysis.masks import Mask


def parse_targets(specs: Sequence[str]) -> dict[str, int]:
    """``["kv:12288", "params:3981312"]`` -> ``{"kv": 12288, "params": 3981312}``."""
    targets: dict[str, int] = {}
    for spec in specs:
        axis, _, amount = spec.partition(":")
        if axis not in AXES or not amount.strip().isdigit() or int(amount) <= 0:
            raise HeadroomError(
                f"budget {spec!r} must be AXIS:AMOUNT with AXIS one of {', '.join(AXES)} and AMOUNT a positive "
                "integer, e.g. kv:12288",
                settings=("targets",),
            )
        if axis in targets:
            raise HeadroomError(f"the budget names axis '{axis}' twice; give each axis once", settings=("targets",))
        targets[axis] = int(amount)
    if not targets:
        raise HeadroomError("give at least one budget, e.g. kv:12288", settings=("targets",))
    return targets


def check_targets(targets: dict[str, int], shape: ModelShape, seqlen: int) -> None:
    """Refuse a budget that even removing every layer's attention cannot save."""
    everything = Mask.unpruned(shape, "")
    for layer in range(shape.num_layers):
        everything = everything.with_layer(layer, alpha=0.0)
    most = budget(everything, shape, seqlen)
    for axis, amount in targets.items():
        if saved(most, axis) < amount:
            raise HeadroomError(
                f"no mask saves {amount:,} on '{axis}': removing all attention saves {saved(most, axis):,}. "
                "Choose a smaller budget"
            )


def meets(b: Budget, targets: dict[str, int]) -> bool:
    return all(saved(b, axis) >= amount for axis, amount in targets.items())


def progress_toward(before: Budget, after: Budget, targets: dict[str, int]) -> float:
    """Share of each axis' remaining need that a change covers, summed over the axes."""
    total = 0.0
    for axis, amount in targets.items():
        need = amount - saved(before, axis)
        if need > 0:
            total += min(saved(after, axis) - saved(before, axis), need) / amount
    return total


def savings(b: Budget) -> dict[str, int]:
    """What ``b`` saves on every axis."""
    return {axis: saved(b, axis) for axis in AXES}
