"""Shared fixtures: tiny random models of every supported family, and the real embedded model.

The real model is converted from its GGUF once per test run into a session-wide temporary cache, so
every module that needs it shares one conversion and no run depends on an earlier one.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import CONFIG_MAPPING, AutoModelForCausalLM

from analysis.architecture import Architecture
from analysis.corpus import Windows

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


@pytest.fixture(params=FAMILY_TYPES)
def tiny_arch(request) -> Architecture:
    return Architecture(tiny_model(request.param))


def random_windows(vocab: int = 96, n: int = 5, length: int = 24, seed: int = 0) -> Windows:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, length), generator=g)
    return Windows(ids, seqlen=length, has_bos=False, text_name="random", text_sha256="0" * 64)


@pytest.fixture(scope="session", autouse=True)
def session_cache(tmp_path_factory) -> Iterator[Path]:
    """A cache root for this run, exported as $HEADROOM_CACHE so subprocesses (CLI, app) share it.

    From the first test on, so no test reads or writes the project's own ``cache/``; the variable is
    put back as it was when the run ends.
    """
    root = tmp_path_factory.mktemp("headroom-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HEADROOM_CACHE", str(root))
        yield root


@pytest.fixture
def cache_dir(tmp_path, monkeypatch) -> Path:
    """An empty result cache (and fingerprint memo) of this test's own, exported via $HEADROOM_CACHE."""
    root = tmp_path / "headroom-cache"
    monkeypatch.setenv("HEADROOM_CACHE", str(root))
    return root


@pytest.fixture(scope="session")
def default_model(session_cache):
    """The real embedded SmolLM2-135M-Instruct, converted once for the whole run."""
    from analysis.loading import load_model

    return load_model("default", cache_root=session_cache)
