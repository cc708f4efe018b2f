"""The backend as the pages call it: the shared model, windows and live evaluator, and disk-cached results.

Cached resources (the model, windows, the live evaluator) are shared read-only by every session and
never hold a mask between calls; results of long work come from ``analysis.cache.DiskCache`` when
seen before and are computed with a progress bar otherwise.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import streamlit as st

from analysis import importance, live
from analysis.access import Access
from analysis.activation_metrics import attention_block_influence, block_influence
from analysis.cache import DiskCache, default_root
from analysis.comparison import SHARED_SCORES, Comparison, compare
from analysis.corpus import Windows, decode_text, load_text, make_windows
from analysis.drift import MaskDrift, PositionDrift, cached_mask_drift, position_drift
from analysis.errors import HeadroomError
from analysis.files import atomic_write_bytes
from analysis.harp import HarpResult, cached_chosen_harp, cached_harp, stored_harp
from analysis.head_map import HeadMap, cached_head_map
from analysis.importance import HeadScores, cached_head_result
from analysis.live import LivePerplexity
from analysis.loading import LoadedModel, load_model
from analysis.masks import Mask
from analysis.rescale import RescaleResult, cached_rescale
from analysis.task_suite import TaskResult, run_suite, stored_task
from ui.progress import Job, progress_bar
from ui.session import CALIB_TEXT, DTYPE, EVAL_TEXT, MAX_TOKENS, MODEL, SEQLEN, choice

_WARMED = "live_warmed_for"  # the settings the live evaluator was last started for in this session


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
    """The model the user picked on the home page (HeadroomError for a bad spec or, in a demo, an unlisted one).

    Also starts building the live evaluator in the background (:func:`warm_live`).
    """
    lm = shared_model(access().model(str(choice(MODEL))), str(choice(DTYPE)))
    warm_live(lm)
    return lm


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


class _LiveSlot:
    """The live evaluator of one model and set of windows, built once in the background and shared by every session."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._future: Future[LivePerplexity] | None = None
        self.progress = (0, 1)  # (windows captured, windows) of the build under way

    def start(self, lm: LoadedModel, evaluation: Windows) -> Future[LivePerplexity]:
        """The build, started if it is not (or failed before: a new attempt)."""
        with self._lock:
            if self._future is None or (self._future.done() and self._future.exception() is not None):
                self.progress = (0, evaluation.num_windows)
                self._future = live.warm(lm.arch, evaluation, self._record)
            return self._future

    def _record(self, done: int, total: int) -> None:
        self.progress = (done, total)


@st.cache_resource(max_entries=4)
def _live_slot(model_key: str, windows_key: str) -> _LiveSlot:
    return _LiveSlot()


def _slot(lm: LoadedModel, evaluation: Windows) -> _LiveSlot:
    return _live_slot(json.dumps(lm.cache_key(), sort_keys=True), json.dumps(evaluation.cache_key(), sort_keys=True))


def warm_live(lm: LoadedModel) -> None:
    """Start building the live evaluator on the session's evaluation windows, once per session and setting.

    Called when a page gets the model, so that the editor's first click does not wait on the
    capturing pass. A bad text is not reported here but by the page that uses it.
    """
    setting = [str(choice(k)) for k in (MODEL, DTYPE, EVAL_TEXT, SEQLEN, MAX_TOKENS)]
    if st.session_state.get(_WARMED) == setting:
        return
    st.session_state[_WARMED] = setting  # first, as windows() itself asks for the model
    try:
        evaluation = windows(lm)
    except HeadroomError:
        return
    _slot(lm, evaluation).start(lm, evaluation)


def live_evaluator(lm: LoadedModel, evaluation: Windows) -> LivePerplexity:
    """The shared live evaluator of ``evaluation``: at once when warm, else after its build with a progress bar."""
    slot = _slot(lm, evaluation)
    future = slot.start(lm, evaluation)
    if not future.done():
        with progress_bar("Preparing the live evaluator (one full pass, started when the model loaded)") as bar:
            while not future.done():
                bar(*slot.progress)
                time.sleep(0.2)
    return future.result()


def rescaled(lm: LoadedModel, mask: Mask, search: bool) -> RescaleResult:
    """Per-layer alphas for ``mask`` on the session's calibration windows (closed form, or the greedy search)."""
    calib = windows(lm, CALIB_TEXT)
    what = "greedy alpha search" if search else "closed-form alphas"
    with progress_bar(f"Rescaling this mask ({what}) on {calib.predicted_tokens:,} calibration tokens") as bar:
        return cached_rescale(lm, mask, calib, search, disk_cache(), bar)


