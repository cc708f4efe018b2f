"""The head map: features measured per head, deterministic projections, clusters that find real groups."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import analysis.head_map as head_map
from analysis.activation_metrics import magnitude, output_norm
from analysis.architecture import Architecture
from analysis.attention_patterns import attention_stats
from analysis.cache import DiskCache
from analysis.errors import HeadroomError
from analysis.head_map import cached_head_map, head_features, project
from analysis.loading import LoadedModel
from tests.helpers import forbid, random_windows, tiny_model


def _tiny_lm(family: str = "llama") -> LoadedModel:
    arch = Architecture(tiny_model(family))
    return LoadedModel(model=arch.model, tokenizer=None, arch=arch, name="tiny", fingerprint="e" * 64, source="test")


def test_output_norm_is_the_norm_of_what_each_head_writes(tiny_arch):
    windows = random_windows(n=2, length=10)
    shape = tiny_arch.shape
    seen: list[torch.Tensor] = []
    layer = 2
    handle = tiny_arch.attention(layer).o_proj.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    try:
        with torch.no_grad():
            tiny_arch.model(input_ids=windows.input_ids)
    finally:
        handle.remove()
    x = seen[0].flatten(0, 1).double()
    w = tiny_arch.attention(layer).o_proj.weight.double()
    hd = shape.head_dim
    for head in range(shape.num_heads):
        written = x[:, head * hd : (head + 1) * hd] @ w[:, head * hd : (head + 1) * hd].T
        expected = written.norm(dim=-1).mean().item()
        assert output_norm(tiny_arch, windows)[layer, head].item() == pytest.approx(expected, rel=1e-5)


def test_feature_rows_are_heads_in_layer_major_order(tmp_path):
    lm = _tiny_lm()
    windows = random_windows(n=2, length=12)
    names, features = head_features(lm, windows, ["magnitude"], DiskCache(tmp_path))
    shape = lm.shape
    assert features.shape == (shape.num_layers * shape.num_heads, len(names))
    stats = attention_stats(lm.arch, windows)
    torch.testing.assert_close(features[:, names.index("sink")], stats.sink.flatten())
    torch.testing.assert_close(features[:, names.index("magnitude")], magnitude(lm.arch).flatten())
    row = 2 * shape.num_heads + 5  # head (2, 5)
    assert features[row, names.index("entropy")].item() == pytest.approx(stats.entropy[2, 5].item())


def test_clusters_recover_well_separated_groups_and_the_map_is_reproducible():
    rng = np.random.default_rng(1)
    centres = np.array([[0.0] * 5, [8.0] * 5, [-8.0, 8.0, -8.0, 8.0, -8.0]])
    truth = np.repeat(np.arange(3), 12)
    features = centres[truth] + rng.normal(scale=0.3, size=(36, 5))
    heads = [(i // 4, i % 4) for i in range(36)]
    first = project(heads, [f"f{i}" for i in range(5)], features, clusters=3, seed=7)
    # The same partition as the truth, whatever the label numbers.
    pairs = {(t, c) for t, c in zip(truth.tolist(), first.clusters, strict=True)}
    assert len(pairs) == 3 and len({c for _, c in pairs}) == 3
    assert project(heads, [f"f{i}" for i in range(5)], features, clusters=3, seed=7) == first
    assert sum(first.pca_explained_variance) == pytest.approx(1.0, abs=0.05)  # three blobs span a plane
    # UMAP keeps the groups apart too: every point is nearer its own group's centroid.
    umap = np.array(first.umap)
    centroids = np.stack([umap[truth == g].mean(axis=0) for g in range(3)])
    nearest = np.linalg.norm(umap[:, None] - centroids[None], axis=-1).argmin(axis=1)
    assert (nearest == truth).all()


def test_head_map_comes_back_from_the_cache_and_refuses_bad_requests(tmp_path, monkeypatch):
    lm = _tiny_lm("qwen2")
    windows = random_windows(n=2, length=12)
    cache = DiskCache(tmp_path)
    first = cached_head_map(lm, windows, ["magnitude", "wanda_sp"], clusters=3, seed=0, cache=cache)
    assert len(first.heads) == len(first.umap) == len(first.clusters) == lm.shape.num_layers * lm.shape.num_heads
    assert set(first.clusters) == {0, 1, 2}
    with pytest.raises(HeadroomError, match="unknown metric"):
        cached_head_map(lm, windows, ["nonsense"], cache=cache)
    with pytest.raises(HeadroomError, match="clusters must be between 2"):
        cached_head_map(lm, windows, ["magnitude"], clusters=500, cache=cache)
    forbid(monkeypatch, head_map, "project")
    assert cached_head_map(lm, windows, ["magnitude", "wanda_sp"], clusters=3, seed=0, cache=cache) == first
