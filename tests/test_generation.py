"""Greedy continuations under a mask equal a step-by-step argmax over full forward passes under that mask."""

from __future__ import annotations

import pytest
import torch

from analysis.errors import HeadroomError
from analysis.generation import greedy_continuation
from analysis.intervention import apply_mask
from analysis.loading import load_model
from analysis.masks import Mask
from tests.test_loading import save_checkpoint, word_text


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    directory = tmp_path_factory.mktemp("gen") / "tiny-llama"
    save_checkpoint(directory)
    return load_model(str(directory), cache_root=directory.parent)


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
