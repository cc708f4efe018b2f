"""Greedy continuations under a mask equal a step-by-step argmax over full forward passes under that mask."""

from __future__ import annotations

import pytest
import torch

from analysis.errors import HeadroomError
from analysis.generation import greedy_continuation, greedy_tokens
from analysis.intervention import apply_mask
from analysis.loading import load_model
from analysis.masks import Mask
from tests.helpers import word_text


@pytest.fixture(scope="module")
def lm(llama_dir):
    return load_model(str(llama_dir), cache_root=llama_dir.parent)


def argmax_steps(lm, prompt: str, mask: Mask | None, steps: int) -> str:
    ids = lm.tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad(), apply_mask(lm.arch, mask):
        for _ in range(steps):
            ids = torch.cat([ids, lm.model(ids).logits[:, -1:].argmax(-1)], dim=1)
    return lm.tokenizer.decode(ids[0, -steps:], skip_special_tokens=True)


def test_unpruned_and_drop_qk_continuations_equal_full_recompute_argmax(lm):
    prompt = word_text(6, seed=3)
    drop = Mask.unpruned(lm.shape, lm.name).with_layer(3, drop_qk=True, alpha=0.3).with_head(1, 2, False)
    for mask in (None, drop):
        assert greedy_continuation(lm, prompt, mask, new_tokens=8) == argmax_steps(lm, prompt, mask, 8)


def test_an_empty_prompt_is_refused_with_advice(lm):
    with pytest.raises(HeadroomError, match="prompt is empty"):
        greedy_continuation(lm, "  ")


def argmax_tokens(arch, ids: torch.Tensor, mask: Mask, steps: int) -> torch.Tensor:
    """Greedy tokens from a full forward pass per step (no cache), under ``mask``."""
    with torch.no_grad(), apply_mask(arch, mask):
        for _ in range(steps):
            ids = torch.cat([ids, arch.model(ids).logits[:, -1:].argmax(-1)], dim=1)
    return ids[:, -steps:]


def test_cached_generation_under_a_mask_equals_a_full_recompute_per_token(tiny_arch):
    """Drop-QK and removed layers keep no cache (the first, the only full-attention layer of gemma3, all)."""
    tiny_arch.model.generation_config.eos_token_id = None  # decode every step, never stop early
    ids = torch.randint(0, 96, (1, 7), generator=torch.Generator().manual_seed(2))
    base = Mask.unpruned(tiny_arch.shape, "tiny").with_head(1, 2, False)
    masks = [
        base.with_layer(0, drop_qk=True, alpha=0.7),
        base.with_layer(2, drop_qk=True).with_layer(3, alpha=0.0),
        base,
    ]
    for layer in range(4):  # every layer drop-QK: nothing is cached at all
        masks[2] = masks[2].with_layer(layer, drop_qk=True, alpha=0.5)
    for mask in masks:
        cached = greedy_tokens(tiny_arch, ids, mask, 14, pad_id=0)  # longer than gemma's sliding window of 8
        assert cached.shape == (1, 14)
        assert torch.equal(cached, argmax_tokens(tiny_arch, ids, mask, 14))
