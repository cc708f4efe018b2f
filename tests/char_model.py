"""A tiny Llama with a one-character-per-token tokenizer, for the task tests.

Printable ASCII only, so prompts, targets and greedy generations round-trip exactly through the
tokenizer and lengths in characters are lengths in tokens.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models
from transformers import CONFIG_MAPPING, AutoModelForCausalLM, PreTrainedTokenizerFast

from analysis.architecture import Architecture
from analysis.intervention import apply_mask
from analysis.loading import LoadedModel
from analysis.masks import Mask
from tests.helpers import TINY

CHARS = string.printable  # 100 characters, digits included
EOS = "</s>"
VOCAB = len(CHARS) + 1
MAX_POSITIONS = 600


def char_tokenizer() -> PreTrainedTokenizerFast:
    """Printable ASCII, one token each, and an end-of-text token (lm-evaluation-harness needs one).

    Other characters (rare in the corpus) are dropped.
    """
    tok = Tokenizer(models.BPE(vocab={**{c: i for i, c in enumerate(CHARS)}, EOS: len(CHARS)}, merges=[]))
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS)


def char_lm(seed: int = 0, max_positions: int = MAX_POSITIONS) -> LoadedModel:
    config = CONFIG_MAPPING["llama"](**{**TINY, "vocab_size": VOCAB, "max_position_embeddings": max_positions})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval().requires_grad_(False)
    arch = Architecture(model)
    return LoadedModel(model, char_tokenizer(), arch, "tiny-chars", f"tiny-chars-{seed}", "test")


def pruned(lm: LoadedModel) -> Mask:
    mask = Mask.unpruned(lm.shape, lm.name).with_heads([(0, 0), (1, 2), (2, 5)], keep=False)
    return mask.with_layer(3, drop_qk=True, alpha=0.5)


def generate(lm: LoadedModel, prompt: str, new_tokens: int, mask: Mask | None = None) -> str:
    """Plain transformers greedy generation, the independent reference."""
    ids = lm.tokenizer(prompt, return_tensors="pt").input_ids
    with apply_mask(lm.arch, mask):
        out = lm.model.generate(
            ids, max_new_tokens=new_tokens, do_sample=False, use_cache=False, pad_token_id=0, eos_token_id=None
        )
    return lm.tokenizer.decode(out[0, ids.shape[1] :])


def save_char_model(directory: Path, seed: int = 0, max_positions: int = MAX_POSITIONS) -> None:
    """:func:`char_lm` as a Hugging Face folder that ``load_model`` opens."""
    lm = char_lm(seed, max_positions)
    lm.model.save_pretrained(directory)
    lm.tokenizer.save_pretrained(directory)
