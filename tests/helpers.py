"""Helpers shared by test modules: tiny models, windows, masks and pages (fixtures live in ``conftest.py``).

A test module never imports another test module; what two of them need is here.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch
from streamlit.testing.v1 import AppTest
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import CONFIG_MAPPING, AutoModelForCausalLM, PreTrainedTokenizerFast

from analysis.architecture import Architecture
from analysis.corpus import Windows, load_text, make_windows
from analysis.intervention import apply_mask
from analysis.loading import LoadedModel
from analysis.masks import Mask
from ui import session

ROOT = Path(__file__).resolve().parent.parent
HOME = "app.py"
EDITOR = "app_pages/4_Mask_editor.py"

# --- tiny random models of every supported family ---------------------------------------------------

FAMILY_TYPES = ["llama", "mistral", "qwen2", "gemma2", "gemma3_text", "qwen3", "phi3", "olmo2", "smollm3"]
TINY = {
    "vocab_size": 96,
    "hidden_size": 48,  # != heads * head_dim, so shapes cannot be confused
    "intermediate_size": 96,
    "num_hidden_layers": 4,
    "num_attention_heads": 6,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 128,
    "tie_word_embeddings": False,
}
SPECIAL_TOKENS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}  # inside the tiny vocabulary
EXTRA = {
    "mistral": {"sliding_window": 8},
    "gemma2": {
        "sliding_window": 8,
        "layer_types": ["sliding_attention", "full_attention"] * 2,
        "query_pre_attn_scalar": 16,
        "final_logit_softcapping": 30.0,
        "attn_logit_softcapping": 50.0,
    },
    "gemma3_text": {
        "sliding_window": 8,
        "layer_types": ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        "query_pre_attn_scalar": 16,
    },
    "qwen3": {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 2},  # layers 2, 3 windowed
    "phi3": {"sliding_window": 8, "partial_rotary_factor": 0.5, **SPECIAL_TOKENS},  # rotary on half of head_dim
    "olmo2": SPECIAL_TOKENS,
    "smollm3": {"no_rope_layers": [1, 0, 1, 0], **SPECIAL_TOKENS},  # layers 1, 3 without rotary embedding
}


def tiny_model(model_type: str, seed: int = 0) -> torch.nn.Module:
    """A random-weight causal LM of one family, small enough for exhaustive checks."""
    config = CONFIG_MAPPING[model_type](**TINY, **EXTRA.get(model_type, {}))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Random init leaves norms at their identity; perturb them so norm placement matters in tests.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model.eval().requires_grad_(False)


def qkv_weights(arch: Architecture, layer: int) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """(weight, bias) of q, k, v of ``layer`` read from the module names (Phi-3's fused ``qkv_proj`` cut by hand)."""
    attn, s = arch.attention(layer), arch.shape
    if not hasattr(attn, "qkv_proj"):
        return [(p.weight, p.bias) for p in (attn.q_proj, attn.k_proj, attn.v_proj)]
    sizes = [s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim, s.num_kv_heads * s.head_dim]
    biases = [None] * 3 if attn.qkv_proj.bias is None else attn.qkv_proj.bias.split(sizes)
    return list(zip(attn.qkv_proj.weight.split(sizes), biases, strict=True))


def random_windows(vocab: int = 96, n: int = 5, length: int = 24, seed: int = 0) -> Windows:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, length), generator=g)
    return Windows(ids, seqlen=length, has_bos=False, text_name="random", text_sha256="0" * 64)


# --- tiny checkpoints with a word-level tokenizer -------------------------------------------------

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
    """``n_words`` words of ``WORDS`` drawn at random: one token each under :func:`word_tokenizer`."""
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def save_checkpoint(directory: Path, model_type: str = "llama", bos: bool = True, seed: int = 0) -> torch.nn.Module:
    """Save a tiny random model of ``model_type`` and a word tokenizer as a HF directory; return the model."""
    model = tiny_model(model_type, seed=seed)
    model.save_pretrained(directory)
    word_tokenizer(bos).save_pretrained(directory)
    return model


def tiny_lm(model_type: str) -> LoadedModel:
    """A tiny random model of ``model_type`` with the word tokenizer, loaded as if from disk (no files)."""
    model = tiny_model(model_type)
    return LoadedModel(model, word_tokenizer(), Architecture(model), f"tiny-{model_type}", "f" * 16, "test")


# --- masks and their effect -------------------------------------------------------------------------


def random_mask(base: Mask, rng: random.Random) -> Mask:
    """A random edit of ``base``: toggle heads, switch drop-QK, or set an alpha."""
    mask = base
    for _ in range(rng.randint(1, 3)):
        layer = rng.randrange(base.num_layers)
        kind = rng.choice(["head", "head", "drop", "alpha"])
        if kind == "head":
            head = rng.randrange(base.num_heads)
            mask = mask.with_head(layer, head, not mask.heads[layer][head])
        elif kind == "drop":
            mask = mask.with_layer(layer, drop_qk=layer not in mask.drop_qk)
        else:
            mask = mask.with_layer(layer, alpha=rng.choice([0.0, 0.3, 1.0, 1.7]))
    return mask


