"""What the benchmarks share: the README's HARP masks, a mask from a file, and the load average line."""

from __future__ import annotations

import os

from analysis.harp import top_layers
from analysis.loading import LoadedModel
from analysis.mask_files import load_mask
from analysis.masks import Mask

# The alphas HARP searched on the default model (low -> high layer), README's "HARP and the baselines"
HARP_ALPHAS = {
    4: (0.2, 0.8, 0.4, 0.4),
    8: (0.4, 0.1, 0.7, 0.7, 0.4, 0.3, 0.1, 0.0),
}


def harp_mask(lm: LoadedModel, n: int) -> Mask:
    """Drop-QK on the top ``n`` layers with the README's searched alphas (N = 4 or 8, the default model)."""
    layers = top_layers(lm.shape.num_layers, n)
    mask = Mask.unpruned(lm.shape, lm.name, lm.fingerprint).with_drop_qk(layers)
    for layer, alpha in zip(layers, HARP_ALPHAS[n], strict=True):
        mask = mask.with_layer(layer, alpha=alpha)
    return mask


def file_mask(lm: LoadedModel, path: str) -> Mask:
    return load_mask(path, lm.shape, lm.name, lm.fingerprint)


def load_average() -> str:
    """'load 1.02 0.88 0.75': what else the machine was doing, to print beside every figure."""
    return "load " + " ".join(f"{x:.2f}" for x in os.getloadavg())
