"""What every Streamlit page shares: the cached model, the user's choices, the current mask and plot builders.

Pages call these instead of touching ``st.session_state`` keys or the backend's caches themselves,
so a choice made on one page carries to every other and the model is loaded once per process.
Nothing here computes a number: that is ``analysis/``'s job; this module caches, routes and draws.

Session isolation: a mask lives only in ``st.session_state`` (per browser session). Cached resources
(the model, the live evaluator) are shared by every session and never hold a mask between calls.
Plots put layer 0 at the bottom (heatmaps) or on the left (per-layer curves), on every page.
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
import streamlit as st

from analysis.cache import DiskCache, default_root
from analysis.comparison import Comparison, compare
from analysis.corpus import Windows, decode_text, load_text, make_windows
from analysis.drift import DriftReport, PositionDrift, cached_harp_drift, cached_layer_drift, position_drift
from analysis.errors import HeadroomError
from analysis.evaluation import IncrementalEvaluator, PerplexityResult
from analysis.files import atomic_write_bytes
from analysis.harp import HarpResult, cached_harp
from analysis.head_map import HeadMap, cached_head_map
from analysis.importance import (
    DESCRIPTIVE_METRICS,
    HeadScores,
    attention_block_influence,
    block_influence,
    cached_head_result,
)
from analysis.loading import DEFAULT_MODEL, LoadedModel, load_model
from analysis.masks import Mask, mask_warnings, parse_mask

log = logging.getLogger(__name__)

# st.session_state keys; a page never spells them out.
MODEL = "model_spec"
EVAL_TEXT = "eval_text"
CALIB_TEXT = "calib_text"
SEQLEN = "seqlen"
MAX_TOKENS = "max_tokens"
MASK = "mask_json"
HISTORY = "mask_history"  # earlier masks of this session, for undo
HARP_RUN = "harp_run"  # the parameters of the session's last HARP run: layers, grid, calibration tokens
LIVE_TOKENS = "live_tokens"  # evaluation tokens of the editor's live perplexity
MESSAGE = "pending_error"  # an error raised in a widget callback, shown on the next run

DEFAULTS: dict[str, object] = {
    MODEL: DEFAULT_MODEL,
    EVAL_TEXT: "default-eval",
    CALIB_TEXT: "default-calib",
    SEQLEN: 256,
    MAX_TOKENS: 2048,
    LIVE_TOKENS: 1024,
}
UNDO_DEPTH = 100
LAYOUT = {"margin": {"l": 60, "r": 20, "t": 50, "b": 50}}


@st.cache_resource(show_spinner="Loading the model (the first start converts the GGUF, about 30 s)…")
def shared_model(spec: str) -> LoadedModel:
    """One model per spec per process, shared read-only by every session (masks go through hooks)."""
    return load_model(spec)


def disk_cache() -> DiskCache:
    """The result cache under ``$HEADROOM_CACHE`` (or ``cache/``), one object per root."""
    return _disk_cache(str(default_root()))


@st.cache_resource
def _disk_cache(root: str) -> DiskCache:
    return DiskCache(Path(root))


def choice(key: str) -> object:
    """The session's value for ``key`` (one of the constants above), or its default."""
    return st.session_state.get(key, DEFAULTS.get(key))


def setting(widget: Callable[..., Any], label: str, key: str, **kwargs: Any) -> Any:
    """A widget whose value is the session's ``choice(key)`` and survives page switches.

    Streamlit forgets a widget's state on pages that do not draw it, so the widget gets its own key
    and writes the value through to ``key`` on change.
    """
    widget_key = f"widget_{key}"
    if widget_key not in st.session_state:
        st.session_state[widget_key] = choice(key)
    return widget(label, key=widget_key, on_change=_store, args=(key, widget_key), **kwargs)


def _store(key: str, widget_key: str) -> None:
    st.session_state[key] = st.session_state[widget_key]


def model() -> LoadedModel:
    """The model the user picked on the home page (raises HeadroomError for a bad spec)."""
    return shared_model(str(choice(MODEL)))


