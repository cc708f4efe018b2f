"""The head map: every query head as a point, placed by what it does, and grouped.

Each head gets a feature vector: its attention-pattern statistics (``analysis.attention_patterns``:
entropy, mean distance, sink share, previous-token share), how much it writes to the residual stream
(``activation_metrics.output_norm``, on a log scale) and the chosen importance metrics. Features are
standardised (zero mean, unit variance over heads), then projected to 2-D twice, with PCA
(scikit-learn) and UMAP (umap-learn, McInnes et al., 2018), and clustered with k-means on the
standardised features. Everything that is random takes ``seed``, so a map is reproducible.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from analysis.activation_metrics import output_norm
from analysis.attention_patterns import STATISTICS, cached_attention_stats
from analysis.cache import DiskCache
from analysis.corpus import Windows
from analysis.errors import HeadroomError
from analysis.evaluation import Progress
from analysis.importance import CHEAP_METRICS, HEAD_METRICS, cached_head_result
from analysis.loading import LoadedModel

DEFAULT_METRICS = CHEAP_METRICS  # no more than a pass each
DEFAULT_CLUSTERS = 6
UMAP_NEIGHBOURS = 15


@dataclass(frozen=True)
class HeadMap:
    """Coordinates, clusters and features of every head; row i is head ``heads[i] = (layer, head)``."""

    heads: tuple[tuple[int, int], ...]
    feature_names: tuple[str, ...]
    features: tuple[tuple[float, ...], ...]  # raw values, one row per head
    pca: tuple[tuple[float, float], ...]
    pca_explained_variance: tuple[float, float]  # share of the standardised variance per component
    umap: tuple[tuple[float, float], ...]
    clusters: tuple[int, ...]
    seed: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def cluster_means(self) -> dict[str, list[float]]:
        """Per cluster (ascending label): its size and the mean of every raw feature, as table columns."""
        labels = sorted(set(self.clusters))
        values = np.array(self.features)
        assigned = np.array(self.clusters)
        table: dict[str, list[float]] = {"cluster": labels, "heads": [int((assigned == k).sum()) for k in labels]}
        for i, name in enumerate(self.feature_names):
            table[f"mean {name}"] = [float(values[assigned == k, i].mean()) for k in labels]
        return table

    def cluster_members(self) -> dict[str, list[str]]:
        """Per cluster label, its heads as ``L<layer>.H<head>``, in layer order."""
        members: dict[str, list[str]] = {}
        for (layer, head), cluster in zip(self.heads, self.clusters, strict=True):
            members.setdefault(str(cluster), []).append(f"L{layer}.H{head}")
        return members

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> HeadMap:
        def rows(key: str) -> tuple:
            return tuple(tuple(r) for r in obj[key])

        return cls(
            heads=rows("heads"),
            feature_names=tuple(obj["feature_names"]),
            features=rows("features"),
            pca=rows("pca"),
            pca_explained_variance=tuple(obj["pca_explained_variance"]),
            umap=rows("umap"),
            clusters=tuple(obj["clusters"]),
            seed=obj["seed"],
        )


def project(
    heads: Sequence[tuple[int, int]],
    feature_names: Sequence[str],
    features: np.ndarray,
    clusters: int = DEFAULT_CLUSTERS,
    seed: int = 0,
) -> HeadMap:
    """Standardise ``features`` ``[heads, features]``, project with PCA and UMAP, cluster with k-means."""
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    n = features.shape[0]
    if not np.isfinite(features).all():
        raise HeadroomError("head features contain NaN or infinity; compute every metric for all layers")
    if not 2 <= clusters <= n:
        raise HeadroomError(f"clusters must be between 2 and the number of heads ({n}), got {clusters}")
    scaled = StandardScaler().fit_transform(features)
    pca = PCA(n_components=2, svd_solver="full").fit(scaled)
    labels = KMeans(n_clusters=clusters, n_init=10, random_state=seed).fit_predict(scaled)
    with warnings.catch_warnings():  # umap warns that a seed forces one thread, which is what we want
        warnings.simplefilter("ignore", UserWarning)
        import umap

        embedded = umap.UMAP(
            n_components=2, n_neighbors=min(UMAP_NEIGHBOURS, n - 1), random_state=seed, n_jobs=1
        ).fit_transform(scaled)
    return HeadMap(
        heads=tuple((int(layer), int(head)) for layer, head in heads),
        feature_names=tuple(feature_names),
        features=tuple(tuple(float(v) for v in row) for row in features),
        pca=tuple((float(x), float(y)) for x, y in pca.transform(scaled)),
        pca_explained_variance=tuple(float(v) for v in pca.explained_variance_ratio_),
        umap=tuple((float(x), float(y)) for x, y in embedded),
        clusters=tuple(int(c) for c in labels),
        seed=seed,
    )


def head_features(
    lm: LoadedModel,
    windows: Windows,
    metrics: Sequence[str] = DEFAULT_METRICS,
    cache: DiskCache | None = None,
    progress: Progress | None = None,
) -> tuple[list[str], torch.Tensor]:
    """Feature names and ``[num_layers * num_heads, features]`` values, head (l, h) at row ``l * num_heads + h``."""
    unknown = [m for m in metrics if m not in HEAD_METRICS]
    if unknown:
        raise HeadroomError(f"unknown metric(s) {', '.join(unknown)}; choose from {', '.join(HEAD_METRICS)}")
    stats = cached_attention_stats(lm, windows, cache, progress)
    columns = [getattr(stats, name) for name in STATISTICS]
    columns.append(output_norm(lm.arch, windows).clamp_min(1e-12).log10())
    columns += [torch.tensor(cached_head_result(lm, windows, m, cache=cache).scores).double() for m in metrics]
    names = [*STATISTICS, "log10_output_norm", *metrics]
    return names, torch.stack([c.flatten() for c in columns], dim=1)


def cached_head_map(
    lm: LoadedModel,
    windows: Windows,
    metrics: Sequence[str] = DEFAULT_METRICS,
    clusters: int = DEFAULT_CLUSTERS,
    seed: int = 0,
    cache: DiskCache | None = None,
    progress: Progress | None = None,
) -> HeadMap:
    """The head map of ``lm`` on ``windows``, read from the disk cache when seen."""
    cache = cache or DiskCache()
    parts = {**lm.cache_key(), **windows.cache_key(), "metrics": list(metrics), "k": clusters, "seed": seed}

    def compute() -> dict[str, Any]:
        names, features = head_features(lm, windows, metrics, cache, progress)
        shape = lm.shape
        heads = [(layer, head) for layer in range(shape.num_layers) for head in range(shape.num_heads)]
        return project(heads, names, features.numpy(), clusters, seed).to_json()

    return HeadMap.from_json(cache.json("head_map", parts, compute))
