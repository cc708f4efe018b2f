"""The architecture adapter: the one place that knows how model families differ.

Every other module asks the adapter for layers, projections, head counts and the module whose output
is added to the residual stream; nothing else looks at ``model_type``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from torch import nn

from analysis.errors import HeadroomError

# model_type -> family name shown to users. Gemma3 means the text model (Gemma3ForCausalLM).
FAMILIES: dict[str, str] = {
    "llama": "Llama",
    "mistral": "Mistral",
    "qwen2": "Qwen2",
    "gemma2": "Gemma2",
    "gemma3_text": "Gemma3",
}
# Families whose attention output passes through a norm before the residual add.
_POST_ATTENTION_NORM = {"gemma2", "gemma3_text"}
# Families whose attention soft-caps its logits (Gemma3 has the config field but does not apply it).
_ATTENTION_SOFTCAP = {"gemma2"}


@dataclass(frozen=True)
class ModelShape:
    """The numbers that masks and budgets need; no weights."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    qkv_bias: bool
    o_bias: bool
    qk_norm_params_per_layer: int  # Gemma3's per-head-dim q/k norms, removed with q/k
    total_params: int
    bytes_per_element: int  # of the model's weights and KV cache as loaded

    @property
    def group_size(self) -> int:
        """Query heads sharing one KV head."""
        return self.num_heads // self.num_kv_heads

    def kv_group(self, head: int) -> int:
        """The KV head that query head ``head`` reads (transformers' ``repeat_kv`` order)."""
        return head // self.group_size


def check_supported(model_type: str) -> None:
    if model_type not in FAMILIES:
        names = ", ".join(f"{v} ({k})" for k, v in FAMILIES.items())
        raise HeadroomError(
            f"model type '{model_type}' is not supported; Headroom supports {names}. "
            "Pick a checkpoint of one of these families."
        )


class Architecture:
    """Family-specific access to a loaded causal LM."""

    def __init__(self, model: nn.Module) -> None:
        config = model.config
        check_supported(config.model_type)
        self.model = model
        self.config = config
        self.family = FAMILIES[config.model_type]
        self.has_post_attention_norm = config.model_type in _POST_ATTENTION_NORM
        self.decoder: nn.Module = model.model
        self.layers: nn.ModuleList = self.decoder.layers
        self.shape = self._shape()

    def attention(self, layer: int) -> nn.Module:
        return self.layers[layer].self_attn

    def projections(self, layer: int) -> tuple[nn.Linear, nn.Linear, nn.Linear, nn.Linear]:
        attn = self.attention(layer)
        return attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj

    def branch_output(self, layer: int) -> nn.Module:
        """The module whose output is added to the residual stream as the attention branch.

        Llama/Mistral/Qwen2 add the attention output directly; Gemma2/Gemma3 normalise it first
        (``post_attention_layernorm``), so a branch scale must act after that norm.
        """
        block = self.layers[layer]
        return block.post_attention_layernorm if self.has_post_attention_norm else block.self_attn

    def attention_probabilities(
        self, layer: int, hidden: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        """Softmax attention weights ``[batch, heads, query, key]`` (float32) of ``layer``.

        Recomputed from the layer's own q/k projections, q/k norms, rotary embedding, scaling, logit
        soft-capping and sliding window, exactly as the family's eager attention computes them, for an
        unpadded batch; ``hidden`` and ``position_embeddings`` are what the attention module received.
        The model keeps its own attention implementation (sdpa does not return weights).
        """
        attn = self.attention(layer)
        b, t, _ = hidden.shape
        hd = self.shape.head_dim
        q = attn.q_proj(hidden).view(b, t, -1, hd).transpose(1, 2)
        k = attn.k_proj(hidden).view(b, t, -1, hd).transpose(1, 2)
        if hasattr(attn, "q_norm"):  # Gemma3
            q, k = attn.q_norm(q), attn.k_norm(k)
        rotary = sys.modules[type(attn).__module__].apply_rotary_pos_emb
        q, k = rotary(q, k, *position_embeddings)
        k = k.repeat_interleave(self.shape.group_size, dim=1)  # repeat_kv order
        scores = (q.float() @ k.float().transpose(-1, -2)) * attn.scaling
        cap = attn.attn_logit_softcapping if self.config.model_type in _ATTENTION_SOFTCAP else None
        if cap is not None:
            scores = torch.tanh(scores / cap) * cap
        query = torch.arange(t, device=hidden.device)[:, None]
        key = torch.arange(t, device=hidden.device)[None, :]
        allowed = key <= query
        window = self._sliding_window(layer)
        if window is not None:
            allowed &= query - key < window
        return scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)

    def _sliding_window(self, layer: int) -> int | None:
        """Mistral windows every layer (config); Qwen2 and Gemma set it per layer on the module."""
        attn = self.attention(layer)
        if hasattr(attn, "sliding_window"):
            return attn.sliding_window
        return getattr(self.config, "sliding_window", None)

    def final_hidden(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The decoder's final-normed hidden states for ``input_ids`` (moved to the input device), no cache."""
        device = self.model.get_input_embeddings().weight.device
        return self.decoder(input_ids=input_ids.to(device), use_cache=False).last_hidden_state

    def final_norm(self) -> nn.Module:
        return self.decoder.norm

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Language-model head on final-normed hidden states, with Gemma's soft-capping."""
        logits = self.model.lm_head(hidden)
        cap = getattr(self.config, "final_logit_softcapping", None)
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def _shape(self) -> ModelShape:
        c = self.config
        num_heads = c.num_attention_heads
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // num_heads
        attn = self.attention(0)
        qk_norm = sum(
            p.numel() for name in ("q_norm", "k_norm") if hasattr(attn, name) for p in getattr(attn, name).parameters()
        )
        weight = attn.o_proj.weight
        return ModelShape(
            num_layers=len(self.layers),
            num_heads=num_heads,
            num_kv_heads=c.num_key_value_heads,
            head_dim=head_dim,
            hidden_size=c.hidden_size,
            qkv_bias=attn.q_proj.bias is not None,
            o_bias=attn.o_proj.bias is not None,
            qk_norm_params_per_layer=qk_norm,
            total_params=count_parameters(self.model),
            bytes_per_element=weight.element_size(),
        )


def count_parameters(model: nn.Module) -> int:
    """Parameters counted once each (tied embeddings are one tensor)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total