def windows(lm: LoadedModel, which: str = EVAL_TEXT, max_tokens: int | None = None) -> Windows:
    """Evaluation (``EVAL_TEXT``) or calibration (``CALIB_TEXT``) windows at the session's settings.

    ``max_tokens`` overrides the session's token count (the editor's live evaluation, HARP's calibration).
    """
    tokens = int(choice(MAX_TOKENS)) if max_tokens is None else int(max_tokens)
    return _windows(lm.name, lm.fingerprint, str(choice(which)), int(choice(SEQLEN)), tokens)


@st.cache_resource(max_entries=16)
def _windows(name: str, fingerprint: str, text_spec: str, seqlen: int, max_tokens: int) -> Windows:
    lm = model()
    assert lm.fingerprint == fingerprint, "windows requested for a model that is not the session's"
    return make_windows(lm.tokenizer, load_text(text_spec), seqlen, max_tokens, lm.max_positions)


def save_upload(name: str, data: bytes) -> str:
    """Validate an uploaded text and keep it under the cache root; returns the path to use as a text spec."""
    text = decode_text(name, data)
    # The browser supplies the name: keep a plain file name of it, never a folder or a path out of uploads/.
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", Path(name).name).lstrip(".") or "upload.txt"
    path = default_root() / "uploads" / text.sha256[:16] / safe
    if not path.is_file():
        atomic_write_bytes(path, text.text.encode("utf-8"))
    return str(path)


def current_mask(lm: LoadedModel) -> Mask:
    """The session's mask for ``lm``; unpruned when none is set or it was made for another model."""
    obj = st.session_state.get(MASK)
    if obj is not None and obj.get("model", {}).get("name") == lm.name and _fits(obj, lm):
        return parse_mask(obj, lm.shape, lm.name, lm.fingerprint)
    return Mask.unpruned(lm.shape, lm.name, lm.fingerprint)


def _fits(obj: dict[str, Any], lm: LoadedModel) -> bool:
    model_info = obj.get("model", {})
    return (model_info.get("num_layers"), model_info.get("num_heads")) == (lm.shape.num_layers, lm.shape.num_heads)


def set_mask(mask: Mask) -> None:
    """Make ``mask`` the session's mask (the editor, HARP and head-map pages all write through this)."""
    st.session_state[MASK] = mask.to_json()


def change_mask(lm: LoadedModel, mask: Mask) -> None:
    """:func:`set_mask`, remembering the mask it replaces so that :func:`undo` can bring it back."""
    history = st.session_state.setdefault(HISTORY, [])
    history.append(current_mask(lm).to_json())
    del history[:-UNDO_DEPTH]
    set_mask(mask)


def undo() -> bool:
    """Go back to the mask before the last :func:`change_mask`; False when there is none."""
    history = st.session_state.get(HISTORY) or []
    if not history:
        return False
    st.session_state[MASK] = history.pop()
    return True


# The mask in a URL: `pruned=5:0.3,29:4` (layer:heads), `drop_qk=26,27`, `alpha=26:0.2,27:0.8`.
QUERY_KEYS = ("pruned", "drop_qk", "alpha")


def mask_to_query(mask: Mask) -> dict[str, str]:
    """The mask as short query-string values; empty for the unpruned mask."""
    pruned = [
        f"{layer}:" + ".".join(str(h) for h, keep in enumerate(row) if not keep)
        for layer, row in enumerate(mask.heads)
        if not all(row)
    ]
    alpha = [f"{layer}:{a:g}" for layer, a in enumerate(mask.alpha) if a != 1.0]
    query = {
        "pruned": ",".join(pruned),
        "drop_qk": ",".join(str(i) for i in sorted(mask.drop_qk)),
        "alpha": ",".join(alpha),
    }
    return {k: v for k, v in query.items() if v}


