"""Modeling code of a Headroom compact export: the family's own causal LM with its attention pruned.

One generic implementation for every supported family. ``HeadroomXForCausalLM`` is the family's own
``XForCausalLM`` (same embeddings, MLPs, norms, rotary embedding, masks, cache and generation code);
only each layer's ``self_attn`` is replaced, as ``config.headroom_layers`` says:

* ``attention``: the family's own attention class over the kept heads. After pruning, the kept query
  heads may read the kept KV heads unevenly (kept heads {0, 1, 5} of 3 groups read kv {0, 0, 1});
  then the keys and values of the kept KV heads (all the cache stores) are indexed per query head
  instead of the family's uniform ``repeat_kv``.
* ``drop_qk``: ``o_proj(v_proj(x))`` per token, each kept query head reading its KV head's values
  (HARP's layer with the query and key projections removed); it keeps no KV cache.
* ``none``: no attention branch (alpha = 0): it returns zeros and keeps nothing.

The branch scale alpha is already folded into the weights (o_proj, or Gemma's post-attention norm).
Only torch and transformers are imported: this file travels inside the export.
"""

from __future__ import annotations

from typing import Any

import torch
import transformers
from torch import nn
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from .configuration_headroom import ATTENTION, CONFIGS, DROP_QK, MODEL_TYPES


def kv_of_query(layer: dict[str, Any], group_size: int) -> list[int]:
    """For each kept query head, the position among the kept KV heads of the KV head it reads."""
    return [layer["kv_heads"].index(head // group_size) for head in layer["query_heads"]]


class _Index:
    """A head index built on the device where it is used.

    Not a buffer: from_pretrained builds the model on the meta device and restores only buffers it
    knows, so the index stays a Python list until the first forward.
    """

    def __init__(self, heads: list[int]) -> None:
        self.heads = heads
        self._tensor: torch.Tensor | None = None

    def on(self, device: torch.device) -> torch.Tensor:
        if self._tensor is None or self._tensor.device != device:
            self._tensor = torch.tensor(self.heads, dtype=torch.long, device=device)
        return self._tensor


class _PerQueryHeadKV:
    """Stands in for the cache inside the family's attention forward.

    The real cache (if any) stores the kept KV heads only; the attention computation receives one
    key/value head per kept query head.
    """

    def __init__(self, cache: Any, index: _Index) -> None:
        self.cache = cache
        self.index = index

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any) -> Any:
        if self.cache is not None:
            keys, values = self.cache.update(keys, values, layer_idx, *args, **kwargs)
        index = self.index.on(keys.device)
        return keys.index_select(1, index), values.index_select(1, index)


class _KeptHeads:
    """Mixin over a family's attention class for uneven query-to-KV-head maps (see the module docstring)."""

    uneven_kv: _Index | None = None

    def forward(self, *args: Any, past_key_values: Any = None, **kwargs: Any) -> Any:
        if self.uneven_kv is not None:
            past_key_values = _PerQueryHeadKV(past_key_values, self.uneven_kv)
        return super().forward(*args, past_key_values=past_key_values, **kwargs)


class _LayerConfig:
    """The model's config as one pruned layer's attention sees it: that layer's head counts, everything else read
    from the model's config (so a later change of the attention implementation reaches this layer too). Attention
    code reads head counts from ``self.config`` in its forward as well (Phi-3 splits its fused projection so)."""

    def __init__(self, config: Any, num_attention_heads: int, num_key_value_heads: int) -> None:
        self.__dict__.update(
            _model_config=config, num_attention_heads=num_attention_heads, num_key_value_heads=num_key_value_heads
        )

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["_model_config"], name)


class _KeptRows:
    """Mixin over a norm class: normalise every row, then keep only ``rows`` (a norm spanning every head)."""

    rows: _Index

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return super().forward(hidden_states).index_select(-1, self.rows.on(hidden_states.device))


def _norm_every_head(attn: nn.Module, config: Any, layer: dict[str, Any]) -> None:
    """q/k norms spanning every head (OLMo2): q_proj and k_proj keep every head's rows, and their norms pass on
    only the kept heads' rows, so the kept heads are normalised exactly as in the source model."""
    hd = config.head_dim
    for name, heads, total in (
        ("q", layer["query_heads"], config.num_attention_heads),
        ("k", layer["kv_heads"], config.num_key_value_heads),
    ):
        proj, norm = getattr(attn, f"{name}_proj"), getattr(attn, f"{name}_norm")
        setattr(attn, f"{name}_proj", nn.Linear(proj.in_features, total * hd, bias=proj.bias is not None))
        kept = type(f"Headroom{type(norm).__name__}", (_KeptRows, type(norm)), {})(total * hd, norm.variance_epsilon)
        kept.rows = _Index([h * hd + j for h in heads for j in range(hd)])
        setattr(attn, f"{name}_norm", kept)


