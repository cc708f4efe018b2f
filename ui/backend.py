"""The backend as the pages call it: the shared model, windows and live evaluator, and disk-cached results.

Cached resources (the model, windows, the live evaluator) are shared read-only by every session and
never hold a mask between calls; results of long work come from ``analysis.cache.DiskCache`` when
seen before and are computed with a progress bar otherwise.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import streamlit as st

from analysis import importance
from analysis.access import Access
from analysis.cache import DiskCache, default_root
from analysis.comparison import Comparison, compare
from analysis.corpus import Windows, decode_text, load_text, make_windows
from analysis.drift import DriftReport, PositionDrift, cached_harp_drift, cached_layer_drift, position_drift
from analysis.evaluation import IncrementalEvaluator, PerplexityResult
from analysis.files import atomic_write_bytes
from analysis.harp import HarpResult, cached_harp
from analysis.head_map import HeadMap, cached_head_map
from analysis.importance import HeadScores, attention_block_influence, block_influence, cached_head_result
from analysis.loading import LoadedModel, load_model
from analysis.masks import Mask
from ui.progress import Job, progress_bar
from ui.session import CALIB_TEXT, DTYPE, EVAL_TEXT, MAX_TOKENS, MODEL, SEQLEN, choice


@st.cache_resource(show_spinner="Loading the model (the first start converts the GGUF, about 30 s)…")
def shared_model(spec: str, dtype: str = "auto") -> LoadedModel:
    """One model per spec and dtype per process, shared read-only by every session (masks go through hooks).

    It goes to the CUDA GPU where there is one; dtype ``auto`` is then bfloat16, float32 on the CPU.
    """
    return load_model(spec, device="auto", dtype=dtype)


def access() -> Access:
    """What this app lets a session open and write: the workbench's trust, or a demo's limits (``make demo``)."""
    return Access.from_env()


def model() -> LoadedModel:
    """The model the user picked on the home page (HeadroomError for a bad spec or, in a demo, an unlisted one)."""
    return shared_model(access().model(str(choice(MODEL))), str(choice(DTYPE)))


def disk_cache() -> DiskCache:
    """The result cache under ``$HEADROOM_CACHE`` (or ``cache/``), one object per root."""
    return _disk_cache(str(default_root()))


@st.cache_resource
def _disk_cache(root: str) -> DiskCache:
    return DiskCache(Path(root))


def windows(lm: LoadedModel, which: str = EVAL_TEXT, max_tokens: int | None = None) -> Windows:
    """Evaluation (``EVAL_TEXT``) or calibration (``CALIB_TEXT``) windows at the session's settings.

    ``max_tokens`` overrides the session's token count (the editor's live evaluation, HARP's calibration).
    """
    tokens = int(choice(MAX_TOKENS)) if max_tokens is None else int(max_tokens)
    return _windows(lm.name, lm.fingerprint, access().text(str(choice(which))), int(choice(SEQLEN)), tokens)


@st.cache_resource(max_entries=16)
def _windows(name: str, fingerprint: str, text_spec: str, seqlen: int, max_tokens: int) -> Windows:
    lm = model()
    assert lm.fingerprint == fingerprint, "windows requested for a model that is not the session's"
    return make_windows(lm.tokenizer, load_text(text_spec), seqlen, max_tokens, lm.max_positions)


def save_upload(name: str, data: bytes) -> str:
    """Validate an uploaded text and keep it in the uploads folder; returns the path to use as a text spec."""
    text = decode_text(name, data)
    path = access().upload_path(name, text.sha256)  # the browser's name made a plain file name, never a path
    if not path.is_file():
        atomic_write_bytes(path, text.text.encode("utf-8"))
    return str(path)


@dataclass
class _LiveSlot:
    """The evaluator shared by every session on one model and one set of windows, and its lock."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    evaluator: IncrementalEvaluator | None = None


@st.cache_resource(max_entries=4)
def _live_slot(model_key: str, windows_key: str) -> _LiveSlot:
    return _LiveSlot()


def live_perplexity(lm: LoadedModel, evaluation: Windows, mask: Mask) -> PerplexityResult:
    """Perplexity of ``mask`` from the incremental evaluator shared by all sessions on these windows.

    The evaluator is stateful (the residual stream of the last mask), so calls take turns on its
    lock; its memory of recent masks makes an undo or a revisit instant for every session. A run
    cancelled mid-way leaves it marked stale, and the next call repairs it.
    """
    slot = _live_slot(json.dumps(lm.cache_key(), sort_keys=True), json.dumps(evaluation.cache_key(), sort_keys=True))
    with slot.lock:
        if slot.evaluator is None:
            with progress_bar("Preparing the live evaluator (one full pass)") as bar:
                slot.evaluator = IncrementalEvaluator(lm.arch, evaluation, bar)
        return slot.evaluator.perplexity(mask)