def mask_from_query(query: dict[str, str], lm: LoadedModel) -> Mask:
    """Inverse of :func:`mask_to_query`, validated like a mask file (HeadroomError says what is wrong)."""

    def pairs(key: str) -> Iterator[tuple[int, str]]:
        for item in filter(None, query.get(key, "").split(",")):
            layer, sep, rest = item.partition(":")
            if not sep or not layer.isdigit():
                raise HeadroomError(
                    f"the link's '{key}' entry '{item}' is not 'layer:value'; the editor starts unpruned"
                )
            yield int(layer), rest

    try:
        heads = [[1] * lm.shape.num_heads for _ in range(lm.shape.num_layers)]
        for layer, rest in pairs("pruned"):
            for head in rest.split("."):
                heads[layer][int(head)] = 0
        obj = {
            "format": "headroom.mask",
            "version": 1,
            "heads": heads,
            "drop_qk": [int(i) for i in filter(None, query.get("drop_qk", "").split(","))],
            "alpha": {str(layer): float(value) for layer, value in pairs("alpha")},
        }
    except (ValueError, IndexError) as e:
        raise HeadroomError(f"the link's mask does not fit this model ({e}); the editor starts unpruned") from None
    try:
        return parse_mask(obj, lm.shape, lm.name, lm.fingerprint)
    except HeadroomError as e:
        raise HeadroomError(f"the link's mask is invalid: {e}; the editor starts unpruned") from None


@dataclass
class _LiveSlot:
    """The evaluator shared by every session on one model and one set of windows, and its lock."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    evaluator: IncrementalEvaluator | None = None


@st.cache_resource(max_entries=4)
def _live_slot(fingerprint: str, windows_key: str) -> _LiveSlot:
    return _LiveSlot()


def live_perplexity(lm: LoadedModel, evaluation: Windows, mask: Mask) -> PerplexityResult:
    """Perplexity of ``mask`` from the incremental evaluator shared by all sessions on these windows.

    The evaluator is stateful (the residual stream of the last mask), so calls take turns on its
    lock; its memory of recent masks makes an undo or a revisit instant for every session. A run
    cancelled mid-way leaves it marked stale, and the next call repairs it.
    """
    slot = _live_slot(lm.fingerprint, json.dumps(evaluation.cache_key(), sort_keys=True))
    with slot.lock:
        if slot.evaluator is None:
            with progress_bar("Preparing the live evaluator (one full pass)") as bar:
                slot.evaluator = IncrementalEvaluator(lm.arch, evaluation, bar)
        return slot.evaluator.perplexity(mask)


@dataclass
class ProgressBar:
    """A ``Progress`` callback drawing an ``st.progress`` bar; ``done()`` removes it."""

    text: str

    def __post_init__(self) -> None:
        self._bar = st.progress(0.0, text=self.text)

    def __call__(self, done: int, total: int) -> None:
        self._bar.progress(min(done / max(total, 1), 1.0), text=f"{self.text} ({done}/{total})")

    def done(self) -> None:
        self._bar.empty()


@contextmanager
def progress_bar(text: str) -> Iterator[ProgressBar]:
    """A :class:`ProgressBar` removed when the block ends, however it ends."""
    bar = ProgressBar(text)
    try:
        yield bar
    finally:
        bar.done()


def head_result(lm: LoadedModel, calib: Windows, metric: str, layers: Sequence[int] | None = None) -> HeadScores:
    """A head metric and its details on the calibration windows, from the disk cache when seen, else with progress."""
    with progress_bar(f"Scoring heads by {metric}") as bar:
        return cached_head_result(lm, calib, metric, layers, disk_cache(), bar)


def head_scores(
    lm: LoadedModel, calib: Windows, metric: str, layers: Sequence[int] | None = None
) -> list[list[float | None]]:
    """The rows of :func:`head_result`."""
    return head_result(lm, calib, metric, layers).scores


def cheapest_heads(lm: LoadedModel, calib: Windows, metric: str, k: int) -> list[tuple[int, int]]:
    """The k heads a metric marks cheapest to remove: its lowest, or for pattern statistics its highest."""
    scores = head_scores(lm, calib, metric)
    if metric in DESCRIPTIVE_METRICS:
        scores = [[None if v is None else -v for v in row] if row else row for row in scores]
    return lowest_heads(scores, k)


def head_map(lm: LoadedModel, calib: Windows, metrics: Sequence[str], clusters: int, seed: int) -> HeadMap:
    """The head map on the calibration windows (disk-cached; the first UMAP run also compiles numba code)."""
    with progress_bar("Measuring head features and projecting them") as bar:
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


def harp_result(lm: LoadedModel, run: dict[str, Any]) -> HarpResult:
    """HARP for a stored run (``HARP_RUN``): from the disk cache when seen, else searched with progress."""
    calib = windows(lm, CALIB_TEXT, run["calib_tokens"])
    with progress_bar(f"HARP: searching alpha on layers {run['layers']}") as bar:
        return cached_harp(lm, calib, run["layers"], run["grid"], disk_cache(), bar)


def comparison(lm: LoadedModel, run: dict[str, Any], axis: str) -> Comparison:
    """HARP against the baselines matched on ``axis``, on the session's evaluation windows."""
    calib = windows(lm, CALIB_TEXT, run["calib_tokens"])
    with progress_bar(f"Building and evaluating baselines matched on {axis}") as bar:
        return compare(lm, calib, windows(lm), run["layers"], axis, run["grid"], bar)


