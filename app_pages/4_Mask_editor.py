"""Mask editor: toggle heads, set per-layer modes and alpha, and watch the live perplexity and budget.

The mask lives in this session only (``session.current_mask`` / ``session.change_mask``) and is mirrored in
the URL; the live perplexity comes from the incremental evaluator shared by all sessions.
"""

from __future__ import annotations

import streamlit as st

from analysis.errors import HeadroomError
from analysis.generation import greedy_continuation
from analysis.importance import HEAD_METRICS
from analysis.masks import MAX_MASK_BYTES, Mask, budget, decode_mask
from ui import backend, plots, scaffold, session

MODES = ("full", "drop-QK", "attention removed")


def toggle(layer: int, head: int) -> None:
    lm = backend.model()
    mask = session.current_mask(lm)
    session.change_mask(lm, mask.with_head(layer, head, not mask.heads[layer][head]))


def clicked(chart_key: str) -> None:
    cell = plots.selected_head(st.session_state.get(chart_key))
    if cell is not None:
        toggle(*cell)
        st.session_state["grid_version"] = st.session_state.get("grid_version", 0) + 1  # a fresh chart, no selection


def toggle_from_form() -> None:
    toggle(int(st.session_state.toggle_layer), int(st.session_state.toggle_head))


def set_layer() -> None:
    lm, layer, mode = backend.model(), int(st.session_state.mode_layer), st.session_state.mode_mode
    alpha = 0.0 if mode == MODES[2] else float(st.session_state.mode_alpha)
    mask = session.current_mask(lm).with_layer(layer, drop_qk=mode == "drop-QK", alpha=alpha)
    session.change_mask(lm, mask)


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
    session.change_mask(lm, mask)


def upload(key: str) -> None:
    lm, file = backend.model(), st.session_state.get(key)
    if file is not None:
        session.change_mask(lm, decode_mask(file.name, file.getvalue(), lm.shape, lm.name, lm.fingerprint))


lm = backend.model()
mask = session.current_mask(lm)
session.show_in_link(mask)
seqlen = int(session.choice(session.SEQLEN))
session.setting(
    st.sidebar.number_input,
    "Live evaluation tokens",
    session.LIVE_TOKENS,
    min_value=seqlen,
    step=seqlen,
    help="Fewer tokens answer faster; the home page's perplexity uses the evaluation tokens setting.",
)
evaluation = backend.windows(lm, session.EVAL_TEXT, int(session.choice(session.LIVE_TOKENS)))

left, right = st.columns([3, 2])
with right:
    unpruned = backend.live_perplexity(lm, evaluation, Mask.unpruned(lm.shape, lm.name))
    live = backend.live_perplexity(lm, evaluation, mask)
    st.metric(
        "Live perplexity",
        f"{live.perplexity:.3f}",
        f"{live.perplexity - unpruned.perplexity:+.3f} vs unpruned",
        delta_color="inverse",
    )
    st.caption(f"{live.text}, seqlen {live.seqlen}, {live.predicted_tokens} predicted tokens; mask: {mask.describe()}")
    if mask.pruned_heads == lm.shape.num_layers * lm.shape.num_heads:
        st.warning(
            "Every query head is pruned: only the MLPs (and drop-QK layers' values) remain. The number is exact."
        )
    seq = st.number_input("Budget at sequence length", min_value=1, value=seqlen, step=256)
    b = budget(mask, lm.shape, int(seq))
    st.metric(
        "Parameters removed",
        f"{b.params_removed:,}",
        f"{b.params_removed_pct:.2f} % of the model",
        delta_color="off",
    )
    st.progress(min(b.params_removed_pct / 100, 1.0))
    for name, saved, total, unit in (
        ("KV cache saved", b.kv_bytes_per_token_saved, b.kv_bytes_per_token_unpruned, "bytes/token"),
        (
            "Attention FLOPs saved",
            b.attention_flops_per_token_saved,
            b.attention_flops_per_token_unpruned,
            "FLOPs/token",
        ),
    ):
        st.metric(name, f"{saved:,} {unit}", f"{100 * saved / total:.1f} % of attention", delta_color="off")
        st.progress(min(saved / total, 1.0))
    undo_col, reset_col = st.columns(2)
    undo_col.button("Undo", on_click=session.undo, disabled=not st.session_state.get(session.HISTORY))
    reset_col.button("Reset", on_click=scaffold.safe(preset), args=("unpruned", "", 0), disabled=mask.is_unpruned)

