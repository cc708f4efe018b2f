"""The model an export writes: the source's weights with a mask's pruning and alphas built in.

Two kinds:

* ``compact``: the pruned parts are physically gone. Query heads' q_proj rows and o_proj columns,
  KV groups whose query heads are all pruned, q/k (and their q/k norms) of drop-QK layers, and
  the whole attention of alpha = 0 layers are removed; alpha is folded into the weights. Where the q/k
  norms span every head (OLMo2), pruned heads keep their q/k rows, which the norm reads. Layers may
  end with different head counts, so the directory ships its modeling code
  (``analysis/exported/``, loaded through ``auto_map`` with ``trust_remote_code=True``).
* ``stock``: the source architecture with pruned heads zeroed and alpha folded: no remote code, but
  no smaller and no faster. A mask with drop-QK layers cannot be expressed this way.

Alpha scales the branch where it joins the residual stream (``Architecture.branch_output``); the adapter
says which tensors carry it (``Architecture.branch_scale_state``: o_proj's weight and bias, or the weight of
a post-attention norm, which would undo any scale of its input). A fused qkv projection (Phi-3) is sliced
into its q, k and v rows and fused again from the kept rows (``Architecture.qkv_state``).

Every built model is compared with the masked model (``apply_mask``) on a few tokens
(:func:`logit_difference`, within :func:`max_logit_difference`) before anything is written.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from analysis.architecture import Architecture, ModelShape, Projection
from analysis.errors import HeadroomError
from analysis.exported.configuration_headroom import ATTENTION, DROP_QK, NONE
from analysis.intervention import apply_mask
from analysis.masks import Mask

CHECK_TOKENS = 64  # tokens of the evaluation text on which every export is compared with the masked model
# float32: an export further off than this is a bug and is not written. 1e-4, or this many float32
# epsilons of the largest |logit| when that is more: folding alphas up to 1.35 into weights and dropping
# 24 KV groups (the KV 12,288 search mask) measured 1.41e-4 on the default model, about 40 eps of its
# largest logit, where one wrong head or a wrong alpha step is off by more than 1e-2.
MAX_LOGIT_DIFFERENCE = 1e-4
FLOAT32_EPSILONS = 128
# 16-bit exports: this many machine epsilons of the largest |logit|. The export folds alpha into weights
# rounded to the dtype and multiplies matrices of other shapes, so the two round differently: measured up
# to 1.7 eps on the default model in bfloat16 and 2.6 eps in float16, where one wrong head or a wrong
# alpha step (0.1) is off by 60 to 120 eps.
LOW_PRECISION_EPSILONS = 4


def max_logit_difference(dtype: torch.dtype, largest_logit: float) -> float:
    """The largest |logit difference| an export in ``dtype`` may have from the masked model."""
    if dtype == torch.float32:
        return max(MAX_LOGIT_DIFFERENCE, FLOAT32_EPSILONS * torch.finfo(dtype).eps * largest_logit)
    return LOW_PRECISION_EPSILONS * torch.finfo(dtype).eps * max(1.0, largest_logit)


# --- what each layer keeps ------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerStructure:
    """What one layer of an export keeps; heads are numbered as in the source."""

    kind: str  # ATTENTION, DROP_QK or NONE (see analysis/exported/configuration_headroom.py)
    query_heads: tuple[int, ...]
    kv_heads: tuple[int, ...]
    o_bias: bool = False  # o_proj gets a bias (the mask's) that the family's o_proj lacks

    def to_json(self) -> dict[str, Any]:
        """The layer's entry of the compact export's ``headroom_layers`` (``o_bias`` only where true)."""
        obj: dict[str, Any] = {"kind": self.kind, "query_heads": list(self.query_heads)}
        obj["kv_heads"] = list(self.kv_heads)
        return {**obj, "o_bias": True} if self.o_bias else obj


def layer_structure(mask: Mask, arch: Architecture) -> list[LayerStructure]:
    """Per layer: kind (attention / drop_qk / none), kept query heads and kept KV heads.

    A layer with every query head pruned adds only o_proj's bias, if any (the source's or the mask's): without
    one it is ``none``, with one it is a drop-QK layer with no heads (its output is the bias).
    """
    shape = arch.shape
    layers = []
    for i in range(shape.num_layers):
        spec = mask.layer(i)
        query = tuple(h for h, keep in enumerate(spec.heads) if keep)
        kv = tuple(sorted({shape.kv_group(h) for h in query}))
        if spec.alpha == 0.0 or (not query and not shape.o_bias and spec.bias is None):
            layers.append(LayerStructure(NONE, (), ()))
            continue
        kind = DROP_QK if spec.drop_qk or not query else ATTENTION
        layers.append(LayerStructure(kind, query, kv, o_bias=spec.bias is not None and not shape.o_bias))
    return layers


def _rows(heads: Sequence[int], head_dim: int) -> torch.Tensor:
    """Indices of the rows (or columns) of ``heads`` in a projection with heads of ``head_dim``."""
    return torch.tensor([h * head_dim + j for h in heads for j in range(head_dim)], dtype=torch.long)


def _keep(t: torch.Tensor, dim: int, rows: torch.Tensor, compact: bool) -> torch.Tensor:
    """Only ``rows`` along ``dim``: selected (compact) or the others zeroed (stock)."""
    if compact:
        return t.index_select(dim, rows)
    keep = torch.zeros(t.shape[dim], dtype=t.dtype)
    keep[rows] = 1
    return t * keep.view(-1, *([1] * (t.dim() - 1 - dim)))


def _keep_projection(
    projection: Projection, heads: Sequence[int], head_dim: int, compact: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The (weight, bias) rows of ``heads`` of a q, k or v projection, on the CPU (see ``_keep``)."""
    rows = _rows(heads, head_dim)
    weight = _keep(projection.weight.detach().to("cpu"), 0, rows, compact)
    bias = None if projection.bias is None else _keep(projection.bias.detach().to("cpu"), 0, rows, compact)
    return weight, bias


