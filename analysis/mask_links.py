"""The mask in a link: ``pruned=5:0.3,29:4`` (layer:heads), ``drop_qk=26,27``, ``alpha=26:0.2,27:0.8``.

The same mask as the v1 JSON, short enough for a URL. Alphas are written so that they read back
exactly.
"""

from __future__ import annotations

from collections.abc import Iterable

from analysis.architecture import ModelShape
from analysis.errors import HeadroomError
from analysis.mask_files import parse_mask
from analysis.masks import FORMAT, VERSION, Mask

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
