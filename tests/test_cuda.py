"""Every command's backend on a CUDA GPU against the CPU, on tiny checkpoints (marked ``cuda``).

Each test loads the same float32 checkpoint on the CPU and on ``$HEADROOM_TEST_DEVICE`` (default
``cuda``) and checks the GPU's numbers against the CPU's: evaluation (every family), the incremental
evaluator with the layers split between the CPU and the GPU, importance, HARP, search, drift, the
compact export and the task primitives. Without a GPU they skip; ``HEADROOM_TEST_DEVICE=cpu`` runs
the same comparisons CPU against CPU, which checks the tests themselves. ``bench/gpu_check.sh``
runs them where a GPU is lent.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from analysis.activation_metrics import o_proj_input_stats, wanda_sp
from analysis.corpus import Windows
from analysis.drift import layer_drift
from analysis.evaluation import IncrementalEvaluator, perplexity
from analysis.export import export_model
from analysis.harp import harp
from analysis.intervention import apply_mask
from analysis.loading import LoadedModel, load_model
from analysis.loss_metrics import gradient
from analysis.masks import Mask
from analysis.search import search
from analysis.task_scoring import target_logits
from tests.helpers import FAMILY_TYPES, random_windows, save_checkpoint

DEVICE = os.environ.get("HEADROOM_TEST_DEVICE", "cuda")
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        DEVICE == "cuda" and not torch.cuda.is_available(),
        reason="needs a CUDA GPU (none here); bench/gpu_check.sh runs these where one is lent",
    ),
]
# float32 on both: kernels differ in summation order only (TF32 is off for float32 matmuls by default).
REL = 1e-4


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cuda")
    for model_type in FAMILY_TYPES:
        save_checkpoint(root / model_type, model_type, bos=False)
    return {t: root / t for t in FAMILY_TYPES}


def pair(directory: Path, cache: Path, **placement) -> tuple[LoadedModel, LoadedModel]:
    """The checkpoint on the CPU and on the device under test (or as ``placement`` says), both float32."""
    cpu = load_model(str(directory), device="cpu", cache_root=cache, dtype="float32")
    placement = placement or {"device": DEVICE}
    return cpu, load_model(str(directory), cache_root=cache, dtype="float32", **placement)


def windows() -> Windows:
    return random_windows(n=4, length=24)


def some_mask(lm: LoadedModel) -> Mask:
    return Mask.unpruned(lm.shape, lm.name).with_head(1, 2, False).with_layer(3, drop_qk=True, alpha=0.5)


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_perplexity_on_the_device_equals_the_cpu(checkpoints, tmp_path, model_type):
    cpu, dev = pair(checkpoints[model_type], tmp_path)
    assert next(dev.model.parameters()).device.type == DEVICE
    for mask in (None, some_mask(cpu)):
        want = perplexity(cpu.arch, windows(), mask).perplexity
        assert perplexity(dev.arch, windows(), mask).perplexity == pytest.approx(want, rel=REL)


def test_incremental_evaluator_with_layers_on_two_devices_equals_a_cpu_recompute(checkpoints, tmp_path):
    """Layers 0-1 (and the embeddings) on the CPU, layers 2-3, the final norm and the head on the device."""
    split = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu", "model.layers.1": "cpu"}
    split |= {"model.layers.2": DEVICE, "model.layers.3": DEVICE, "model.norm": DEVICE, "lm_head": DEVICE}
    cpu, dev = pair(checkpoints["llama"], tmp_path, device_map=split)
    assert {p.device.type for p in dev.model.parameters()} == {"cpu", DEVICE}
    evaluator = IncrementalEvaluator(dev.arch, windows())
    rng = random.Random(0)
    mask = Mask.unpruned(cpu.shape, cpu.name)
    for _ in range(8):
        layer, head = rng.randrange(4), rng.randrange(6)
        mask = mask.with_head(layer, head, not mask.heads[layer][head])
        if rng.random() < 0.3:
            mask = mask.with_layer(layer, drop_qk=True, alpha=rng.choice([0.0, 0.5, 1.0]))
        want = perplexity(cpu.arch, windows(), mask).perplexity
        assert evaluator.perplexity(mask).perplexity == pytest.approx(want, rel=REL)


def test_importance_on_the_device_equals_the_cpu(checkpoints, tmp_path):
    cpu, dev = pair(checkpoints["qwen3"], tmp_path)
    for got, want in (
        (
            wanda_sp(dev.arch, o_proj_input_stats(dev.arch, windows())),
            wanda_sp(cpu.arch, o_proj_input_stats(cpu.arch, windows())),
        ),
        (gradient(dev.arch, windows()), gradient(cpu.arch, windows())),
    ):
        assert got.device.type == "cpu"
        torch.testing.assert_close(got, want, rtol=REL, atol=1e-6)


def test_harp_on_the_device_chooses_what_the_cpu_chooses(checkpoints, tmp_path):
    cpu, dev = pair(checkpoints["llama"], tmp_path)
    want = harp(cpu.arch, cpu.name, windows(), [2, 3], [0.0, 0.5, 1.0])
    got = harp(dev.arch, dev.name, windows(), [2, 3], [0.0, 0.5, 1.0])
    assert got.alpha == want.alpha
    assert got.calib_perplexity == pytest.approx(want.calib_perplexity, rel=REL)
    assert got.norm_matching_alpha == pytest.approx(want.norm_matching_alpha, rel=1e-3)


def test_search_on_the_device_finds_the_cpu_mask(checkpoints, tmp_path):
    cpu, dev = pair(checkpoints["phi3"], tmp_path)
    targets = {"kv": 2 * 16 * 4 * 2}  # two KV heads' worth of float32 keys and values per token
    want = search(cpu.arch, cpu.name, windows(), targets, 24, shortlist=4, proxy_windows=2)
    got = search(dev.arch, dev.name, windows(), targets, 24, shortlist=4, proxy_windows=2)
    assert got.mask == want.mask
    assert got.calib_perplexity == pytest.approx(want.calib_perplexity, rel=REL)


def test_drift_on_the_device_equals_the_cpu(checkpoints, tmp_path):
    cpu, dev = pair(checkpoints["olmo2"], tmp_path)
    want, got = layer_drift(cpu.arch, windows(), some_mask(cpu)), layer_drift(dev.arch, windows(), some_mask(dev))
    assert got.kl_nats_per_token == pytest.approx(want.kl_nats_per_token, rel=1e-3, abs=1e-7)
    for a, b in zip(got.layers, want.layers, strict=True):
        assert a.cosine_mean == pytest.approx(b.cosine_mean, rel=REL)


def test_an_export_made_on_the_device_runs_on_the_cpu_like_the_masked_model(checkpoints, tmp_path):
    cpu, dev = pair(checkpoints["gemma3_text"], tmp_path)
    mask = some_mask(cpu)
    export_model(dev, mask, tmp_path / "out")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True, dtype=torch.float32)
    ids = windows().input_ids
    with torch.no_grad(), apply_mask(cpu.arch, mask):
        want = cpu.model(input_ids=ids, use_cache=False).logits
    with torch.no_grad():
        got = exported(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(got, want, rtol=REL, atol=1e-4)


def test_task_scoring_on_the_device_equals_the_cpu(checkpoints, tmp_path):
    """The float32 logits every task scores its targets with, under a mask."""
    cpu, dev = pair(checkpoints["smollm3"], tmp_path)
    context, target = list(range(3, 20)), [21, 22, 23]
    mask = some_mask(cpu)
    with apply_mask(cpu.arch, mask):
        want = target_logits(cpu, context, target)
    with apply_mask(dev.arch, mask):
        got = target_logits(dev, context, target).cpu()
    torch.testing.assert_close(got, want, rtol=REL, atol=1e-4)
