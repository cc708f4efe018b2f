"""The structural moves of the mask search: each a change of one layer's attention.

- ``remove_attention``: the layer's attention branch is gone (alpha = 0);
- ``drop_qk``: HARP's drop-QK (the search sets its alpha);
- ``prune_group``: the query heads of one KV group;
- ``prune_head``: one query head.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from analysis.architecture import ModelShape
from analysis.errors import HeadroomError
from analysis.masks import Mask

MOVE_KINDS = ("remove_attention", "drop_qk", "prune_group", "prune_head")


@dataclass(frozen=True)
class Move:
    """One structural change at one layer; ``index`` is the KV group or query head where it applies."""

    kind: str
    layer: int
    index: int = -1

    def __str__(self) -> str:
        return f"{self.kind}({self.layer}{'' if self.index < 0 else f', {self.index}'})"


def apply_move(mask: Mask, move: Move, shape: ModelShape) -> Mask:
    """``mask`` with ``move`` made (drop-QK at alpha = 1; its alpha is set by the caller)."""
    if move.kind == "remove_attention":
        return mask.with_layer(move.layer, alpha=0.0)
    if move.kind == "drop_qk":
        return mask.with_layer(move.layer, drop_qk=True, alpha=1.0)
    if move.kind == "prune_group":
        heads = [h for h in range(shape.num_heads) if shape.kv_group(h) == move.index]
        return mask.with_heads([(move.layer, h) for h in heads], keep=False)
    return mask.with_heads([(move.layer, move.index)], keep=False)


def all_moves(shape: ModelShape, kinds: Sequence[str]) -> list[Move]:
    """Every move of the given kinds, highest layer first (the order the incremental evaluator likes)."""
    moves = []
    for layer in reversed(range(shape.num_layers)):
        moves += [Move(kind, layer) for kind in ("remove_attention", "drop_qk") if kind in kinds]
        if "prune_group" in kinds:
            moves += [Move("prune_group", layer, g) for g in range(shape.num_kv_heads)]
        if "prune_head" in kinds:
            moves += [Move("prune_head", layer, h) for h in range(shape.num_heads)]
    return moves


def check_move_kinds(kinds: Sequence[str]) -> None:
    unknown = [k for k in kinds if k not in MOVE_KINDS]
    if unknown or not kinds:
        raise HeadroomError(
            f"unknown move kind(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(MOVE_KINDS)}",
            settings=("moves",),
        )