def job(lm: LoadedModel, name: str, unit: str) -> Job:
    """A long job on ``lm`` whose measured speed the disk cache remembers for the next estimate."""
    return Job(disk_cache(), lm.cache_key(), name, unit)


def harp_job(lm: LoadedModel) -> Job:
    return job(lm, "harp", "candidates")


def compare_job(lm: LoadedModel) -> Job:
    """Evaluating every compared mask: its unit is a window of evaluation text under one mask."""
    return job(lm, "compare_evaluation", "windows")


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


def head_map_job(lm: LoadedModel) -> Job:
    return job(lm, "head_map", "batches")


def head_map(lm: LoadedModel, calib: Windows, metrics: Sequence[str], clusters: int, seed: int) -> HeadMap:
    """The head map on the calibration windows (disk-cached; the first UMAP run also compiles numba code)."""
    with progress_bar("Measuring head features and projecting them", head_map_job(lm)) as bar:
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
    """What the HARP page asked for: the drop-QK layers, the alpha grid and the calibration tokens.

    ``choose`` > 0 asks HARP to choose that many layers itself (greedy on calibration perplexity,
    ``analysis.harp.chosen_harp``); ``layers`` is then ignored.
    """

    layers: tuple[int, ...]
    grid: tuple[float, ...]
    calib_tokens: int
    choose: int = 0

    def candidates(self, num_layers: int) -> int:
        """How many masks the run evaluates (the unit of its progress and of its time estimate)."""
        if self.choose:
            return sum(num_layers - k for k in range(self.choose)) + self.choose * len(self.grid)
        return len(self.layers) * len(self.grid)


def harp_result(lm: LoadedModel, run: HarpRun) -> HarpResult:
    """HARP for ``run``: from the disk cache when seen, else searched with progress."""
    calib = windows(lm, CALIB_TEXT, run.calib_tokens)
    if run.choose:
        with progress_bar(f"HARP: choosing {run.choose} layers, then searching alpha", harp_job(lm)) as bar:
            return cached_chosen_harp(lm, calib, run.choose, None, run.grid, disk_cache(), bar)
    with progress_bar(f"HARP: searching alpha on layers {list(run.layers)}", harp_job(lm)) as bar:
        return cached_harp(lm, calib, run.layers, run.grid, disk_cache(), bar)


def stored_harp_result(lm: LoadedModel, run: HarpRun) -> HarpResult | None:
    """HARP for ``run`` if the disk cache holds it (a run on given layers), else None; never computes."""
    if run.choose:
        return None
    return stored_harp(lm, windows(lm, CALIB_TEXT, run.calib_tokens), run.layers, run.grid, disk_cache())


def comparison(lm: LoadedModel, run: HarpRun, axis: str) -> Comparison:
    """HARP (the run's own result) against the baselines matched on ``axis``, on the evaluation windows."""
    calib = windows(lm, CALIB_TEXT, run.calib_tokens)
    result = harp_result(lm, run)
    for metric in SHARED_SCORES:  # the Importance page's cache entries: scored once for both pages
        head_result(lm, calib, metric)
    with progress_bar(f"Building the baselines matched on {axis} and evaluating every mask", compare_job(lm)) as bar:
        return compare(lm, calib, windows(lm), result.layers, axis, run.grid, bar, result, disk_cache())


def drift_reports(lm: LoadedModel, evaluation: Windows, mask: Mask) -> MaskDrift:
    """Drift of ``mask`` and, with drop-QK layers, of it at alpha = 1 (disk-cached)."""
    with progress_bar("Measuring residual-stream drift", drift_job(lm, mask)) as bar:
        return cached_mask_drift(lm, evaluation, mask, disk_cache(), bar)


def drift_job(lm: LoadedModel, mask: Mask) -> Job:
    """Drift runs one unpruned pass per window plus one per mask: twice the masks with drop-QK layers."""
    return job(lm, "drift_harp" if mask.drop_qk else "drift", "windows")


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


def stored_tasks(lm: LoadedModel, names: Sequence[str], mask: Mask | None) -> dict[str, TaskResult | None]:
    """The tasks ``names`` under ``mask`` that the disk cache holds (None for the others); nothing runs."""
    return {name: stored_task(lm, name, mask, disk_cache()) for name in names}


def task_suite(lm: LoadedModel, names: Sequence[str], mask: Mask | None, label: str) -> dict[str, TaskResult]:
    """The tasks ``names`` under ``mask`` (``label`` names it on the bar), computed with progress where not cached."""
    with progress_bar(f"Tasks for {label} (steps are thousandths of a task)") as bar:
        return run_suite(lm, names, mask, disk_cache(), bar)
