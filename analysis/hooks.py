"""Hooks on the shared model for the duration of a block, for the installing thread only.

``observe`` registers hooks for the duration of a block. The model is shared between sessions, so
each hook fires only for passes run by the thread that installed it, and the hooks are removed even
if the block fails. Observers return None and so change nothing; a hook that returns a value
replaces the module's input or output as torch hooks do (the gradient metric's per-head gates) -
in this thread only. Masks never go this way: they use ``analysis.intervention.apply_mask``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

PreHook = Callable[[nn.Module, tuple, dict], Any]  # (module, args, kwargs)
PostHook = Callable[[nn.Module, tuple, Any], Any]  # (module, args, output)


def hidden_arg(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden-state input of a module call, whether passed by position or as ``hidden_states``."""
    return args[0] if args else kwargs["hidden_states"]


def hidden_of(output: Any) -> torch.Tensor:
    """The hidden-state part of a module output (attention modules return ``(output, weights)``)."""
    return output[0] if isinstance(output, tuple) else output


@contextmanager
def observe(
    pre: Sequence[tuple[nn.Module, PreHook]] = (), post: Sequence[tuple[nn.Module, PostHook]] = ()
) -> Iterator[None]:
    """Run the block with ``pre`` (forward-pre, with kwargs) and ``post`` (forward) hooks installed."""
    owner = threading.get_ident()

    def only_mine(hook: Callable[..., Any]) -> Callable[..., Any]:
        def watch(*args: Any) -> Any:
            return hook(*args) if threading.get_ident() == owner else None

        return watch

    handles = [module.register_forward_pre_hook(only_mine(hook), with_kwargs=True) for module, hook in pre]
    handles += [module.register_forward_hook(only_mine(hook)) for module, hook in post]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