def _attention(family_attention: type, config: Any, layer_idx: int, layer: dict[str, Any]) -> nn.Module:
    """The family's attention module sized to the kept heads."""
    group_size = config.num_attention_heads // config.num_key_value_heads
    index = kv_of_query(layer, group_size)
    n_q, n_kv = len(index), len(layer["kv_heads"])
    cls = type(f"Headroom{family_attention.__name__}", (_KeptHeads, family_attention), {})
    attn = cls(_LayerConfig(config, n_q, n_kv), layer_idx)
    if getattr(config, "headroom_qk_norm_spans_heads", False):
        _norm_every_head(attn, config, layer)
    if n_q % n_kv == 0 and index == [i // (n_q // n_kv) for i in range(n_q)]:
        attn.num_key_value_groups = n_q // n_kv  # even groups: the family's own repeat_kv path
    else:
        attn.num_key_value_groups = 1  # keys and values arrive already one per query head
        attn.uneven_kv = _Index(index)
    return attn


class DropQKAttention(nn.Module):
    """``o_proj(v_proj(x))`` per token over the kept heads: each token attends only to itself."""

    def __init__(self, config: Any, layer: dict[str, Any]) -> None:
        super().__init__()
        group_size = config.num_attention_heads // config.num_key_value_heads
        self.head_dim = config.head_dim
        kv_rows, o_columns = len(layer["kv_heads"]) * self.head_dim, len(layer["query_heads"]) * self.head_dim
        self.v_proj = nn.Linear(config.hidden_size, kv_rows, bias=config.headroom_qkv_bias)
        self.o_proj = nn.Linear(o_columns, config.hidden_size, bias=config.headroom_o_bias)
        self.kv_of_query = _Index(kv_of_query(layer, group_size))

    def forward(self, hidden_states: torch.Tensor, **kwargs: Any) -> tuple[torch.Tensor, None]:
        values = self.v_proj(hidden_states).unflatten(-1, (-1, self.head_dim))
        return self.o_proj(values.index_select(-2, self.kv_of_query.on(values.device)).flatten(-2)), None


def _with_o_bias(attn: nn.Module, layer: dict[str, Any]) -> nn.Module:
    """``attn`` with a biased o_proj where the layer's mask adds a bias the family's o_proj lacks (``o_bias``)."""
    if layer.get("o_bias") and attn.o_proj.bias is None:
        attn.o_proj = nn.Linear(attn.o_proj.in_features, attn.o_proj.out_features, bias=True)
    return attn


class NoAttention(nn.Module):
    """A layer whose attention branch was removed (alpha = 0): it adds nothing and keeps nothing."""

    def forward(self, hidden_states: torch.Tensor, **kwargs: Any) -> tuple[torch.Tensor, None]:
        return torch.zeros_like(hidden_states), None


def _causal_lm_class(family: str) -> type:
    base = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[family])

    def __init__(self, config: Any) -> None:
        base.__init__(self, config)
        for i, layer in enumerate(self.model.layers):
            spec = config.headroom_layers[i]
            if spec["kind"] == ATTENTION:
                layer.self_attn = _with_o_bias(_attention(type(layer.self_attn), config, i, spec), spec)
            elif spec["kind"] == DROP_QK:
                layer.self_attn = _with_o_bias(DropQKAttention(config, spec), spec)
            else:
                layer.self_attn = NoAttention()

    return type(
        f"Headroom{base.__name__}",
        (base,),
        {"config_class": CONFIGS[family], "__init__": __init__, "__doc__": f"{base.__name__} with pruned attention."},
    )


CAUSAL_LMS = {model_type: _causal_lm_class(model_type) for model_type in MODEL_TYPES}
# ``auto_map`` in an export's config.json names a class of this module (``HeadroomLlamaForCausalLM``, ...).
globals().update({causal_lm.__name__: causal_lm for causal_lm in CAUSAL_LMS.values()})