def drift_reports(lm: LoadedModel, evaluation: Windows, mask: Mask) -> dict[str, DriftReport]:
    """Drift of ``mask`` (``pruned_with_rescaling``) and, with drop-QK layers, of it at alpha = 1 (disk-cached)."""
    with st.spinner("Measuring residual-stream drift (cached after the first time)…"):
        if mask.drop_qk:
            return cached_harp_drift(lm, evaluation, mask, disk_cache())
        return {"pruned_with_rescaling": cached_layer_drift(lm, evaluation, mask, disk_cache())}


def window_drift(lm: LoadedModel, evaluation: Windows, mask: Mask, window: int) -> PositionDrift:
    """Per-position drift of one window, memoised per process for this model, windows, mask and window."""
    key = json.dumps([evaluation.cache_key(), mask.cache_key()], sort_keys=True)
    return _window_drift(lm.fingerprint, key, window, _lm=lm, _windows=evaluation, _mask=mask)


@st.cache_data(max_entries=32, show_spinner="Measuring drift along one window…")
def _window_drift(
    fingerprint: str, key: str, window: int, *, _lm: LoadedModel, _windows: Windows, _mask: Mask
) -> PositionDrift:
    return position_drift(_lm.arch, _windows, _mask, window)


def lowest_heads(scores: list[list[float | None]], k: int) -> list[tuple[int, int]]:
    """The ``k`` lowest-scored (layer, head) pairs among the scored ones, ties by layer then head."""
    scored = [
        (s, layer, head) for layer, row in enumerate(scores) if row for head, s in enumerate(row) if s is not None
    ]
    return [(layer, head) for _, layer, head in sorted(scored)[:k]]


# ---- page scaffolding ------------------------------------------------------------------------------


def page(title: str, caption: str) -> None:
    """Page config, title and the error raised by a widget callback of the previous run, if any."""
    st.set_page_config(page_title=f"Headroom · {title}", layout="wide")
    st.title(title)
    st.caption(caption)
    pending = st.session_state.pop(MESSAGE, None)
    if pending:
        st.error(pending)


@contextmanager
def guard() -> Iterator[None]:
    """Show any failure of the block as ``st.error`` with what to do; the page never shows a traceback."""
    try:
        yield
    except HeadroomError as e:
        st.error(str(e))
    except Exception as e:  # the app must not die or show a traceback; the log keeps the details
        log.exception("page failed")
        st.error(
            f"Something went wrong: {type(e).__name__}: {e}. Change the settings or go back to the home page and "
            "try again; if it persists, report it with the model and settings you used."
        )


