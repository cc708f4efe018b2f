"""The mask editor's edits of the session's mask: what its grid, forms, presets and upload do, undo, the last change.

Each edit goes through :func:`change`, which keeps the mask before it for the "what changed" line of
the live panel (:func:`last_change`). The widget callbacks read the widgets by the keys the editor
page gives them: ``toggle_layer`` / ``toggle_head``, ``mode_layer`` / ``mode_mode`` / ``mode_alpha``
and ``preset_name`` / ``preset_metric`` / ``preset_k``.
"""

from __future__ import annotations

import streamlit as st

from analysis.errors import HeadroomError
from analysis.loading import LoadedModel
from analysis.mask_files import decode_mask, parse_mask
from analysis.masks import Mask
from ui import backend, session
from ui.editor import MODES, mode_of
from ui.head_grids import selected_head

PRESETS = ("unpruned", "HARP result", "lowest heads of a metric")
LAST_CHANGE = "editor_last_change"  # {"what", "before", "after"}: the session's last edit of the mask
GRID_VERSION = "grid_version"  # bumped by a click on the grid, for a fresh chart without the selection


def change(lm: LoadedModel, mask: Mask, what: str) -> None:
    """Make ``mask`` the session's mask (undoable) and remember ``what`` changed, for the "what changed" line."""
    before = session.current_mask(lm)
    session.change_mask(lm, mask)
    st.session_state[LAST_CHANGE] = {"what": what, "before": before.to_json(), "after": mask.to_json()}


def undo(lm: LoadedModel) -> None:
    before = session.current_mask(lm)
    if session.undo():
        after = session.current_mask(lm)
        st.session_state[LAST_CHANGE] = {"what": "undo", "before": before.to_json(), "after": after.to_json()}


def last_change(lm: LoadedModel, mask: Mask) -> tuple[str, Mask] | None:
    """What the last edit did and the mask before it, if it produced ``mask`` (a link or another page may not have)."""
    entry = st.session_state.get(LAST_CHANGE)
    if entry is None or entry["after"] != mask.to_json():
        return None
    return entry["what"], parse_mask(entry["before"], lm.shape, lm.name, lm.fingerprint)


def toggle(layer: int, head: int) -> None:
    lm = backend.model()
    mask = session.current_mask(lm)
    keep = not mask.heads[layer][head]
    what = f"{'restored' if keep else 'pruned'} layer {layer} head {head}"
    change(lm, mask.with_head(layer, head, keep), what)


def grid_key() -> str:
    """The key of the grid chart: a new one after every click, so that no selection stays on the fresh grid."""
    return f"grid_{st.session_state.get(GRID_VERSION, 0)}"


def clicked(chart_key: str) -> None:
    cell = selected_head(st.session_state.get(chart_key))
    if cell is not None:
        toggle(*cell)
        st.session_state[GRID_VERSION] = st.session_state.get(GRID_VERSION, 0) + 1


def toggle_from_form() -> None:
    toggle(int(st.session_state.toggle_layer), int(st.session_state.toggle_head))


def set_layer() -> None:
    lm, layer, mode = backend.model(), int(st.session_state.mode_layer), st.session_state.mode_mode
    alpha = 0.0 if mode == MODES[2] else float(st.session_state.mode_alpha)
    mask = session.current_mask(lm).with_layer(layer, drop_qk=mode == MODES[1], alpha=alpha)
    change(lm, mask, f"layer {layer} set to {mode}, α={alpha:g}")


def preset(name: str, metric: str, k: int) -> None:
    lm = backend.model()
    mask = Mask.unpruned(lm.shape, lm.name, lm.fingerprint)
    if name == "HARP result":
        run = st.session_state.get(session.HARP_RUN)
        if run is None:
            raise HeadroomError("no HARP result in this session yet; run HARP on the HARP page first")
        mask = backend.harp_result(lm, run).mask
    elif name == "lowest heads of a metric":
        mask = mask.with_heads(backend.cheapest_heads(lm, backend.windows(lm, session.CALIB_TEXT), metric, k), False)
        name = f"the {k} lowest heads of {metric}"
    change(lm, mask, f"preset: {name}")


def preset_from_form() -> None:
    state = st.session_state
    preset(state.preset_name, state.preset_metric, int(state.preset_k))


def upload(key: str) -> None:
    lm, file = backend.model(), st.session_state.get(key)
    if file is not None:
        mask = decode_mask(file.name, file.getvalue(), lm.shape, lm.name, lm.fingerprint)
        change(lm, mask, f"loaded {file.name}")


def prefill_layer_form(mask: Mask, layer: int) -> None:
    """Show the chosen layer's mode and alpha in the layer form, whenever the layer or its settings change.

    Streamlit drops a widget's state on a run of another page, so back from there the form is filled again.
    """
    spec = mask.layer(layer)
    if st.session_state.get("mode_prefilled") != (layer, spec) or "mode_alpha" not in st.session_state:
        st.session_state["mode_prefilled"] = (layer, spec)
        st.session_state.mode_mode = mode_of(mask, layer)
        st.session_state.mode_alpha = float(spec.alpha)