def every_kind_of_pruning(lm: LoadedModel) -> Mask:
    """Layer 0: a whole KV group pruned plus alpha 1.3; layer 1: one head pruned (uneven groups) and alpha 0.5;
    layer 2: drop-QK with a pruned head and alpha 0.7; layer 3: alpha 0 (attention removed)."""
    mask = Mask.unpruned(lm.shape, lm.name, lm.fingerprint)
    for head in (0, 1, 2, 4):
        mask = mask.with_head(0, head, False)
    mask = mask.with_layer(0, alpha=1.3).with_head(1, 1, False).with_layer(1, alpha=0.5)
    return mask.with_head(2, 3, False).with_layer(2, drop_qk=True, alpha=0.7).with_layer(3, alpha=0.0)


IDS = torch.randint(0, 96, (2, 20), generator=torch.Generator().manual_seed(1))  # two sequences of 20 tokens


def masked_logits_and_greedy(lm: LoadedModel, mask: Mask, ids: torch.Tensor) -> tuple[torch.Tensor, list]:
    """Logits of ``ids`` and a greedy continuation of the first six tokens of ``ids[0]``, under ``mask``."""
    with torch.no_grad(), apply_mask(lm.arch, mask):
        logits = lm.model(input_ids=ids, use_cache=False).logits
        greedy = lm.model.generate(ids[:1, :6], max_new_tokens=10, do_sample=False, use_cache=False)
    return logits, greedy.tolist()


def count_layer_calls(arch: Architecture) -> tuple[list[int], list]:
    """Per layer, how often it has run since this call (counted in place), and the hook handles to remove."""
    calls = [0] * arch.shape.num_layers
    handles = [
        layer.register_forward_hook(lambda m, a, o, i=i: calls.__setitem__(i, calls[i] + 1))
        for i, layer in enumerate(arch.layers)
    ]
    return calls, handles


def forbid(monkeypatch: pytest.MonkeyPatch, target: object, name: str) -> None:
    """Make ``target.name`` fail when called, so a result said to come from the cache cannot be recomputed.

    A deterministic recompute returns the same numbers as a cache hit; only a compute that cannot run
    tells the two apart.
    """

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"{name} ran although its result was cached")

    monkeypatch.setattr(target, name, fail)


# --- files ------------------------------------------------------------------------------------------


def tree(root: Path) -> dict[str, object]:
    """Every entry below ``root`` (links not followed): a file's bytes, a link's target, or "folder"."""
    found: dict[str, object] = {}
    for path in sorted(root.rglob("*")):
        name = str(path.relative_to(root))
        if path.is_symlink():
            found[name] = ("link", os.readlink(path))
        else:
            found[name] = path.read_bytes() if path.is_file() else "folder"
    return found


# --- pages through AppTest, on a tiny Llama saved to disk -------------------------------------------

SEQLEN, TOKENS = 16, 64  # the page tests' windows: four of 16 tokens


def tiny_app(root: Path, eval_seed: int = 1) -> dict[str, object]:
    """Session settings that point every page at a tiny Llama in ``root`` and two word texts there.

    The evaluation text is ``word_text(200, eval_seed)``: another seed gives a live evaluator of its own.
    """
    if not (root / "tiny-llama").exists():
        save_checkpoint(root / "tiny-llama")
    for name, seed in ((f"eval{eval_seed}.txt", eval_seed), ("calib.txt", 2)):
        (root / name).write_text(word_text(200, seed), encoding="utf-8")
    return {
        session.MODEL: str(root / "tiny-llama"),
        session.EVAL_TEXT: str(root / f"eval{eval_seed}.txt"),
        session.CALIB_TEXT: str(root / "calib.txt"),
        session.SEQLEN: SEQLEN,
        session.MAX_TOKENS: TOKENS,
    }


def windows(lm: LoadedModel, spec: object) -> Windows:
    """The text ``spec`` cut into windows as the pages cut it with :func:`tiny_app`'s settings."""
    return make_windows(lm.tokenizer, load_text(str(spec)), SEQLEN, TOKENS, lm.max_positions)


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


def ok(at: AppTest) -> AppTest:
    """``at`` after checking that its run raised nothing and showed no error."""
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    return at


def shown(at: AppTest, label: str) -> str:
    """The value of the metric labelled ``label``."""
    return next(m.value for m in at.metric if m.label == label)


def button(at: AppTest, label: str):
    return at.button[[b.label for b in at.button].index(label)]


def toggle(at: AppTest, layer: int, head: int) -> AppTest:
    """Toggle one head with the mask editor's head form, and run the page."""
    at.number_input(key="toggle_layer").set_value(layer)
    at.number_input(key="toggle_head").set_value(head)
    return button(at, "Toggle head").click().run()
