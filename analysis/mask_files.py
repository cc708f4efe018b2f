"""Reading a mask: the v1/v2 JSON of ``shared/docs/protocol.md`` checked against the loaded model.

Parsing is all-or-nothing: every problem in a file is collected and reported together, and nothing
is returned unless the whole file fits the model.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from analysis.architecture import ModelShape
from analysis.errors import HeadroomError
from analysis.masks import FORMAT, VERSION, VERSION_BIAS, Bias, Mask, check_alpha

# A v1 mask of a 128-layer, 128-head model is about 35 KB; a v2 mask with a bias on every layer of the
# default model (30 x 576 floats) about 500 KB.
MAX_MASK_BYTES = 2**20
_KEYS = {"format", "version", "model", "heads", "drop_qk", "alpha", "bias", "note"}


def parse_mask(obj: Any, shape: ModelShape, model_name: str, fingerprint: str | None = None) -> Mask:
    """Validate a decoded v1 or v2 mask against the model; raise HeadroomError listing every problem."""
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
                alphas[int(key)] = check_alpha(value, f'alpha["{key}"]')
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