def _state_dict(arch: Architecture, mask: Mask, layers: list[LayerStructure], compact: bool) -> dict[str, torch.Tensor]:
    """The export's tensors on the CPU: the source's, with alpha folded and each layer's attention pruned.

    Alpha is folded first (``Architecture.branch_scale_state``), since scaling commutes with removing heads. Where
    the q/k norms span every head (``ModelShape.qk_norm_spans_heads``) q and k keep every head's rows.
    """
    names = {module: name for name, module in arch.model.named_modules()}
    # Unchanged tensors share storage with the source (never written); changed ones are new tensors.
    state = {name: t.detach().to("cpu") for name, t in arch.model.state_dict().items()}
    shape = arch.shape
    hd = shape.head_dim
    for i, layer in enumerate(layers):
        prefix = names[arch.attention(i)]
        o_scale = 1.0  # what alpha multiplies o_proj by: alpha, unless a post-attention norm carries it
        if mask.alpha[i] != 1.0:
            scaled = arch.branch_scale_state(i, mask.alpha[i])
            o_scale = mask.alpha[i] if f"{prefix}.o_proj.weight" in scaled else 1.0
            state.update(scaled)
        if (bias := mask.bias_of(i)) is not None:  # mask v2: folded into o_proj's bias, after alpha like the rest
            extra = torch.tensor(bias, dtype=state[f"{prefix}.o_proj.weight"].dtype) * o_scale
            state[f"{prefix}.o_proj.bias"] = state.get(f"{prefix}.o_proj.bias", 0.0) + extra
        own = {k.removeprefix(prefix + "."): state.pop(k) for k in list(state) if k.startswith(prefix + ".")}
        query, kv = layer.query_heads, layer.kv_heads
        q_heads, k_heads = (
            (range(shape.num_heads), range(shape.num_kv_heads)) if shape.qk_norm_spans_heads else (query, kv)
        )
        q, k, v = arch.query_key_value(i)
        kept: dict[str, torch.Tensor] = {}
        if layer.kind != NONE or not compact:
            kept["o_proj.weight"] = _keep(own["o_proj.weight"], 1, _rows(query, hd), compact)
            if "o_proj.bias" in own:
                kept["o_proj.bias"] = own["o_proj.bias"] * (1.0 if layer.kind != NONE else 0.0)
            values = _keep_projection(v, kv, hd, compact)
        if layer.kind == ATTENTION or not compact:
            queries, keys = (
                _keep_projection(q, q_heads, hd, compact),
                _keep_projection(k, k_heads, hd, compact),
            )
            kept.update(arch.qkv_state(queries, keys, values))
            kept.update({name: t for name, t in own.items() if name.startswith(("q_norm.", "k_norm."))})
        elif layer.kind == DROP_QK:
            kept.update(arch.qkv_state(None, None, values))
        state.update({f"{prefix}.{name}": t for name, t in kept.items()})
    return state


