"""What a mask saves: attention parameters, KV-cache bytes and attention FLOPs per token."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from analysis.architecture import ModelShape
from analysis.errors import HeadroomError
from analysis.masks import LayerSpec, Mask


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
