"""The architecture adapter: the one place that knows how model families differ.

Every other module asks the adapter for layers, projections, head counts and the module whose output
is added to the residual stream; nothing else looks at ``model_type``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from itertools import pairwise
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from analysis.errors import HeadroomError

# model_type -> family name shown to users. Gemma3 means the text model (Gemma3ForCausalLM).
FAMILIES: dict[str, str] = {
    "llama": "Llama",
    "mistral": "Mistral",
    "qwen2": "Qwen2",
    "gemma2": "Gemma2",
    "gemma3_text": "Gemma3",
    "qwen3": "Qwen3",
    "phi3": "Phi-3",
    "olmo2": "OLMo2",
    "smollm3": "SmolLM3",
}
# Families whose attention output passes through a norm before the residual add (OLMo2 has no pre-norm at all).
_POST_ATTENTION_NORM = {"gemma2", "gemma3_text", "olmo2"}
# Families whose RMSNorm multiplies by ``1 + w`` instead of ``w``.
_NORM_WEIGHT_OFFSET = {"gemma2", "gemma3_text"}
# Families whose attention soft-caps its logits (Gemma3 has the config field but does not apply it).
_ATTENTION_SOFTCAP = {"gemma2"}
# Families with one fused ``qkv_proj``: the rows of every query head, then of every key head, then of every value head.
_FUSED_QKV = {"phi3"}
# Families whose q/k norms span the whole projection (every head at once) rather than each head's head_dim.
_QK_NORM_SPANS_HEADS = {"olmo2"}


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
    qk_norm_params_per_layer: int  # q/k norms (Gemma3, Qwen3, OLMo2), removed with q/k
    total_params: int
    bytes_per_element: int  # of the model's weights and KV cache as loaded
    # OLMo2: the q/k norms span every head, so pruning a query head (or a KV group) keeps its q (k) rows: the
    # norm of the kept heads reads them. Only drop-QK and alpha = 0 remove q/k.
    qk_norm_spans_heads: bool = False

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


WeightBias = tuple[torch.Tensor, torch.Tensor | None]
H = TypeVar("H")


@dataclass(frozen=True)
class Projection:
    """One of q, k, v of a layer: its weight rows ``[heads * head_dim, hidden]`` and bias, as views of the model's
    parameters (a fused ``qkv_proj`` is sliced, not copied). Read only: never write through them."""

    weight: torch.Tensor
    bias: torch.Tensor | None

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.weight, self.bias)


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

    def query_key_value(self, layer: int) -> tuple[Projection, Projection, Projection]:
        """The q, k and v projections of ``layer``, separate or sliced out of a fused ``qkv_proj`` (Phi-3)."""
        attn = self.attention(layer)
        if self.config.model_type not in _FUSED_QKV:
            return tuple(Projection(p.weight, p.bias) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
        s = self.shape
        q_rows, kv_rows = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
        bounds = (0, q_rows, q_rows + kv_rows, q_rows + 2 * kv_rows)
        fused = attn.qkv_proj
        return tuple(
            Projection(fused.weight[a:b], None if fused.bias is None else fused.bias[a:b]) for a, b in pairwise(bounds)
        )

    def output_projection(self, layer: int) -> nn.Linear:
        """o_proj, the per-head output site: its input is the query heads' outputs side by side (head h owns
        columns ``h * head_dim ... (h + 1) * head_dim - 1``), passed positionally. Gating a head, reading what it
        outputs, or what it writes (its columns of the weight) all happen here."""
        return self.attention(layer).o_proj

    def head_output_hooks(self, hook: Callable[[int], H]) -> list[tuple[nn.Linear, H]]:
        """``(output_projection(l), hook(l))`` for every layer ``l``: the pre-hooks that read or gate every head."""
        return [(self.output_projection(layer), hook(layer)) for layer in range(len(self.layers))]

    def qkv_state(self, q: WeightBias | None, k: WeightBias | None, v: WeightBias) -> dict[str, torch.Tensor]:
        """State-dict entries (names inside the attention module) of (weight, bias) pairs of q, k and v.

        With q and k given, the family's own layout (Phi-3 fuses them into ``qkv_proj``, q rows first); with
        only v (an exported drop-QK layer), ``v_proj``.
        """
        parts = {"q_proj": q, "k_proj": k, "v_proj": v} if q is not None else {"v_proj": v}
        if q is not None and self.config.model_type in _FUSED_QKV:
            weights, biases = zip(*parts.values(), strict=True)
            parts = {"qkv_proj": (torch.cat(weights), None if biases[0] is None else torch.cat(biases))}
        state = {f"{name}.weight": weight for name, (weight, _) in parts.items()}
        state.update({f"{name}.bias": bias for name, (_, bias) in parts.items() if bias is not None})
        return state

    def branch_output(self, layer: int) -> nn.Module:
        """The module whose output is added to the residual stream as the attention branch.

        Llama/Mistral/Qwen2/Qwen3/Phi-3/SmolLM3 add the attention output directly; Gemma2/Gemma3/OLMo2
        normalise it first (``post_attention_layernorm``), so a branch scale must act after that norm.
        """
        block = self.layers[layer]
        return block.post_attention_layernorm if self.has_post_attention_norm else block.self_attn

    def branch_scale_state(self, layer: int, alpha: float) -> dict[str, torch.Tensor]:
        """New state-dict entries (full names, on the CPU) that make ``layer``'s attention branch ``alpha`` times
        what it is, where it joins the residual stream (``branch_output``).

        Without a post-attention norm: o_proj's weight and bias times alpha. With one, its input's scale is
        normalised away, so alpha goes into the norm's weight: ``alpha * w`` (OLMo2), or for Gemma's RMSNorm,
        which computes ``x_hat * (1 + w)``, ``alpha * (1 + w) - 1``.
        """
        names = {module: name for name, module in self.model.named_modules()}
        if not self.has_post_attention_norm:
            o = self.output_projection(layer)
            return {f"{names[o]}.{k}": t.detach().to("cpu") * alpha for k, t in o.named_parameters()}
        norm = self.branch_output(layer)
        offset = 1.0 if self.config.model_type in _NORM_WEIGHT_OFFSET else 0.0
        return {f"{names[norm]}.weight": alpha * (offset + norm.weight.detach().to("cpu")) - offset}

    def export_classes(self) -> tuple[type, type]:
        """The config and causal-LM classes of this family's compact export (``analysis/exported``)."""
        from analysis.exported import modeling_headroom
        from analysis.exported.configuration_headroom import CONFIGS

        return CONFIGS[self.config.model_type], getattr(modeling_headroom, f"Headroom{type(self.model).__name__}")

    def attention_probabilities(
        self, layer: int, hidden: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        """Softmax attention weights ``[batch, heads, query, key]`` (float32) of ``layer``.

        Recomputed from the layer's own q/k projections, q/k norms, rotary embedding (partial for Phi-3, absent
        in SmolLM3's NoPE layers), scaling, logit soft-capping and sliding window, exactly as the family's eager
        attention computes them, for an unpadded batch; ``hidden`` and ``position_embeddings`` are what the
        attention module received. The model keeps its own attention implementation (sdpa returns no weights).
        """
        attn = self.attention(layer)
        t = hidden.shape[1]
        q, k = self._rotated_queries_keys(layer, hidden, position_embeddings)
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

    def _rotated_queries_keys(
        self, layer: int, hidden: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries and keys ``[batch, heads, seq, head_dim]`` as the layer's attention scores them."""
        attn = self.attention(layer)
        b, t, _ = hidden.shape
        q_proj, k_proj, _ = self.query_key_value(layer)
        q, k = q_proj(hidden), k_proj(hidden)
        spans = self.config.model_type in _QK_NORM_SPANS_HEADS
        if spans:  # OLMo2: one norm over every head's rows
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = (x.view(b, t, -1, self.shape.head_dim).transpose(1, 2) for x in (q, k))
        if hasattr(attn, "q_norm") and not spans:  # Gemma3, Qwen3: per head, over head_dim
            q, k = attn.q_norm(q), attn.k_norm(k)
        if getattr(attn, "use_rope", True):  # SmolLM3's NoPE layers have none
            q, k = sys.modules[type(attn).__module__].apply_rotary_pos_emb(q, k, *position_embeddings)
        return q, k

    def _sliding_window(self, layer: int) -> int | None:
        """Mistral and Phi-3 window every layer (config); Qwen2/3, Gemma and SmolLM3 set it per layer on the module."""
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
        o_proj = attn.o_proj
        qkv = attn.qkv_proj if c.model_type in _FUSED_QKV else attn.q_proj
        return ModelShape(
            num_layers=len(self.layers),
            num_heads=num_heads,
            num_kv_heads=c.num_key_value_heads,
            head_dim=head_dim,
            hidden_size=c.hidden_size,
            qkv_bias=qkv.bias is not None,
            o_bias=o_proj.bias is not None,
            qk_norm_params_per_layer=qk_norm,
            total_params=count_parameters(self.model),
            bytes_per_element=o_proj.weight.element_size(),
            qk_norm_spans_heads=c.model_type in _QK_NORM_SPANS_HEADS,
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
