"""Budgeted mask search: the mask of lowest calibration perplexity that saves at least a budget.

A budget is one or more axes at once (``{"kv": 12288, "params": 3981312}``; see ``budget_targets``,
and ``budget.budget``, exact per KV group). The search combines structural moves (``search_moves``),
each a change of one layer:

- ``remove_attention``: the layer's attention branch is gone (alpha = 0; saves its KV, q/k/v/o);
- ``drop_qk``: HARP's drop-QK at the layer's closed-form norm-matching alpha (saves its KV, q/k);
- ``prune_group``: the query heads of one KV group (saves that group's KV, its q/k/v/o slices);
- ``prune_head``: one query head (parameters and FLOPs; only when such an axis is asked for),

then rescales every changed layer (per-layer alpha; a removed layer may come back as drop-QK with a
small alpha when the budget still holds).

**FLAP compensation** (``compensate=True``): every head or group pruned in a layer that keeps query
heads is scored with FLAP's bias compensation of that layer (``baselines.flap_compensation``: the
pruned channels' mean o_proj contribution on the calibration text, from the unpruned model, added as
an o_proj bias, mask v2). The bias costs ``hidden_size`` parameters per layer, counted in the budget.
The alpha phase then keeps a layer's bias only where dropping it would not lower the calibration NLL.

**Structure phase, lazy greedy.** Every move is first scored once from the unpruned model on a
*proxy* (the first ``proxy_windows`` calibration windows): its increase of mean NLL. Then, until the
budget is met: rank the legal moves by efficiency, increase of NLL per unit of progress (the share
of each axis' remaining need the move covers), rescore the ``shortlist`` best on the whole
calibration set under the current mask, commit the best fresh one. Scores are computed highest
layer first: a candidate differs from the current mask only at its layer, so the incremental
evaluator reruns that layer, those above it and the head, never anything below.

**Alpha phase.** Highest changed layer first, the layer's alpha grid (and its closed-form alpha) is
walked downhill on the whole calibration set from the layer's alpha (``descend``: the nearest alpha
on each side, then on along the better side while it improves), which ends where trying the whole
grid would when the NLL is unimodal in alpha, in about half the evaluations; a candidate that would
miss the budget is never tried. So the result always meets the budget: the structure phase only
stops once it is met, and the alpha phase never leaves it.

A beam would multiply the cost by its width; on the default model the lazy greedy with rescoring
already spends most of its time in the language-model head, so it is greedy only.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from analysis.activation_metrics import OProjStats, o_proj_input_stats
from analysis.architecture import Architecture, ModelShape
from analysis.baselines import flap_compensation, saved
from analysis.budget import Budget, budget
from analysis.budget_targets import check_targets, meets, progress_toward, savings
from analysis.cache import DiskCache
from analysis.corpus import Windows
from analysis.errors import HeadroomError
from analysis.evaluation import IncrementalEvaluator, Progress
from analysis.loading import LoadedModel
from analysis.mask_files import parse_mask
from analysis.masks import Mask
from analysis.norm_matching import closed_form_alpha, norm_targets
from analysis.rescale import HEAD_GRID
from analysis.search_moves import MOVE_KINDS, Move, all_moves, apply_move, check_move_kinds

DROP_QK_GRID = (0.0, 0.1, 0.2, 0.3, 0.4, 0.6, 0.8, 1.0)  # HARP's alphas on this model are mostly 0-0.4
SHORTLIST = 4
PROXY_WINDOWS = 2
ALPHA_PHASE = "descend"  # how the alpha phase walks each layer's grid (in the cache key and the settings)


@dataclass(frozen=True)
class TraceStep:
    """One committed change: a move of the structure phase or an alpha of the alpha phase."""

    phase: str  # "structure" or "alpha"
    change: str
    layer: int
    alpha: float
    calib_perplexity: float
    candidates: int  # masks evaluated on the whole calibration set to decide it
    saved: dict[str, int]  # every axis, after the change


@dataclass(frozen=True)
class SearchResult:
    """The mask found, what it saves, and how the search got there (all of it JSON via ``to_json``)."""

    mask: Mask
    targets: dict[str, int]
    seqlen: int
    budget: Budget
    calib_perplexity: float | None  # None only when interrupted before any mask met the budget
    unpruned_calib_perplexity: float
    trace: tuple[TraceStep, ...]
    proxy_evaluations: int
    full_evaluations: int
    interrupted: bool
    seconds: float
    settings: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        obj = asdict(self)
        obj["mask"] = self.mask.to_json()
        return obj

    @classmethod
    def from_json(cls, obj: dict[str, Any], mask: Mask) -> SearchResult:
        fields = {**obj, "mask": mask, "budget": Budget(**obj["budget"])}
        fields["trace"] = tuple(TraceStep(**s) for s in obj["trace"])
        return cls(**fields)


class _Scorer:
    """Mean NLL of masks on one evaluator, with drop-QK moves at their closed-form alpha.

    With ``stats`` (o_proj input statistics of the unpruned model on the calibration text), pruned
    heads come with FLAP's bias compensation of their layer; a drop-QK or removed layer loses its bias.
    """

    def __init__(self, arch: Architecture, windows: Windows, stats: OProjStats | None = None) -> None:
        self.evaluator = IncrementalEvaluator(arch, windows)
        self.targets = norm_targets(self.evaluator, range(arch.shape.num_layers))
        self.stats = stats
        self.calls = 0

    def candidate(self, mask: Mask, move: Move) -> Mask:
        trial = apply_move(mask, move, self.evaluator.arch.shape)
        if move.kind in ("prune_group", "prune_head"):
            return trial if self.stats is None else flap_compensation(self.evaluator.arch, trial, self.stats)
        trial = trial.with_bias(move.layer, None)  # a compensation measured for the layer's full attention
        if move.kind != "drop_qk":
            return trial
        alpha = closed_form_alpha(self.evaluator, trial, move.layer, self.targets[move.layer])
        return trial.with_layer(move.layer, alpha=alpha)

    def nll(self, mask: Mask) -> float:
        self.calls += 1
        return self.evaluator.perplexity(mask).mean_nll


def search(
    arch: Architecture,
    model_name: str,
    calib: Windows,
    targets: dict[str, int],
    seqlen: int,
    shortlist: int = SHORTLIST,
    proxy_windows: int = PROXY_WINDOWS,
    progress: Progress | None = None,
    compensate: bool = False,
    kinds: Sequence[str] = MOVE_KINDS,
) -> SearchResult:
    """The mask of lowest calibration perplexity found that saves at least ``targets`` at ``seqlen``.

    ``kinds`` restricts the structural moves (``prune_head`` is used only for a params or FLOPs
    budget): coarser moves leave fewer choices to fit the calibration text's noise.

    Interruptible: a ``KeyboardInterrupt`` (Ctrl-C, or raised by ``progress``) returns the best mask
    so far that meets the budget, marked ``interrupted``; if none met it yet, the remaining need is
    filled with the best-scored moves without evaluating them (``calib_perplexity`` None).
    """
    shape = arch.shape
    check_targets(targets, shape, seqlen)
    check_move_kinds(kinds)
    if shortlist < 1 or proxy_windows < 1:
        raise HeadroomError("shortlist and proxy windows must be at least 1")
    started = time.perf_counter()
    head_moves = any(axis != "kv" for axis in targets) and "prune_head" in kinds
    kinds = [k for k in MOVE_KINDS if k in kinds and (k != "prune_head" or head_moves)]
    settings = {"shortlist": shortlist, "proxy_windows": proxy_windows, "head_moves": head_moves, "moves": kinds}
    settings |= {"compensate": compensate}
    settings |= {"drop_qk_grid": list(DROP_QK_GRID), "head_grid": list(HEAD_GRID), "alpha_phase": ALPHA_PHASE}
    unpruned = Mask.unpruned(shape, model_name)
    moves = all_moves(shape, kinds)
    state: dict[str, Any] = {"mask": unpruned, "nll": math.nan, "best": None, "trace": [], "done": 0}
    # evaluations in all, for the progress bar: a guess, revised after every committed move
    state["expected"] = len(moves) + 8 * shortlist + 8 * _ALPHA_OPTIONS
    scores: dict[Move, float] = {}  # increase of mean NLL, stale once the mask changed
    scorers: list[_Scorer] = []

    def tick() -> None:
        state["done"] += 1
        if progress:
            progress(min(state["done"], state["expected"] - 1), state["expected"])

    try:
        stats = o_proj_input_stats(arch, calib) if compensate else None
        full = _Scorer(arch, calib, stats)
        scorers.append(full)
        state["nll"] = state["unpruned"] = full.nll(unpruned)
        proxy = full
        if proxy_windows < calib.num_windows:
            proxy = _Scorer(arch, replace(calib, input_ids=calib.input_ids[:proxy_windows]), stats)
            scorers.append(proxy)
        base = proxy.nll(unpruned)
        for move in moves:  # highest layer first
            scores[move] = proxy.nll(proxy.candidate(unpruned, move)) - base
            tick()
        _structure_phase(full, moves, targets, seqlen, shortlist, scores, state, tick)
        _alpha_phase(full, targets, seqlen, state, tick)
        interrupted = False
    except KeyboardInterrupt:
        interrupted = True
    if state["best"] is None:  # interrupted before the budget was met: fill it without evaluating
        mask = state["mask"]
        while not meets(budget(mask, shape, seqlen), targets):
            mask = apply_move(mask, _ranked(mask, moves, scores, targets, shape, seqlen)[0][1], shape)
        state["best"] = (None, mask)
    nll, mask = state["best"]
    if progress and not interrupted:
        progress(state["done"], state["done"])
    return SearchResult(
        mask=replace(mask, note=f"search: saves at least {targets} at seqlen {seqlen}"),
        targets=dict(targets),
        seqlen=seqlen,
        budget=budget(mask, shape, seqlen),
        calib_perplexity=None if nll is None else math.exp(nll),
        unpruned_calib_perplexity=math.exp(state.get("unpruned", math.nan)),
        trace=tuple(state["trace"]),
        proxy_evaluations=scorers[1].calls if len(scorers) > 1 else 0,
        full_evaluations=scorers[0].calls if scorers else 0,
        interrupted=interrupted,
        seconds=round(time.perf_counter() - started, 3),
        settings=settings,
    )


def _ranked(
    mask: Mask,
    moves: list[Move],
    scores: dict[Move, float],
    targets: dict[str, int],
    shape: ModelShape,
    seqlen: int,
) -> list[tuple[float, Move, float]]:
    """Legal moves that make progress and take nothing back, best first: (efficiency, move, progress).

    Efficiency is the move's (possibly stale) NLL increase per unit of progress; an unscored move
    ranks last. Ties keep the order of ``moves``.
    """
    before = budget(mask, shape, seqlen)
    ranked = []
    for move in moves:
        after = budget(apply_move(mask, move, shape), shape, seqlen)
        if any(saved(after, axis) < saved(before, axis) for axis in targets):
            continue
        step = progress_toward(before, after, targets)
        if step > 0:
            ranked.append((scores.get(move, math.inf) / step, move, step))
    ranked.sort(key=lambda r: r[0])
    return ranked


def _structure_phase(
    full: _Scorer,
    moves: list[Move],
    targets: dict[str, int],
    seqlen: int,
    shortlist: int,
    scores: dict[Move, float],
    state: dict[str, Any],
    tick: Callable[[], None],
) -> None:
    """Commit moves until the budget is met; each decided on the whole calibration set among the shortlist."""
    shape = full.evaluator.arch.shape
    while not meets(budget(state["mask"], shape, seqlen), targets):
        short = _ranked(state["mask"], moves, scores, targets, shape, seqlen)[:shortlist]
        if not short:
            kinds = sorted({move.kind for move in moves})
            raise HeadroomError(
                f"the moves {', '.join(kinds) or '(none)'} cannot save {targets}: "
                f"{savings(budget(state['mask'], shape, seqlen))} is the most they reach; allow more kinds of move",
                settings=("moves",),
            )
        fresh = []
        for _, move, step in sorted(short, key=lambda r: -r[1].layer):  # highest layer first
            candidate = full.candidate(state["mask"], move)
            nll = full.nll(candidate)
            tick()
            scores[move] = nll - state["nll"]
            fresh.append((scores[move] / step, move, candidate, nll))
        _, move, mask, nll = min(fresh, key=lambda r: r[0])
        state["mask"], state["nll"] = mask, nll
        b = budget(mask, shape, seqlen)
        state["trace"].append(
            TraceStep("structure", str(move), move.layer, mask.alpha[move.layer], math.exp(nll), len(fresh), savings(b))
        )
        if meets(b, targets):
            state["best"] = (nll, mask)
        steps = len(state["trace"])  # so far; the rest at the mean progress per step, then the alpha phase
        left = sum(max(0, amount - saved(b, axis)) / amount for axis, amount in targets.items())
        share = (len(targets) - left) / steps
        changed = len({step.layer for step in state["trace"]})
        state["expected"] = state["done"] + round(left / share * shortlist) + changed * _ALPHA_OPTIONS


_ALPHA_OPTIONS = 4  # the alpha phase's evaluations at a changed layer, about (``descend``)


def _layer_options(full: _Scorer, mask: Mask, layer: int) -> tuple[float, list[tuple[float, Mask]]]:
    """The alphas the alpha phase may try at a changed layer, with their masks, and the layer's alpha now.

    A removed layer may come back as drop-QK with a small alpha: its alpha now counts as 0.
    """
    alpha = mask.alpha[layer]
    if alpha == 0.0 and layer not in mask.drop_qk:
        return alpha, [(a, mask.with_layer(layer, drop_qk=True, alpha=a)) for a in DROP_QK_GRID if a > 0]
    if not any(mask.heads[layer]):
        return alpha, []
    closed = closed_form_alpha(full.evaluator, mask, layer, full.targets[layer])
    grid = DROP_QK_GRID if layer in mask.drop_qk else HEAD_GRID
    return alpha, [(a, mask.with_layer(layer, alpha=a)) for a in sorted({*grid, closed}) if a != alpha]


def descend(
    options: Sequence[tuple[float, Any]], start: float, start_value: float, value_of: Callable[[Any], float]
) -> tuple[float, Any, int]:
    """Walk downhill along ``options`` (``(alpha, item)``, sorted) from ``start``: (value, item, evaluations).

    The nearest option on each side of ``start`` is tried; the walk goes on along the better side
    (the lower alphas on a tie) while each next option is strictly better. On a value unimodal in
    alpha it ends where trying every option would, after two evaluations more than the steps it
    takes rather than one per option. The item is None when no option beats ``start``.
    """
    below = [o for o in options if o[0] < start][::-1]  # nearest first
    above = [o for o in options if o[0] > start]
    firsts = [(value_of(side[0][1]), side) for side in (below, above) if side]
    evaluations = len(firsts)
    best_value, best_item = start_value, None
    if firsts:
        value, side = min(firsts, key=lambda f: f[0])
        for i, (_, item) in enumerate(side):
            if i > 0:
                value = value_of(item)
                evaluations += 1
            if not value < best_value:
                break
            best_value, best_item = value, item
    return best_value, best_item, evaluations


def _alpha_phase(
    full: _Scorer, targets: dict[str, int], seqlen: int, state: dict[str, Any], tick: Callable[[], None]
) -> None:
    """Per changed layer, highest first: the alpha (or drop-QK alpha) of lowest NLL that keeps the budget.

    The alphas are walked downhill from the layer's own (:func:`descend`), then a compensated layer
    tries its best alpha without the bias.
    """
    shape = full.evaluator.arch.shape
    mask, nll = state["mask"], state["nll"]
    changed = [i for i in range(shape.num_layers) if mask.layer(i) != Mask.unpruned(shape, "").layer(i)]
    state["expected"] = state["done"] + len(changed) * _ALPHA_OPTIONS

    def value_of(candidate: Mask) -> float:
        tick()
        return full.nll(candidate)

    for layer in sorted(changed, reverse=True):
        alpha, options = _layer_options(full, mask, layer)
        options = [(a, m) for a, m in options if meets(budget(m, shape, seqlen), targets)]
        value, better, tried = descend(options, alpha, nll, value_of)
        if better is not None:
            nll, mask = value, better
        if mask.bias_of(layer) is not None:
            unbiased = mask.with_bias(layer, None)
            value = value_of(unbiased)
            tried += 1
            if value < nll:  # strict: a tie keeps what is there
                nll, mask = value, unbiased
        state["mask"], state["nll"], state["best"] = mask, nll, (nll, mask)
        b = budget(mask, shape, seqlen)
        change = f"alpha({layer})" + (" drop_qk" if layer in mask.drop_qk else "")
        state["trace"].append(TraceStep("alpha", change, layer, mask.alpha[layer], math.exp(nll), tried, savings(b)))


def cached_search(
    lm: LoadedModel,
    calib: Windows,
    targets: dict[str, int],
    seqlen: int,
    shortlist: int = SHORTLIST,
    proxy_windows: int = PROXY_WINDOWS,
    cache: DiskCache | None = None,
    progress: Progress | None = None,
    refresh: bool = False,
    compensate: bool = False,
    kinds: Sequence[str] = MOVE_KINDS,
) -> SearchResult:
    """:func:`search` through the disk cache; an interrupted search is returned but never stored."""
    cache = cache or DiskCache()
    parts = {**lm.cache_key(), **calib.cache_key(), "targets": targets, "seqlen": seqlen}
    parts |= {"shortlist": shortlist, "proxy_windows": proxy_windows, "moves": [k for k in MOVE_KINDS if k in kinds]}
    parts |= {"compensate": True} if compensate else {}  # searches cached before the option keep their key
    parts |= {"alpha_phase": ALPHA_PHASE}  # a search with the whole alpha grid per layer is not this one
    value = None if refresh else cache.get_json("search", parts)
    if value is None:
        result = search(lm.arch, lm.name, calib, targets, seqlen, shortlist, proxy_windows, progress, compensate, kinds)
        if result.interrupted:
            return result
        value = result.to_json()
        cache.put_json("search", parts, value)
    return SearchResult.from_json(value, parse_mask(value["mask"], lm.shape, lm.name, lm.fingerprint))
