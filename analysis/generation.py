"""Greedy continuations of a prompt under a mask, for comparing a pruned model with the unpruned one by eye.

Decoding runs without a KV cache: the hooks of a drop-QK layer replace its attention by a per-token
map that never writes the cache, so a cached generation would read stale keys and values there.
"""

from __future__ import annotations

import torch

from analysis.errors import HeadroomError
from analysis.intervention import apply_mask
from analysis.loading import LoadedModel
from analysis.masks import Mask

MAX_NEW_TOKENS = 256


@torch.no_grad()
def greedy_continuation(lm: LoadedModel, prompt: str, mask: Mask | None = None, new_tokens: int = 24) -> str:
    """The ``new_tokens`` most likely next tokens after ``prompt`` (greedy), decoded; ``mask`` None is unpruned."""
    if not prompt.strip():
        raise HeadroomError("the prompt is empty; type a few words for the models to continue")
    if not 1 <= new_tokens <= MAX_NEW_TOKENS:
        raise HeadroomError(f"new tokens must be between 1 and {MAX_NEW_TOKENS}, got {new_tokens}")
    ids = lm.tokenizer(prompt, return_tensors="pt").input_ids.to(lm.model.get_input_embeddings().weight.device)
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else lm.tokenizer.eos_token_id
    with apply_mask(lm.arch, mask):
        out = lm.model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            do_sample=False,
            use_cache=False,
            pad_token_id=pad,
        )
    return lm.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
