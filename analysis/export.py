"""Exporting a masked model as a Hugging Face directory that plain transformers loads.

``compact`` removes the pruned parts and ships its modeling code (loads with ``trust_remote_code=True``);
``stock`` keeps the source architecture with pruned heads zeroed (see ``analysis.pruned_model``).
Every export is checked against the masked model on a few tokens before it is written, and is
written the safe way ``analysis.export_folder`` describes, with the model card of
``analysis.model_card``. An export keeps the dtype the model was loaded in (its ``config.json`` and
model card say which).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from analysis.architecture import count_parameters
from analysis.budget import Budget, budget
from analysis.cache import DiskCache
from analysis.corpus import Windows
from analysis.errors import HeadroomError
from analysis.evaluation import PerplexityResult, Progress, batches, cached_perplexity
from analysis.export_folder import CARD_FILE, MASK_FILE, check_destination, write_folder
from analysis.files import atomic_write_text
from analysis.loading import LoadedModel
from analysis.masks import Mask
from analysis.model_card import model_card
from analysis.pruned_model import (
    CHECK_TOKENS,
    check_stock,
    compact_model,
    layer_structure,
    logit_difference,
    max_logit_difference,
    stock_model,
)

KINDS = ("compact", "stock")


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote and what it measured."""

    path: str
    kind: str
    dtype: str  # of the exported weights: the dtype the model was loaded in
    params_before: int
    params_after: int
    budget: Budget
    perplexity_before: PerplexityResult | None
    perplexity_after: PerplexityResult | None
    max_abs_logit_difference: float  # export vs the masked model, on the check tokens
    command: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def export_model(
    lm: LoadedModel,
    mask: Mask,
    out: str | Path,
    kind: str = "compact",
    *,
    force: bool = False,
    windows: Windows | None = None,
    cache: DiskCache | None = None,
    command: str = "",
    progress: Progress | None = None,
) -> ExportResult:
    """Write ``lm`` under ``mask`` to the folder ``out`` as a ``kind`` export; see the module docstring.

    With ``windows``, the unpruned and the masked perplexity (cached on disk) go into the model card,
    and the first ``CHECK_TOKENS`` tokens are the check input; without, a fixed token sequence is.
    """
    if kind not in KINDS:
        raise HeadroomError(f"unknown export kind '{kind}'; use one of {', '.join(KINDS)}")
    path = check_destination(out, force)
    if kind == "stock":
        check_stock(mask, lm.shape)
    arch = lm.arch
    n = len(batches(windows)) if windows is not None else 0
    total = 2 * n + 3

    def at(offset: int) -> Progress:
        return lambda done, _total: progress(offset + done, total) if progress else None

    before = after = None
    if windows is not None:
        before = cached_perplexity(arch, lm.fingerprint, windows, None, cache, at(0))
        after = cached_perplexity(arch, lm.fingerprint, windows, mask, cache, at(n))
    exported = compact_model(arch, mask) if kind == "compact" else stock_model(arch, mask)
    at(2 * n)(1, total)
    if windows is not None:
        check = windows.input_ids[:1, :CHECK_TOKENS]
    else:
        check = (torch.arange(CHECK_TOKENS) % arch.config.vocab_size).unsqueeze(0)
    difference, largest = logit_difference(arch, mask, exported, check)
    if not difference <= max_logit_difference(arch.model.dtype, largest):
        raise RuntimeError(f"the {kind} export differs from the masked model by {difference:.2e}; nothing was written")
    at(2 * n)(2, total)
    layers = layer_structure(mask, arch)
    result = ExportResult(
        path=str(path),
        kind=kind,
        dtype=lm.dtype,
        params_before=arch.shape.total_params,
        params_after=count_parameters(exported),
        budget=budget(mask, arch.shape, windows.seqlen if windows is not None else 256),
        perplexity_before=before,
        perplexity_after=after,
        max_abs_logit_difference=difference,
        command=command,
    )

    def fill(tmp: Path) -> None:
        exported.save_pretrained(tmp)
        lm.tokenizer.save_pretrained(tmp)
        mask.save(tmp / MASK_FILE)
        atomic_write_text(tmp / CARD_FILE, model_card(lm, mask, result, layers))

    write_folder(path, fill, force)
    at(2 * n)(3, total)
    return result
