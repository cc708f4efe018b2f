"""Observing forward passes of the shared model without changing them.

``observe`` registers read-only hooks for the duration of a block. The model is shared between
sessions, so each hook fires only for passes run by the thread that installed it; the hooks return
None, so they never change what the model computes, and they are removed even if the block fails.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

PreHook = Callable[[nn.Module, tuple, dict], None]  # (module, args, kwargs)
PostHook = Callable[[nn.Module, tuple, Any], None]  # (module, args, output)


def hidden_of(output: Any) -> torch.Tensor:
    """The hidden-state part of a module output (attention modules return ``(output, weights)``)."""
    return output[0] if isinstance(output, tuple) else output


@contextmanager
def observe(
    pre: Sequence[tuple[nn.Module, PreHook]] = (), post: Sequence[tuple[nn.Module, PostHook]] = ()
) -> Iterator[None]:
    """Run the block with ``pre`` (forward-pre, with kwargs) and ``post`` (forward) hooks installed."""
    owner = threading.get_ident()

    def only_mine(hook: Callable[..., None]) -> Callable[..., None]:
        def watch(*args: Any) -> None:
            if threading.get_ident() == owner:
                hook(*args)

        return watch

    handles = [module.register_forward_pre_hook(only_mine(hook), with_kwargs=True) for module, hook in pre]
    handles += [module.register_forward_hook(only_mine(hook)) for module, hook in post]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
