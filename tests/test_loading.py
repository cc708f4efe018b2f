"""Loading checkpoints: HF directories of every family, fingerprints, and the errors users can fix."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GPT2Config

import analysis.loading as loading
from analysis.architecture import FAMILIES
from analysis.errors import HeadroomError
from analysis.loading import load_model, pick_device
from tests.helpers import FAMILY_TYPES, TINY, random_windows, save_checkpoint, word_text, word_tokenizer

# --- loading every family ---------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_saved_tiny_model_loads_with_its_card_and_logits(tmp_path, model_type):
    directory = tmp_path / f"tiny-{model_type}"
    original = save_checkpoint(directory, model_type)
    lm = load_model(str(directory), cache_root=tmp_path / "cache")

    c = original.config
    card = lm.card()
    assert card["family"] == FAMILIES[model_type]
    assert card["layers"] == c.num_hidden_layers == TINY["num_hidden_layers"]
    assert card["heads"] == c.num_attention_heads == TINY["num_attention_heads"]
    assert card["kv_heads"] == c.num_key_value_heads == TINY["num_key_value_heads"]
    assert card["head_dim"] == TINY["head_dim"]
    assert card["hidden_size"] == TINY["hidden_size"]
    assert card["parameters"] == sum(p.numel() for p in original.parameters())
    assert card["name"] == directory.name
    assert card["source"] == f"dir:{directory.name}"
    assert len(card["fingerprint"]) == 16
    int(card["fingerprint"], 16)
    json.dumps(card)  # the card goes into JSON output as is

    assert not lm.model.training
    assert all(not p.requires_grad for p in lm.model.parameters())
    assert all(p.dtype == torch.float32 for p in lm.model.parameters())
    ids = torch.randint(0, TINY["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(lm.model(input_ids=ids).logits, original(input_ids=ids).logits)

    assert lm.tokenizer.bos_token_id == 1
    if model_type != "qwen2":
        # transformers 5 loads any qwen2 directory's tokenizer as Qwen2Tokenizer (byte-level BPE),
        # whatever tokenizer_config.json declares, so the word tokenizer does not survive there.
        text = word_text(20)
        assert lm.tokenizer(text).input_ids == word_tokenizer()(text).input_ids


# --- fingerprints ------------------------------------------------------------------------------------


def test_fingerprint_is_stable_and_portable_across_paths(tmp_path, llama_dir):
    first = load_model(str(llama_dir), cache_root=tmp_path / "cache").fingerprint
    again = load_model(str(llama_dir), cache_root=tmp_path / "cache").fingerprint
    fresh_cache = load_model(str(llama_dir), cache_root=tmp_path / "other-cache").fingerprint
    copy = tmp_path / "elsewhere" / "renamed-copy"
    shutil.copytree(llama_dir, copy)
    copied = load_model(str(copy), cache_root=tmp_path / "cache").fingerprint
    assert first == again == fresh_cache == copied
    assert loading.fingerprint_directory(copy) == loading.fingerprint_directory(llama_dir) == first


def test_fingerprint_changes_when_one_weight_changes(tmp_path):
    directory = tmp_path / "m"
    model = save_checkpoint(directory)
    cache = tmp_path / "cache"
    before = load_model(str(directory), cache_root=cache).fingerprint

    with torch.no_grad():
        model.model.layers[2].self_attn.o_proj.weight[3, 5] += 1e-3
    other = tmp_path / "m2"
    model.save_pretrained(other)
    word_tokenizer().save_pretrained(other)
    assert load_model(str(other), cache_root=cache).fingerprint != before

    # Rewritten in place: the memo of the old file version must not be served.
    model.save_pretrained(directory)
    assert load_model(str(directory), cache_root=cache).fingerprint != before


def test_fingerprint_covers_the_config(tmp_path, llama_dir):
    before = load_model(str(llama_dir), cache_root=tmp_path / "cache").fingerprint
    changed = tmp_path / "eps"
    shutil.copytree(llama_dir, changed)
    config = json.loads((changed / "config.json").read_text())
    config["rms_norm_eps"] = config["rms_norm_eps"] * 10
    (changed / "config.json").write_text(json.dumps(config))
    assert load_model(str(changed), cache_root=tmp_path / "cache").fingerprint != before


def test_fingerprint_memo_is_used_on_the_second_load(tmp_path, llama_dir, monkeypatch):
    calls: list[Path] = []
    real = loading.fingerprint_directory

    def counting(directory: Path) -> str:
        calls.append(directory)
        return real(directory)

    monkeypatch.setattr(loading, "fingerprint_directory", counting)
    cache = tmp_path / "cache"
    first = load_model(str(llama_dir), cache_root=cache).fingerprint
    assert len(calls) == 1
    memos = list((cache / "fingerprints").iterdir())
    assert len(memos) == 1
    assert memos[0].read_text().strip() == first

    second = load_model(str(llama_dir), cache_root=cache).fingerprint
    assert second == first
    assert len(calls) == 1, "the second load recomputed the fingerprint instead of reading the memo"


# --- errors a user can fix ---------------------------------------------------------------------------


def _error(spec: str, cache: Path) -> str:
    with pytest.raises(HeadroomError) as info:
        load_model(spec, cache_root=cache)
    message = str(info.value)
    assert "\n" not in message.strip()
    return message


def test_nonexistent_path_is_reported(tmp_path):
    missing = tmp_path / "no-such-model"
    message = _error(str(missing), tmp_path / "cache")
    assert str(missing) in message
    assert "does not exist" in message


def test_directory_without_config_is_reported(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "model.safetensors").write_bytes(b"")
    message = _error(str(empty), tmp_path / "cache")
    assert "config.json" in message
    assert str(empty) in message
    assert "Hugging Face model directory" in message


def test_unsupported_architecture_names_the_supported_families(tmp_path):
    directory = tmp_path / "gpt2"
    GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, bos_token_id=0, eos_token_id=0).save_pretrained(directory)
    message = _error(str(directory), tmp_path / "cache")
    assert "gpt2" in message
    assert "not supported" in message
    for family in ("Llama", "Mistral", "Qwen2", "Gemma2", "Gemma3"):
        assert family in message


def test_truncated_safetensors_is_reported(tmp_path, llama_dir):
    directory = tmp_path / "truncated"
    shutil.copytree(llama_dir, directory)
    weights = directory / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    message = _error(str(directory), tmp_path / "cache")
    assert str(directory) in message
    assert "truncated or corrupt" in message


def test_unreachable_hub_id_fails_fast_with_advice(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the variable once, at import; make the running process offline too.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)  # so the id cannot name a local directory
    message = _error("headroom-tests/no-such-model", tmp_path / "cache")
    assert "headroom-tests/no-such-model" in message
    assert "model hub" in message
    assert "local directory or .gguf file" in message


def test_missing_gguf_is_reported(tmp_path):
    missing = tmp_path / "model.Q4_0.gguf"
    message = _error(str(missing), tmp_path / "cache")
    assert str(missing) in message
    assert "does not exist" in message
    assert not (tmp_path / "cache" / "models").exists()


@pytest.mark.parametrize(
    "data",
    [random.Random(1).randbytes(4096), b"GGUF\x03\x00\x00\x00" + random.Random(2).randbytes(2048), b"GGUF"],
    ids=["random-bytes", "magic-then-garbage", "magic-only"],
)
def test_corrupt_gguf_is_a_headroom_error_and_leaves_no_cache_entry(tmp_path, data):
    gguf = tmp_path / "broken.gguf"
    gguf.write_bytes(data)
    message = _error(str(gguf), tmp_path / "cache")
    assert str(gguf) in message
    assert "truncated or corrupt" in message
    models_dir = tmp_path / "cache" / "models"
    assert not models_dir.exists() or not any(models_dir.iterdir()), "a failed conversion left files behind"


# --- trust_remote_code -------------------------------------------------------------------------------


def _record_from_pretrained(monkeypatch) -> dict[str, list[dict]]:
    calls: dict[str, list[dict]] = {}
    for cls in (AutoConfig, AutoModelForCausalLM, AutoTokenizer):
        real = cls.from_pretrained

        def recording(*args, _real=real, _name=cls.__name__, **kwargs):
            calls.setdefault(_name, []).append(kwargs)
            return _real(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", recording)
    return calls


def test_remote_code_is_not_trusted_unless_asked(tmp_path, llama_dir, monkeypatch):
    calls = _record_from_pretrained(monkeypatch)
    load_model(str(llama_dir), cache_root=tmp_path / "cache")
    assert set(calls) == {"AutoConfig", "AutoModelForCausalLM", "AutoTokenizer"}
    for name, kwargs_list in calls.items():
        for kwargs in kwargs_list:
            assert kwargs.get("trust_remote_code", False) is False, name


def test_remote_code_is_trusted_when_asked(tmp_path, llama_dir, monkeypatch):
    calls = _record_from_pretrained(monkeypatch)
    load_model(str(llama_dir), cache_root=tmp_path / "cache", trust_remote_code=True)
    assert set(calls) == {"AutoConfig", "AutoModelForCausalLM", "AutoTokenizer"}
    for name, kwargs_list in calls.items():
        assert all(kwargs.get("trust_remote_code") is True for kwargs in kwargs_list), name


# --- devices -----------------------------------------------------------------------------------------


def test_cuda_without_a_gpu_is_a_headroom_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(HeadroomError, match=r"CUDA GPU was asked for but none is available; use the CPU") as info:
        pick_device("cuda")
    assert info.value.settings == ("device",)


def test_auto_device_is_cpu_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto") == "cpu"
    assert pick_device("cpu") == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine has no GPU")
def test_auto_device_is_cpu_here():
    assert pick_device("auto") == "cpu"


def test_unknown_device_is_a_headroom_error():
    with pytest.raises(HeadroomError, match="unknown device 'tpu'; use cpu, cuda or auto"):
        pick_device("tpu")


def test_load_on_cuda_without_a_gpu_is_a_headroom_error(tmp_path, llama_dir, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(HeadroomError, match="CUDA GPU was asked for but none is available"):
        load_model(str(llama_dir), device="cuda", cache_root=tmp_path / "cache")


def test_device_map_auto_places_the_model_and_changes_no_number(tmp_path, llama_dir):
    """accelerate's big-model placement (here: everything fits the CPU) gives the same perplexity."""
    from analysis.evaluation import IncrementalEvaluator, perplexity
    from analysis.masks import Mask

    plain = load_model(str(llama_dir), cache_root=tmp_path / "cache")
    placed = load_model(str(llama_dir), device_map="auto", cache_root=tmp_path / "cache")
    assert placed.fingerprint == plain.fingerprint  # cache keys do not depend on placement
    windows = random_windows(vocab=plain.model.config.vocab_size)
    mask = Mask.unpruned(plain.shape, plain.name).with_head(1, 2, False).with_layer(3, drop_qk=True, alpha=0.5)
    expected = perplexity(plain.arch, windows, mask).perplexity
    assert perplexity(placed.arch, windows, mask).perplexity == pytest.approx(expected, rel=1e-6)
    assert IncrementalEvaluator(placed.arch, windows).perplexity(mask).perplexity == pytest.approx(expected, rel=1e-6)
