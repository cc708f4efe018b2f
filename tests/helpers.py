"""Helpers shared by test modules (a test module never imports another test module)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from streamlit.testing.v1 import AppTest
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from tests.conftest import TINY, tiny_model

ROOT = Path(__file__).resolve().parent.parent
HOME = "app.py"


def forbid(monkeypatch: pytest.MonkeyPatch, target: object, name: str) -> None:
    """Make ``target.name`` fail when called, so a result said to come from the cache cannot be recomputed.

    A deterministic recompute returns the same numbers as a cache hit; only a compute that cannot run
    tells the two apart.
    """

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"{name} ran although its result was cached")

    monkeypatch.setattr(target, name, fail)


def open_page(
    name: str = HOME,
    settings: dict[str, object] | None = None,
    query: dict[str, str] | None = None,
    timeout_s: float = 120,
) -> AppTest:
    """The app opened on page ``name`` (a file under app_pages/, or the home page), not run yet.

    It goes through ``app.py`` as a browser does, so ``st.navigation`` and the shared scaffold
    (title, sidebar summary, error handling) run around the page; ``settings`` seed the session
    state and ``query`` the URL.
    """
    at = AppTest.from_file(str(ROOT / HOME), default_timeout=timeout_s)
    for key, value in (settings or {}).items():
        at.session_state[key] = value
    for key, value in (query or {}).items():
        at.query_params[key] = value
    if name != HOME:
        at.switch_page(name)
    return at


# --- tiny checkpoints with a word-level tokenizer ---------------------------------------------------

BOS, EOS, UNK = "<s>", "</s>", "<unk>"
WORDS = [f"w{i}" for i in range(TINY["vocab_size"] - 3)]  # ids 3..vocab-1


def word_tokenizer(bos: bool = True, shuffle_seed: int | None = None) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over ``WORDS`` that fits the tiny models' vocabulary.

    ``bos``: whether it puts ``<s>`` in front by default (the protocol's BOS rule).
    ``shuffle_seed``: give the words a different id order (same words, other token ids).
    """
    words = list(WORDS)
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(words)
    vocab = {UNK: 0, BOS: 1, EOS: 2} | {w: i + 3 for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if bos:
        tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK)


def word_text(n_words: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def save_checkpoint(directory: Path, model_type: str = "llama", bos: bool = True, seed: int = 0) -> torch.nn.Module:
    """Save a tiny random model of ``model_type`` and a word tokenizer as a HF directory; return the model."""
    model = tiny_model(model_type, seed=seed)
    model.save_pretrained(directory)
    word_tokenizer(bos).save_pretrained(directory)
    return model
