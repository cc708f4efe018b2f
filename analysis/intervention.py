"""Applying a mask to a model, reversibly and per thread.

``with apply_mask(arch, mask): ...`` is the only way a mask touches a model. On entry, small hooks
are installed on the shared model (once, reference-counted); they read the mask that is active *in
the calling thread's context* (a ``ContextVar``), so two sessions using the same model with
different masks at the same time each see their own. No weight is ever written. When the last
context on a model exits, every hook is removed and the model is exactly as loaded.

Per layer the hooks do three things:

* pruned query heads: the o_proj input slice of each pruned head is multiplied by zero, which is the
  same as removing that head's q_proj rows and o_proj columns;
* drop-QK: the attention module's forward is replaced by the per-token map
  ``o_proj(repeat_kv(v_proj(x)))`` (each token attends only to itself, see method.md);
* bias (mask v2): a vector added to o_proj's output, in drop-QK layers too, so before any
  post-attention norm and before alpha;
* alpha: the attention branch is scaled where it joins the residual stream, i.e. after Gemma's
  post-attention norm (``Architecture.branch_output``); alpha = 0 skips the branch entirely.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from analysis.architecture import Architecture
from analysis.hooks import hidden_arg
from analysis.masks import Mask


@dataclass(frozen=True)
class _Plan:
    """A mask turned into what the hooks need, with only the layers that change."""

    gates: dict[int, torch.Tensor]  # layer -> multiplier for the o_proj input (num_heads * head_dim)
    drop_qk: frozenset[int]
    alpha: dict[int, float]  # layer -> alpha, only where alpha != 1
    bias: dict[int, torch.Tensor]  # layer -> added to o_proj's output (hidden_size)


_ACTIVE: ContextVar[dict[int, _Plan] | None] = ContextVar("headroom_active_plans", default=None)
_LOCK = threading.Lock()
_INSTALLED: dict[int, tuple[int, list[Any]]] = {}  # id(model) -> (reference count, undo actions)


def _plan(arch: Architecture) -> _Plan | None:
    plans = _ACTIVE.get()
    return plans.get(id(arch.model)) if plans else None


def _make_plan(arch: Architecture, mask: Mask) -> _Plan:
    shape = arch.shape
    if (mask.num_layers, mask.num_heads) != (shape.num_layers, shape.num_heads):
        raise ValueError(
            f"mask shape {mask.num_layers}x{mask.num_heads} does not fit model {shape.num_layers}x{shape.num_heads}"
        )
    gates = {}
    for layer, row in enumerate(mask.heads):
        if not all(row):
            weight = arch.output_projection(layer).weight
            gate = torch.tensor(row, dtype=weight.dtype, device=weight.device)
            gates[layer] = gate.repeat_interleave(shape.head_dim)
    alpha = {i: a for i, a in enumerate(mask.alpha) if a != 1.0}
    bias = {}
    for layer, values in mask.bias:
        if len(values) != shape.hidden_size:
            raise ValueError(f"bias of layer {layer} has {len(values)} values, the hidden size is {shape.hidden_size}")
        weight = arch.output_projection(layer).weight
        bias[layer] = torch.tensor(values, dtype=weight.dtype, device=weight.device)
    return _Plan(gates=gates, drop_qk=frozenset(mask.drop_qk), alpha=alpha, bias=bias)


def drop_qk_attention(arch: Architecture, layer: int, hidden: torch.Tensor) -> torch.Tensor:
    """The drop-QK attention branch of ``layer``: ``o_proj(repeat_kv(v_proj(x)))``, per token.

    Query head h reads KV head ``h // group_size``, as in transformers' ``repeat_kv``; a fused qkv projection
    (Phi-3) computes only its value rows.
    """
    shape = arch.shape
    values = arch.query_key_value(layer)[2](hidden)
    values = values.view(*hidden.shape[:-1], shape.num_kv_heads, shape.head_dim)
    values = values.repeat_interleave(shape.group_size, dim=-2)
    return arch.output_projection(layer)(values.flatten(-2))


def _install(arch: Architecture) -> list[Any]:
    """Install the dispatching hooks on every layer; return how to undo them."""
    undo: list[Any] = []
    for layer in range(arch.shape.num_layers):
        attn = arch.attention(layer)

        def gate_input(module: nn.Module, args: tuple, layer: int = layer) -> tuple | None:
            plan = _plan(arch)
            if plan is None or layer not in plan.gates:
                return None
            return (args[0] * plan.gates[layer], *args[1:])

        def add_bias(module: nn.Module, args: tuple, output: torch.Tensor, layer: int = layer) -> torch.Tensor | None:
            plan = _plan(arch)
            if plan is None or layer not in plan.bias:
                return None
            return output + plan.bias[layer]

        def scale_branch(module: nn.Module, args: tuple, output: Any, layer: int = layer) -> Any:
            plan = _plan(arch)
            if plan is None or layer not in plan.alpha:
                return None
            a = plan.alpha[layer]
            if isinstance(output, tuple):  # attention modules return (output, weights)
                return (output[0] * a, *output[1:])
            return output * a

        original = type(attn).forward.__get__(attn)

        def forward(
            *args: Any, layer: int = layer, attn: nn.Module = attn, original: Any = original, **kwargs: Any
        ) -> Any:
            plan = _plan(arch)
            if plan is None or (layer not in plan.drop_qk and plan.alpha.get(layer) != 0.0):
                return original(*args, **kwargs)
            hidden = hidden_arg(args, kwargs)
            if plan.alpha.get(layer) == 0.0:  # the branch is removed: compute nothing
                return torch.zeros_like(hidden), None
            return drop_qk_attention(arch, layer, hidden), None

        undo.append(arch.output_projection(layer).register_forward_pre_hook(gate_input))
        undo.append(arch.output_projection(layer).register_forward_hook(add_bias))
        undo.append(arch.branch_output(layer).register_forward_hook(scale_branch))
        attn.forward = forward
        undo.append(attn)
    return undo


def _uninstall(undo: list[Any]) -> None:
    for item in undo:
        if isinstance(item, nn.Module):
            del item.forward
        else:
            item.remove()


@contextmanager
def apply_mask(arch: Architecture, mask: Mask | None) -> Iterator[None]:
    """Run the block with ``mask`` applied to ``arch.model`` in this thread only.

    Nesting on the same model replaces the outer mask for the inner block; ``None`` or an unpruned
    mask inside an outer one runs the block unpruned.
    """
    key = id(arch.model)
    if mask is None or mask.is_unpruned:
        plans = _ACTIVE.get() or {}
        if key not in plans:  # nothing to undo: leave the hooks alone
            yield
            return
        token = _ACTIVE.set({k: v for k, v in plans.items() if k != key})  # unpruned inside an outer mask
        try:
            yield
        finally:
            _ACTIVE.reset(token)
        return
    plan = _make_plan(arch, mask)
    with _LOCK:
        count, undo = _INSTALLED.get(key, (0, None))
        _INSTALLED[key] = (count + 1, undo if undo is not None else _install(arch))
    token = _ACTIVE.set({**(_ACTIVE.get() or {}), key: plan})
    try:
        yield
    finally:
        _ACTIVE.reset(token)
        with _LOCK:
            count, undo = _INSTALLED[key]
            if count == 1:
                del _INSTALLED[key]
                _uninstall(undo)
            else:
                _INSTALLED[key] = (count - 1, undo)