with left:
    colour = [[float(keep) for keep in row] for row in mask.heads]
    hover = [
        [
            f"layer {layer}, head {head}: {'kept' if keep else 'pruned'} (click to toggle)"
            for head, keep in enumerate(row)
        ]
        for layer, row in enumerate(mask.heads)
    ]
    fig = plots.grid_figure(
        colour,
        hover,
        "Heads (light kept, dark pruned); layer modes on the right",
        None,
        [[0, "#1f2d5c"], [1, "#cfe8cf"]],
        zmin=0,
        zmax=1,
    )
    specs = [mask.layer(layer) for layer in range(lm.shape.num_layers)]
    labels = {
        layer: f"{MODES[2] if s.alpha == 0 else 'drop-QK' if s.drop_qk else ''} α={s.alpha:g}".strip()
        for layer, s in enumerate(specs)
        if s.drop_qk or s.alpha != 1
    }
    notes = [
        {"x": 1.01, "xref": "paper", "y": y, "text": t, "showarrow": False, "xanchor": "left"}
        for y, t in labels.items()
    ]
    fig.update_layout(margin={"r": 150}, annotations=notes)  # one update: add_annotation per layer is slow
    chart = f"grid_{st.session_state.get('grid_version', 0)}"
    st.plotly_chart(fig, key=chart, on_select=scaffold.safe(clicked, chart), selection_mode="points")

    with st.form("toggle_head"):
        a, b_col = st.columns(2)
        layer = a.number_input("Layer", 0, lm.shape.num_layers - 1, lm.shape.num_layers - 1, key="toggle_layer")
        head = b_col.number_input("Head", 0, lm.shape.num_heads - 1, 0, key="toggle_head")
        st.form_submit_button("Toggle head", on_click=scaffold.safe(toggle_from_form))
    with st.form("layer_mode"):
        a, b_col, c = st.columns(3)
        a.number_input("Layer", 0, lm.shape.num_layers - 1, lm.shape.num_layers - 1, key="mode_layer")
        b_col.selectbox("Mode", MODES, key="mode_mode")
        c.number_input("alpha", 0.0, 4.0, 1.0, 0.05, key="mode_alpha")
        st.form_submit_button("Apply to layer", on_click=scaffold.safe(set_layer))

st.subheader("Presets")
a, b_col, c, d = st.columns(4)
name = a.selectbox("Preset", ("unpruned", "HARP result", "lowest heads of a metric"))
metric = b_col.selectbox("Metric", list(HEAD_METRICS), index=list(HEAD_METRICS).index("magnitude"))
k = c.number_input("k heads", 1, lm.shape.num_layers * lm.shape.num_heads, lm.shape.num_heads)
d.button("Apply preset", on_click=scaffold.safe(preset), args=(name, metric, int(k)))
st.file_uploader(
    f"…or upload a mask file (headroom.mask v1 JSON, at most {MAX_MASK_BYTES // 2**20} MiB)",
    type=["json"],
    max_upload_size=MAX_MASK_BYTES // 2**20,  # Streamlit's megabytes are MiB; decode_mask checks the bytes too
    key="mask_file",
    on_change=scaffold.safe(upload),
    args=("mask_file",),
)

st.subheader("Greedy continuations")
prompt = st.text_input("Prompt", "The history of the city begins")
new_tokens = st.number_input("New tokens", 1, 128, 24)
if st.button("Generate"):
    with st.spinner("Generating (no KV cache, so drop-QK layers stay exact)…"):
        a, b_col = st.columns(2)
        a.markdown(f"**Unpruned**\n\n{prompt} _{greedy_continuation(lm, prompt, None, int(new_tokens))}_")
        b_col.markdown(f"**Masked**\n\n{prompt} _{greedy_continuation(lm, prompt, mask, int(new_tokens))}_")
