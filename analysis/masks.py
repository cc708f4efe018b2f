"""Head masks: the v1/v2 JSON of ``shared/docs/protocol.md``, validation, and the budget a mask saves.

A mask knows the model only through its :class:`ModelShape`. Parsing is all-or-nothing: every
problem in a file is collected and reported together, and nothing is returned unless the whole file
fits the model.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from analysis.architecture import ModelShape
from analysis.errors import HeadroomError
from analysis.files import atomic_write_text

FORMAT = "headroom.mask"
VERSION = 1  # written whenever the mask has no bias, so every v1 reader keeps working
VERSION_BIAS = 2  # version 1 plus the optional per-layer o_proj ``bias`` (FLAP's compensation)
ALPHA_MAX = 4.0
# A v1 mask of a 128-layer, 128-head model is about 35 KB; a v2 mask with a bias on every layer of the
# default model (30 x 576 floats) about 500 KB.
MAX_MASK_BYTES = 2**20
_KEYS = {"format", "version", "model", "heads", "drop_qk", "alpha", "bias", "note"}

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
            alphas[layer] = _check_alpha(alpha, f"alpha of layer {layer}")
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


def _check_alpha(value: Any, where: str) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or (isinstance(value, float) and not math.isfinite(value))
    ):
        raise HeadroomError(f"{where} must be a finite number in [0, {ALPHA_MAX:g}], got {value!r}")
    if not 0.0 <= value <= ALPHA_MAX:
        raise HeadroomError(f"{where} must be in [0, {ALPHA_MAX:g}], got {value!r}")
    return float(value)


def parse_mask(obj: Any, shape: ModelShape, model_name: str, fingerprint: str | None = None) -> Mask:
    """Validate a decoded v1 mask against the model; raise HeadroomError listing every problem."""
    if not isinstance(obj, dict):
        raise HeadroomError(f"mask must be a JSON object, got {type(obj).__name__}")
    problems: list[str] = []
    if obj.get("format") != FORMAT:
        problems.append(f"'format' must be \"{FORMAT}\", got {obj.get('format')!r}")
    version = obj.get("version")
    if version not in (VERSION, VERSION_BIAS) or isinstance(version, bool):
        problems.append(f"'version' must be {VERSION} or {VERSION_BIAS}, got {version!r}")
    elif version == VERSION and "bias" in obj:
        problems.append(f"'bias' needs 'version' {VERSION_BIAS}; a version {VERSION} mask has no bias")
    unknown = sorted(set(obj) - _KEYS)
    if unknown:
        problems.append(f"unknown keys {unknown}; allowed keys are {sorted(_KEYS)}")

    model = obj.get("model", {})
    if not isinstance(model, dict):
        problems.append("'model' must be an object with name, num_layers, num_heads, num_kv_heads")
        model = {}
    expected = {"num_layers": shape.num_layers, "num_heads": shape.num_heads, "num_kv_heads": shape.num_kv_heads}
    for key, want in expected.items():
        if key in model and model[key] != want:
            problems.append(
                f"model.{key} is {model[key]!r} but the loaded model has {want}: this mask was made for another model"
            )

    heads = obj.get("heads")
    rows: list[tuple[bool, ...]] = []
    if heads is None:
        rows = [(True,) * shape.num_heads] * shape.num_layers
    elif not isinstance(heads, list) or len(heads) != shape.num_layers:
        got = len(heads) if isinstance(heads, list) else type(heads).__name__
        problems.append(f"'heads' must have {shape.num_layers} rows (one per layer), got {got}")
    else:
        for i, row in enumerate(heads):
            if not isinstance(row, list) or len(row) != shape.num_heads:
                got = len(row) if isinstance(row, list) else type(row).__name__
                problems.append(f"heads[{i}] must have {shape.num_heads} entries (one per query head), got {got}")
            elif any(isinstance(v, bool) or not isinstance(v, int) or v not in (0, 1) for v in row):
                problems.append(f"heads[{i}] entries must be 0 (prune) or 1 (keep), got {row}")
            else:
                rows.append(tuple(bool(v) for v in row))

    drop = obj.get("drop_qk", [])
    drop_set: set[int] = set()
    if not isinstance(drop, list):
        problems.append(f"'drop_qk' must be a list of layer indices, got {type(drop).__name__}")
    else:
        for v in drop:
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < shape.num_layers:
                problems.append(f"drop_qk entry {v!r} is not a layer index in 0..{shape.num_layers - 1}")
            elif v in drop_set:
                problems.append(f"drop_qk lists layer {v} twice")
            else:
                drop_set.add(v)

    alphas = [1.0] * shape.num_layers
    alpha = obj.get("alpha", {})
    if not isinstance(alpha, dict):
        problems.append(f"'alpha' must be an object mapping layer index to a number, got {type(alpha).__name__}")
    else:
        for key, value in alpha.items():
            if not _layer_key(key, shape.num_layers):
                problems.append(f"alpha key {key!r} is not a layer index in 0..{shape.num_layers - 1}")
                continue
            try:
                alphas[int(key)] = _check_alpha(value, f'alpha["{key}"]')
            except HeadroomError as e:
                problems.append(str(e))

    bias = _parse_bias(obj.get("bias", {}), shape, problems)

    note = obj.get("note", "")
    if not isinstance(note, str):
        problems.append(f"'note' must be a string, got {type(note).__name__}")

    if problems:
        raise HeadroomError(
            "invalid mask: " + "; ".join(problems) + ". Fix the file, or make the mask with Headroom for this model"
        )
    return Mask(
        model_name=str(model.get("name", model_name)),
        num_heads=shape.num_heads,
        num_kv_heads=shape.num_kv_heads,
        heads=tuple(rows),
        drop_qk=frozenset(drop_set),
        alpha=tuple(alphas),
        bias=bias,
        note=note,
        fingerprint=model.get("fingerprint") or fingerprint,
    )


def _layer_key(key: Any, num_layers: int) -> bool:
    """Whether ``key`` is a layer index written as JSON object keys are: "0", "12", never "012"."""
    return isinstance(key, str) and key.isascii() and key.isdigit() and str(int(key)) == key and int(key) < num_layers


def _is_finite_number(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer beyond float range
        return False


def _parse_bias(bias: Any, shape: ModelShape, problems: list[str]) -> Bias:
    """The v2 ``bias`` object as a :data:`Bias`; every problem goes to ``problems``."""
    if not isinstance(bias, dict):
        problems.append(f"'bias' must be an object mapping layer index to a list of numbers, got {type(bias).__name__}")
        return ()
    found = []
    d = shape.hidden_size
    for key, values in bias.items():
        if not _layer_key(key, shape.num_layers):
            problems.append(f"bias key {key!r} is not a layer index in 0..{shape.num_layers - 1}")
        elif not isinstance(values, list) or len(values) != d:
            got = f"{len(values)} values" if isinstance(values, list) else type(values).__name__
            problems.append(f'bias["{key}"] must be a list of {d} numbers (the hidden size), got {got}')
        else:
            bad = next(((j, v) for j, v in enumerate(values) if not _is_finite_number(v)), None)
            if bad is not None:
                problems.append(f'bias["{key}"][{bad[0]}] must be a finite number, got {repr(bad[1])[:40]}')
            else:
                found.append((int(key), tuple(float(v) for v in values)))
    return tuple(sorted(found))


def decode_mask(name: str, data: bytes, shape: ModelShape, model_name: str, fingerprint: str | None = None) -> Mask:
    """Validate the bytes of a mask file (read from disk or uploaded); ``name`` is what messages call it."""
    _check_mask_size(name, len(data))
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise HeadroomError(
            f"cannot read mask file {name}: byte 0x{data[e.start]:02x} at offset {e.start} is not UTF-8; "
            "save the mask as UTF-8 JSON"
        ) from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise HeadroomError(
            f"mask file {name} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}"
        ) from None
    except (ValueError, RecursionError) as e:  # an integer too long to convert, nesting too deep
        raise HeadroomError(f"mask file {name} is not valid JSON: {e}") from None
    return parse_mask(obj, shape, model_name, fingerprint)


def _check_mask_size(name: str, size: int) -> None:
    if size > MAX_MASK_BYTES:
        raise HeadroomError(
            f"mask file {name} is {size:,} bytes; a mask is at most {MAX_MASK_BYTES:,} bytes. "
            "Choose the .json that Headroom wrote (a saved mask or an export)"
        )


def load_mask(path: str | Path, shape: ModelShape, model_name: str, fingerprint: str | None = None) -> Mask:
    """Read and validate a mask file."""
    path = Path(path)
    try:
        _check_mask_size(str(path), path.stat().st_size)  # before reading it into memory
        data = path.read_bytes()
    except FileNotFoundError:
        raise HeadroomError(f"mask file {path} does not exist; check the path") from None
    except OSError as e:
        raise HeadroomError(f"cannot read mask file {path}: {e}") from None
    return decode_mask(str(path), data, shape, model_name, fingerprint)


def mask_warnings(mask: Mask, fingerprint: str | None) -> list[str]:
    """What about a valid mask the user should know before trusting its numbers; empty if nothing.

    A mask whose recorded fingerprint is not the loaded model's fits its shape (else parsing would
    have failed) but was chosen on other weights. A mask that leaves no layer any attention is legal
    and evaluated, but its perplexity describes a model that attends to nothing.
    """
    warnings = []
    if mask.fingerprint and fingerprint and mask.fingerprint != fingerprint:
        warnings.append(
            f"the mask was made for model '{mask.model_name}' with fingerprint {mask.fingerprint}, not the loaded "
            f"model ({fingerprint}); its shape fits, but heads chosen on other weights may mean little here"
        )
    if all(not any(mask.heads[i]) or mask.alpha[i] == 0.0 for i in range(mask.num_layers)):
        warnings.append(
            "the mask removes the attention of every layer (every head pruned or alpha = 0): "
            "perplexity is still computed, for a model that attends to nothing"
        )
    return warnings


@dataclass(frozen=True)
class Budget:
    """What a mask saves, on the three axes users match budgets on.

    ``attention_flops_per_token`` counts multiply-adds as 2 FLOPs for the attention block of every
    layer (q/k/v/o projections, scores and weighted values) for one token that attends to
    ``seqlen`` positions. ``kv_bytes_per_token`` is the KV cache one token adds across all layers,
    at the model's element size. Parameters are attention parameters removed, as a share of the
    whole model's (tied embeddings counted once). A mask's o_proj bias (v2) where the family has none
    adds ``hidden_size`` parameters to its layer, so it counts against the parameters removed.
    """

    seqlen: int
    params_total: int
    params_removed: int
    params_removed_pct: float
    kv_bytes_per_token: int
    kv_bytes_per_token_unpruned: int
    kv_bytes_per_token_saved: int
    attention_flops_per_token: int
    attention_flops_per_token_unpruned: int
    attention_flops_per_token_saved: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class _LayerCost:
    params: int
    kv_bytes: int
    flops: int


def _layer_cost(shape: ModelShape, spec: LayerSpec, seqlen: int) -> _LayerCost:
    """Attention parameters, KV bytes per token and FLOPs per token left in one layer."""
    d, hd = shape.hidden_size, shape.head_dim
    q = sum(spec.heads)
    groups = len({shape.kv_group(h) for h, keep in enumerate(spec.heads) if keep})
    o_bias = d if shape.o_bias or spec.bias is not None else 0  # a mask's bias is new where o_proj had none
    if spec.alpha == 0.0:
        return _LayerCost(0, 0, 0)

    def proj(n_heads: int) -> int:  # q, k or v rows of n_heads heads, with bias
        return n_heads * hd * d + (n_heads * hd if shape.qkv_bias else 0)

    o_params = q * hd * d + o_bias
    if spec.drop_qk:
        params = proj(groups) + o_params
        return _LayerCost(params, 0, 2 * (groups + q) * hd * d)
    # q and k rows computed: the kept heads', or every head's where the q/k norms span all heads (OLMo2)
    q_rows, k_rows = (shape.num_heads, shape.num_kv_heads) if shape.qk_norm_spans_heads and q else (q, groups)
    params = proj(q_rows) + proj(k_rows) + proj(groups) + o_params + (shape.qk_norm_params_per_layer if q else 0)
    kv = 2 * groups * hd * shape.bytes_per_element
    flops = 2 * (q_rows + q + k_rows + groups) * hd * d + 4 * q * hd * seqlen
    return _LayerCost(params, kv, flops)


def budget(mask: Mask, shape: ModelShape, seqlen: int) -> Budget:
    """Exact savings of ``mask``; grouped-query attention is counted per KV group, never averaged."""
    if seqlen < 1:
        raise HeadroomError(f"sequence length for the budget must be at least 1, got {seqlen}")
    if (mask.num_layers, mask.num_heads) != (shape.num_layers, shape.num_heads):
        raise HeadroomError(
            f"the mask is {mask.num_layers} layers x {mask.num_heads} heads but the model is "
            f"{shape.num_layers} x {shape.num_heads}; use a mask made for this model"
        )
    full = Mask.unpruned(shape, mask.model_name)
    left = [_layer_cost(shape, mask.layer(i), seqlen) for i in range(shape.num_layers)]
    base = [_layer_cost(shape, full.layer(i), seqlen) for i in range(shape.num_layers)]
    removed = sum(b.params - c.params for b, c in zip(base, left, strict=True))
    kv, kv0 = sum(c.kv_bytes for c in left), sum(c.kv_bytes for c in base)
    fl, fl0 = sum(c.flops for c in left), sum(c.flops for c in base)
    return Budget(
        seqlen=seqlen,
        params_total=shape.total_params,
        params_removed=removed,
        params_removed_pct=100.0 * removed / shape.total_params,
        kv_bytes_per_token=kv,
        kv_bytes_per_token_unpruned=kv0,
        kv_bytes_per_token_saved=kv0 - kv,
        attention_flops_per_token=fl,
        attention_flops_per_token_unpruned=fl0,
        attention_flops_per_token_saved=fl0 - fl,
    )


# ---- the mask in a link --------------------------------------------------------------------------
# `pruned=5:0.3,29:4` (layer:heads), `drop_qk=26,27`, `alpha=26:0.2,27:0.8`: the same mask as the v1
# JSON, short enough for a URL. Alphas are written so that they read back exactly.
QUERY_KEYS = ("pruned", "drop_qk", "alpha")


def _exact(value: float) -> str:
    """The shortest text that reads back as exactly ``value``: '0.5', and every digit when they matter."""
    text = f"{value:g}"
    return text if float(text) == value else repr(value)


def mask_to_query(mask: Mask) -> dict[str, str]:
    """The mask as query-string values (only :data:`QUERY_KEYS`); empty for the unpruned mask."""
    pruned = [
        f"{layer}:" + ".".join(str(h) for h, keep in enumerate(row) if not keep)
        for layer, row in enumerate(mask.heads)
        if not all(row)
    ]
    query = {
        "pruned": ",".join(pruned),
        "drop_qk": ",".join(str(i) for i in sorted(mask.drop_qk)),
        "alpha": ",".join(f"{layer}:{_exact(a)}" for layer, a in enumerate(mask.alpha) if a != 1.0),
    }
    return {k: v for k, v in query.items() if v}


def mask_from_query(query: dict[str, str], shape: ModelShape, model_name: str, fingerprint: str | None = None) -> Mask:
    """Inverse of :func:`mask_to_query`, validated like a mask file (HeadroomError says what is wrong)."""

    def pairs(key: str) -> Iterable[tuple[int, str]]:
        for item in filter(None, query.get(key, "").split(",")):
            layer, sep, rest = item.partition(":")
            if not sep or not layer.isdigit():
                raise HeadroomError(f"the link's '{key}' entry '{item}' is not 'layer:value'")
            yield int(layer), rest

    try:
        heads = [[1] * shape.num_heads for _ in range(shape.num_layers)]
        for layer, rest in pairs("pruned"):
            for head in rest.split("."):
                heads[layer][int(head)] = 0
        obj = {
            "format": FORMAT,
            "version": VERSION,
            "heads": heads,
            "drop_qk": [int(i) for i in filter(None, query.get("drop_qk", "").split(","))],
            "alpha": {str(layer): float(value) for layer, value in pairs("alpha")},
        }
    except (ValueError, IndexError) as e:
        raise HeadroomError(f"the link's mask does not fit this model ({e})") from None
    try:
        return parse_mask(obj, shape, model_name, fingerprint)
    except HeadroomError as e:
        raise HeadroomError(f"the link's mask is invalid: {e}") from None