def safe(callback: Callable[..., None], *bound: Any) -> Callable[..., None]:
    """A widget callback (given ``bound`` first) whose HeadroomError is shown as ``st.error`` on the next run."""

    def run(*args: Any, **kwargs: Any) -> None:
        try:
            callback(*bound, *args, **kwargs)
        except HeadroomError as e:
            st.session_state[MESSAGE] = str(e)

    return run


def sidebar_summary(lm: LoadedModel) -> None:
    """The session's model, texts and mask, so every page says what it shows."""
    mask = current_mask(lm)
    st.sidebar.markdown(
        f"**Model** {lm.name} ({lm.shape.num_layers} x {lm.shape.num_heads} heads)  \n"
        f"**Texts** eval `{choice(EVAL_TEXT)}`, calibration `{choice(CALIB_TEXT)}`  \n"
        f"**Windows** {choice(SEQLEN)} tokens, {choice(MAX_TOKENS)} tokens in all  \n"
        f"**Mask** {describe(mask)}"
    )
    for warning in mask_warnings(mask, lm.fingerprint):
        st.sidebar.warning(warning)


def describe(mask: Mask) -> str:
    if mask.is_unpruned:
        return "unpruned"
    parts = [f"{mask.pruned_heads} heads pruned"] if mask.pruned_heads else []
    if mask.drop_qk:
        parts.append(f"drop-QK on layers {sorted(mask.drop_qk)}")
    removed = [i for i, a in enumerate(mask.alpha) if a == 0.0]
    if removed:
        parts.append(f"attention removed on layers {removed}")
    scaled = {i: a for i, a in enumerate(mask.alpha) if a not in (0.0, 1.0)}
    if scaled:
        parts.append("alpha " + ", ".join(f"{i}: {a:g}" for i, a in scaled.items()))
    return "; ".join(parts)


# ---- plot builders -----------------------------------------------------------------------------------

SCALES = ("value", "log", "rank")


def ranks(rows: list[list[float | None]]) -> list[list[int | None]]:
    """Rank of every scored head among all scored heads, 1 = lowest (the first a pruner removes)."""
    width = max(len(row) for row in rows if row)
    order = lowest_heads(rows, sum(s is not None for row in rows if row for s in row))
    rank = {cell: i + 1 for i, cell in enumerate(order)}
    return [[rank.get((layer, head)) for head in range(width)] for layer in range(len(rows))]


def head_heatmap(
    rows: list[list[float | None]], title: str, label: str, scale: str = "value", num_heads: int | None = None
) -> go.Figure:
    """Layers x heads heatmap of a head score (layer 0 at the bottom); hover shows value and rank.

    ``scale`` colours by the value, by log10 of it (positive scores only) or by rank. Every cell can
    be clicked (see :func:`selected_head`).
    """
    width = num_heads or max(len(r) for r in rows if r)
    values = [row or [None] * width for row in rows]
    rank = ranks(values)
    n = sum(r is not None for row in rank for r in row)
    if scale == "log":
        if any(v is not None and v <= 0 for row in values for v in row):
            raise HeadroomError(
                f"{label} has zero or negative scores, so it has no log colour scale; choose value or rank"
            )
        colour = [[math.log10(v) if v is not None else None for v in row] for row in values]
        bar = f"log10 {label}"
    elif scale == "rank":
        colour, bar = rank, "rank (1 = lowest)"
    else:
        colour, bar = values, label
    hover = [
        [
            f"layer {layer}, head {head}<br>{label}: {v:.4g}<br>rank {rank[layer][head]} of {n} (1 = lowest)"
            if v is not None
            else f"layer {layer}, head {head}<br>not scored"
            for head, v in enumerate(row)
        ]
        for layer, row in enumerate(values)
    ]
    return grid_figure(colour, hover, title, bar, "Viridis")


