"""Greedy continuations of a prompt under a mask, for comparing a pruned model with the unpruned one by eye.

Decoding uses the model's own KV cache. A drop-QK layer (and a layer whose attention branch is
removed) needs none: its hooked attention (``analysis.intervention``) is a per-token map that
neither reads nor writes the cache, so that layer's cache stays empty, as the compact export's
layers that store nothing do; every other layer caches its keys and values as usual.
"""

from __future__ import annotations

import torch

from analysis.architecture import Architecture
from analysis.errors import HeadroomError
from analysis.intervention import apply_mask
from analysis.loading import LoadedModel
from analysis.masks import Mask

MAX_NEW_TOKENS = 256


@torch.no_grad()
def greedy_tokens(
    arch: Architecture, ids: torch.Tensor, mask: Mask | None, new_tokens: int, pad_id: int
) -> torch.Tensor:
    """The ``new_tokens`` greedy next tokens after ``ids`` ``[1, t]`` under ``mask``, decoded with the KV cache."""
    with apply_mask(arch, mask):
        out = arch.model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            do_sample=False,
            use_cache=True,
            pad_token_id=pad_id,
        )
    return out[:, ids.shape[1] :]


def greedy_continuation(lm: LoadedModel, prompt: str, mask: Mask | None = None, new_tokens: int = 24) -> str:
    """The ``new_tokens`` most likely next tokens after ``prompt`` (greedy), decoded; ``mask`` None is unpruned."""
    if not prompt.strip():
        raise HeadroomError("the prompt is empty; type a few words for the models to continue")
    if not 1 <= new_tokens <= MAX_NEW_TOKENS:
        raise HeadroomError(f"new tokens must be between 1 and {MAX_NEW_TOKENS}, got {new_tokens}")
    ids = lm.tokenizer(prompt, return_tensors="pt").input_ids.to(lm.model.get_input_embeddings().weight.device)
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else lm.tokenizer.eos_token_id
    return lm.tokenizer.decode(greedy_tokens(lm.arch, ids, mask, new_tokens, pad)[0], skip_special_tokens=True)