def job(lm: LoadedModel, name: str, unit: str) -> Job:
    """A long job on ``lm`` whose measured speed the disk cache remembers for the next estimate."""
    return Job(disk_cache(), lm.cache_key(), name, unit)


def harp_job(lm: LoadedModel) -> Job:
    return job(lm, "harp", "candidates")


def compare_job(lm: LoadedModel) -> Job:
    return job(lm, "compare", "masks")


def metric_job(lm: LoadedModel, metric: str) -> Job:
    """Scoring heads by ``metric``: ablation steps through heads, every other metric through windows."""
    return job(lm, f"head_metric_{metric}", "heads" if metric == "ablation" else "windows")


def head_result(lm: LoadedModel, calib: Windows, metric: str, layers: Sequence[int] | None = None) -> HeadScores:
    """A head metric and its details on the calibration windows, from the disk cache when seen, else with progress."""
    with progress_bar(f"Scoring heads by {metric}", metric_job(lm, metric)) as bar:
        return cached_head_result(lm, calib, metric, layers, disk_cache(), bar)


def head_scores(
    lm: LoadedModel, calib: Windows, metric: str, layers: Sequence[int] | None = None
) -> list[list[float | None]]:
    """The rows of :func:`head_result`."""
    return head_result(lm, calib, metric, layers).scores


def cheapest_heads(lm: LoadedModel, calib: Windows, metric: str, k: int) -> list[tuple[int, int]]:
    """The k heads ``metric`` marks cheapest to remove (see ``analysis.importance.cheapest_heads``)."""
    return importance.cheapest_heads(head_scores(lm, calib, metric), metric, k)


def head_map(lm: LoadedModel, calib: Windows, metrics: Sequence[str], clusters: int, seed: int) -> HeadMap:
    """The head map on the calibration windows (disk-cached; the first UMAP run also compiles numba code)."""
    with progress_bar("Measuring head features and projecting them", job(lm, "head_map", "batches")) as bar:
        return cached_head_map(lm, calib, metrics, clusters, seed, disk_cache(), bar)


def block_influences(lm: LoadedModel, calib: Windows) -> dict[str, list[float]]:
    """ShortGPT Block Influence per layer of whole blocks and of attention branches (disk-cached)."""
    parts = {**lm.cache_key(), **calib.cache_key()}

    def compute() -> dict[str, list[float]]:
        return {
            "block": block_influence(lm.arch, calib).tolist(),
            "attention": attention_block_influence(lm.arch, calib).tolist(),
        }

    with st.spinner("Measuring Block Influence (two passes)…"):
        return disk_cache().json("block_influence", parts, compute)


@dataclass(frozen=True)
class HarpRun:
    """What the HARP page asked for: the drop-QK layers, the alpha grid and the calibration tokens."""

    layers: tuple[int, ...]
    grid: tuple[float, ...]
    calib_tokens: int


def harp_result(lm: LoadedModel, run: HarpRun) -> HarpResult:
    """HARP for ``run``: from the disk cache when seen, else searched with progress."""
    calib = windows(lm, CALIB_TEXT, run.calib_tokens)
    with progress_bar(f"HARP: searching alpha on layers {list(run.layers)}", harp_job(lm)) as bar:
        return cached_harp(lm, calib, run.layers, run.grid, disk_cache(), bar)


def comparison(lm: LoadedModel, run: HarpRun, axis: str) -> Comparison:
    """HARP against the baselines matched on ``axis``, on the session's evaluation windows."""
    calib = windows(lm, CALIB_TEXT, run.calib_tokens)
    with progress_bar(f"Building and evaluating baselines matched on {axis}", compare_job(lm)) as bar:
        return compare(lm, calib, windows(lm), run.layers, axis, run.grid, bar)


def drift_reports(lm: LoadedModel, evaluation: Windows, mask: Mask) -> dict[str, DriftReport]:
    """Drift of ``mask`` (``pruned_with_rescaling``) and, with drop-QK layers, of it at alpha = 1 (disk-cached)."""
    with st.spinner("Measuring residual-stream drift (cached after the first time)…"):
        if mask.drop_qk:
            return cached_harp_drift(lm, evaluation, mask, disk_cache())
        return {"pruned_with_rescaling": cached_layer_drift(lm, evaluation, mask, disk_cache())}


def window_drift(lm: LoadedModel, evaluation: Windows, mask: Mask, window: int) -> PositionDrift:
    """Per-position drift of one window, memoised per process for this model, windows, mask and window."""
    key = json.dumps([evaluation.cache_key(), mask.cache_key()], sort_keys=True)
    return _window_drift(
        json.dumps(lm.cache_key(), sort_keys=True), key, window, _lm=lm, _windows=evaluation, _mask=mask
    )


@st.cache_data(max_entries=32, show_spinner="Measuring drift along one window…")
def _window_drift(
    model_key: str, key: str, window: int, *, _lm: LoadedModel, _windows: Windows, _mask: Mask
) -> PositionDrift:
    return position_drift(_lm.arch, _windows, _mask, window)