# --- building and checking the exported model ------------------------------------------------------


def _config_dict(arch: Architecture) -> dict[str, Any]:
    volatile = {"model_type", "architectures", "auto_map", "transformers_version", "dtype", "torch_dtype"}
    return {k: v for k, v in arch.config.to_dict().items() if k not in volatile}


def _build(cls: type, config: Any, state: dict[str, torch.Tensor]) -> nn.Module:
    """``cls(config)`` holding ``state`` (tied embeddings tied again), in eval mode, with no random init."""
    from transformers.initialization import no_init_weights

    with no_init_weights():
        model = cls(config)
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()
    return model.eval().requires_grad_(False)


def compact_model(arch: Architecture, mask: Mask) -> nn.Module:
    """The compact export of ``mask``: only the kept parts, on the modeling code of ``analysis/exported/``."""
    layers = layer_structure(mask, arch)
    config_class, model_class = arch.export_classes()
    config = config_class(
        **{
            **_config_dict(arch),
            "head_dim": arch.shape.head_dim,
            "headroom_layers": [layer.to_json() for layer in layers],
            "headroom_qkv_bias": arch.shape.qkv_bias,
            "headroom_o_bias": arch.shape.o_bias,
            "headroom_qk_norm_spans_heads": arch.shape.qk_norm_spans_heads,
        }
    )
    model = _build(model_class, config, _state_dict(arch, mask, layers, compact=True))
    config.register_for_auto_class()  # save_pretrained copies the modeling files and writes auto_map
    model.register_for_auto_class("AutoModelForCausalLM")
    return model


def check_stock(mask: Mask, shape: ModelShape) -> None:
    """Refuse a mask that a stock export cannot express: an o_proj bias the family lacks, or drop-QK."""
    if mask.bias and not shape.o_bias:
        raise HeadroomError(
            f"a stock export cannot express the mask's o_proj bias (layers {[i for i, _ in mask.bias]}): this "
            "family's o_proj has no bias. Use the compact kind (loads with trust_remote_code=True), which adds one",
            settings=("kind",),
        )
    if mask.drop_qk:
        raise HeadroomError(
            f"a stock export cannot express drop-QK (layers {sorted(mask.drop_qk)}): the source architecture always "
            "computes queries and keys. Use the compact kind (loads with trust_remote_code=True), or remove the "
            "drop-QK layers from the mask",
            settings=("kind",),
        )


def stock_model(arch: Architecture, mask: Mask) -> nn.Module:
    """The stock export of ``mask``: the source architecture, pruned heads zeroed and alpha folded."""
    check_stock(mask, arch.shape)
    config = type(arch.config).from_dict(arch.config.to_dict())
    return _build(type(arch.model), config, _state_dict(arch, mask, layer_structure(mask, arch), compact=False))


@torch.no_grad()
def logit_difference(
    arch: Architecture, mask: Mask, exported: nn.Module, input_ids: torch.Tensor
) -> tuple[float, float]:
    """Max |logit difference| between the export and the masked model (float32 logits, with any soft-capping),
    and the largest |logit| of the masked model."""
    with apply_mask(arch, mask):
        expected = arch.logits(arch.final_hidden(input_ids)).float().cpu()
    got = exported(input_ids=input_ids.cpu(), use_cache=False).logits.float()
    return float((got - expected).abs().max()), float(expected.abs().max())
