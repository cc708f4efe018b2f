"""Head masks: which query heads a model keeps, which layers run drop-QK, each layer's scale and bias.

A mask knows the model only through its :class:`ModelShape`. It writes itself as the v1/v2 JSON of
``shared/docs/protocol.md`` (:meth:`Mask.to_json`); reading that JSON back, with every check, is
:mod:`analysis.mask_files`; what a mask saves is :mod:`analysis.budget`; the mask in a link is
:mod:`analysis.mask_links`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from analysis.architecture import ModelShape
from analysis.errors import HeadroomError
from analysis.files import atomic_write_text

FORMAT = "headroom.mask"
VERSION = 1  # written whenever the mask has no bias, so every v1 reader keeps working
VERSION_BIAS = 2  # version 1 plus the optional per-layer o_proj ``bias`` (FLAP's compensation)
ALPHA_MAX = 4.0

Bias = tuple[tuple[int, tuple[float, ...]], ...]  # (layer, hidden_size floats), ascending layers


@dataclass(frozen=True)
class LayerSpec:
    """Everything a mask says about one layer; two masks differ at a layer iff these differ."""

    heads: tuple[bool, ...]
    drop_qk: bool
    alpha: float
    bias: tuple[float, ...] | None = None  # added to o_proj's output, before any post-norm and alpha


@dataclass(frozen=True)
class Mask:
    """Which query heads are kept, which layers run drop-QK, each layer's branch scale and o_proj bias.

    ``bias`` holds, for the layers that have one, a vector of ``hidden_size`` floats added to o_proj's
    output (mask v2): ``h <- h + alpha * post_norm(o_proj(heads kept) + bias)``.
    """

    model_name: str
    num_heads: int
    num_kv_heads: int
    heads: tuple[tuple[bool, ...], ...]  # num_layers rows of num_heads; True keeps the head
    drop_qk: frozenset[int] = frozenset()
    alpha: tuple[float, ...] = ()  # one per layer; 1.0 leaves the branch as it is
    bias: Bias = ()
    note: str = ""
    fingerprint: str | None = field(default=None, compare=False)

    @classmethod
    def unpruned(cls, shape: ModelShape, model_name: str, fingerprint: str | None = None) -> Mask:
        row = (True,) * shape.num_heads
        return cls(
            model_name=model_name,
            num_heads=shape.num_heads,
            num_kv_heads=shape.num_kv_heads,
            heads=(row,) * shape.num_layers,
            alpha=(1.0,) * shape.num_layers,
            fingerprint=fingerprint,
        )

    @classmethod
    def drop_qk_top(cls, shape: ModelShape, model_name: str, n: int, alpha: float) -> Mask:
        """The top ``n`` layers in drop-QK mode, all with branch scale ``alpha``.

        With alpha = 1 this is HARP before its search; with alpha = 0 the top attention branches are gone.
        """
        if not 0 <= n <= shape.num_layers:
            raise HeadroomError(f"cannot put {n} layers in drop-QK mode: the model has {shape.num_layers} layers")
        return cls.unpruned(shape, model_name).with_drop_qk(range(shape.num_layers - n, shape.num_layers), alpha)

    @property
    def num_layers(self) -> int:
        return len(self.heads)

    def layer(self, layer: int) -> LayerSpec:
        return LayerSpec(self.heads[layer], layer in self.drop_qk, self.alpha[layer], self.bias_of(layer))

    def bias_of(self, layer: int) -> tuple[float, ...] | None:
        """The o_proj bias the mask adds in ``layer``, or None."""
        return next((values for i, values in self.bias if i == layer), None)

    @property
    def is_unpruned(self) -> bool:
        return (
            not self.drop_qk
            and not self.bias
            and all(a == 1.0 for a in self.alpha)
            and all(all(row) for row in self.heads)
        )

    @property
    def pruned_heads(self) -> int:
        return sum(not keep for row in self.heads for keep in row)

    def first_difference(self, other: Mask) -> int | None:
        """Lowest layer at which the two masks differ, or None if they are the same."""
        return next((i for i in range(self.num_layers) if self.layer(i) != other.layer(i)), None)

    def with_head(self, layer: int, head: int, keep: bool) -> Mask:
        row = list(self.heads[layer])
        row[head] = keep
        heads = (*self.heads[:layer], tuple(row), *self.heads[layer + 1 :])
        return replace(self, heads=heads)

    def with_heads(self, cells: Iterable[tuple[int, int]], keep: bool) -> Mask:
        """Keep (or prune) every ``(layer, head)`` of ``cells``."""
        rows = [list(row) for row in self.heads]
        for layer, head in cells:
            rows[layer][head] = keep
        return replace(self, heads=tuple(tuple(row) for row in rows))

    def with_layer(self, layer: int, *, drop_qk: bool | None = None, alpha: float | None = None) -> Mask:
        drops = set(self.drop_qk)
        if drop_qk is not None:
            (drops.add if drop_qk else drops.discard)(layer)
        alphas = list(self.alpha)
        if alpha is not None:
            alphas[layer] = check_alpha(alpha, f"alpha of layer {layer}")
        return replace(self, drop_qk=frozenset(drops), alpha=tuple(alphas))

    def with_drop_qk(self, layers: Iterable[int], alpha: float = 1.0) -> Mask:
        """``layers`` in drop-QK mode, each with branch scale ``alpha`` (1: no rescaling yet)."""
        mask = self
        for layer in layers:
            mask = mask.with_layer(layer, drop_qk=True, alpha=alpha)
        return mask

    def with_bias(self, layer: int, values: Iterable[float] | None) -> Mask:
        """Add ``values`` to o_proj's output in ``layer`` (None removes the layer's bias)."""
        if not 0 <= layer < self.num_layers:
            raise HeadroomError(f"bias layer {layer} is not a layer index in 0..{self.num_layers - 1}")
        rest = {i: v for i, v in self.bias if i != layer}
        if values is not None:
            vector = tuple(float(v) for v in values)
            if not all(math.isfinite(v) for v in vector):
                raise HeadroomError(f"the bias of layer {layer} has a value that is not a finite number")
            rest[layer] = vector
        return replace(self, bias=tuple(sorted(rest.items())))

    def summary(self) -> dict[str, Any] | str:
        """Short description for reports: 'unpruned' or what is changed."""
        if self.is_unpruned:
            return "unpruned"
        out: dict[str, Any] = {
            "pruned_heads": self.pruned_heads,
            "drop_qk": sorted(self.drop_qk),
            "alpha": {str(i): a for i, a in enumerate(self.alpha) if a != 1.0},
        }
        if self.bias:
            out["bias_layers"] = [i for i, _ in self.bias]
        return out

    def describe(self) -> str:
        """One line for people: 'unpruned' or what the mask changes (heads, drop-QK layers, alphas)."""
        if self.is_unpruned:
            return "unpruned"
        parts = [f"{self.pruned_heads} heads pruned"] if self.pruned_heads else []
        if self.drop_qk:
            parts.append(f"drop-QK on layers {sorted(self.drop_qk)}")
        removed = [i for i, a in enumerate(self.alpha) if a == 0.0]
        if removed:
            parts.append(f"attention removed on layers {removed}")
        scaled = {i: a for i, a in enumerate(self.alpha) if a not in (0.0, 1.0)}
        if scaled:
            parts.append("alpha " + ", ".join(f"{i}: {a:g}" for i, a in scaled.items()))
        return "; ".join(parts)

    def cache_key(self) -> dict[str, Any]:
        """What the mask does, without its name, note or fingerprint (a mask without bias keys as in v1)."""
        obj = self.to_json()
        return {k: obj[k] for k in ("heads", "drop_qk", "alpha", "bias") if k in obj}

    def to_json(self) -> dict[str, Any]:
        model: dict[str, Any] = {
            "name": self.model_name,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "num_kv_heads": self.num_kv_heads,
        }
        if self.fingerprint:
            model["fingerprint"] = self.fingerprint
        obj: dict[str, Any] = {
            "format": FORMAT,
            "version": VERSION_BIAS if self.bias else VERSION,
            "model": model,
            "heads": [[int(k) for k in row] for row in self.heads],
            "drop_qk": sorted(self.drop_qk),
            "alpha": {str(i): a for i, a in enumerate(self.alpha) if a != 1.0},
        }
        if self.bias:
            obj["bias"] = {str(i): list(values) for i, values in self.bias}
        obj["note"] = self.note
        return obj

    def save(self, path: str | Path) -> None:
        atomic_write_text(Path(path), json.dumps(self.to_json(), indent=2) + "\n")


def check_alpha(value: Any, where: str) -> float:
    """``value`` as a float if it is a legal branch scale; the editor and the JSON reader both check with it."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or (isinstance(value, float) and not math.isfinite(value))
    ):
        raise HeadroomError(f"{where} must be a finite number in [0, {ALPHA_MAX:g}], got {value!r}")
    if not 0.0 <= value <= ALPHA_MAX:
        raise HeadroomError(f"{where} must be in [0, {ALPHA_MAX:g}], got {value!r}")
    return float(value)