def grid_figure(
    colour: list[list[Any]],
    hover: list[list[str]],
    title: str,
    colourbar: str | None,
    colourscale: Any,
    zmin: float | None = None,
    zmax: float | None = None,
) -> go.Figure:
    """A clickable layers x heads grid: a heatmap with an invisible marker on every cell to select it.

    ``colourbar`` None hides the colour bar (for a grid whose colours the title explains).
    """
    layers, heads = len(colour), len(colour[0])
    fig = go.Figure(
        go.Heatmap(
            z=colour,
            x=list(range(heads)),
            y=list(range(layers)),
            colorscale=colourscale,
            zmin=zmin,
            zmax=zmax,
            showscale=colourbar is not None,
            colorbar={"title": {"text": colourbar or ""}},
            hoverinfo="skip",
        )
    )
    cells = [(layer, head) for layer in range(layers) for head in range(heads)]
    fig.add_trace(
        go.Scatter(
            x=[h for _, h in cells],
            y=[layer for layer, _ in cells],
            mode="markers",
            marker={"size": 14, "opacity": 0.0, "symbol": "square"},
            customdata=[[layer, head] for layer, head in cells],
            hovertext=[hover[layer][head] for layer, head in cells],
            hoverinfo="text",
            showlegend=False,
        )
    )
    fig.update_layout(
        title=title,
        xaxis={"title": "query head", "dtick": 1, "range": [-0.5, heads - 0.5]},
        yaxis={"title": "layer (0 at the bottom)", "dtick": max(1, layers // 15), "range": [-0.5, layers - 0.5]},
        height=max(320, 18 * layers + 120),
        clickmode="event+select",
        **LAYOUT,
    )
    return fig


def selection_points(event: Any) -> list[dict[str, Any]]:
    """The selected points of a ``st.plotly_chart(..., on_select=...)`` event (a dict or an attribute object)."""
    if isinstance(event, dict):
        return event.get("selection", {}).get("points", [])
    if event is not None and hasattr(event, "selection"):
        return event.selection.get("points", [])
    return []


def selected_head(event: Any) -> tuple[int, int] | None:
    """The (layer, head) clicked in a :func:`grid_figure` chart's selection event, if any."""
    for point in selection_points(event):
        data = point.get("customdata")
        if data is not None and len(data) == 2:
            return int(data[0]), int(data[1])
    return None


def layer_bars(values: Sequence[float | None], title: str, label: str, horizontal: bool = True) -> go.Figure:
    """One bar per layer; horizontal bars put layer 0 at the bottom, beside a head heatmap."""
    layers = list(range(len(values)))
    bar = go.Bar(x=values, y=layers, orientation="h") if horizontal else go.Bar(x=layers, y=values)
    fig = go.Figure(bar)
    layer_axis = {"title": "layer", "dtick": max(1, len(layers) // 15), "range": [-0.5, len(layers) - 0.5]}
    value_axis = {"title": label}
    fig.update_layout(
        title=title,
        xaxis=value_axis if horizontal else layer_axis,
        yaxis=layer_axis if horizontal else value_axis,
        height=max(320, 18 * len(layers) + 120) if horizontal else 360,
        **LAYOUT,
    )
    return fig


def layer_lines(
    series: dict[str, Sequence[float]],
    title: str,
    label: str,
    bands: dict[str, tuple[Sequence[float], Sequence[float]]] | None = None,
    layers: Sequence[int] | None = None,
) -> go.Figure:
    """Per-layer curves, layer 0 on the left; ``bands`` shades a (low, high) range around a named curve."""
    fig = go.Figure()
    for name, ys in series.items():
        xs = list(layers) if layers is not None else list(range(len(ys)))
        if bands and name in bands:
            low, high = bands[name]
            fig.add_trace(
                go.Scatter(
                    x=xs + xs[::-1],
                    y=list(high) + list(low)[::-1],
                    fill="toself",
                    opacity=0.2,
                    line={"width": 0},
                    name=f"{name} (10-90 % of tokens)",
                    hoverinfo="skip",
                )
            )
        fig.add_trace(go.Scatter(x=xs, y=list(ys), mode="lines+markers", name=name))
    fig.update_layout(
        title=title,
        xaxis={"title": "layer", "dtick": 1 if len(fig.data[0].x) <= 32 else None},
        yaxis={"title": label},
        height=380,
        **LAYOUT,
    )
    return fig
