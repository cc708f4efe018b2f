"""Headroom home page: pick the model and the texts, see the model card and the unpruned perplexity.

Start with `make run`. The choices made here carry to every page (``st.session_state`` through
``ui``). The model is a cached resource shared read-only by every session; masks reach it only
through ``analysis.intervention.apply_mask``.
"""

from __future__ import annotations

import streamlit as st

import ui
from analysis.evaluation import cached_perplexity

ui.page("Headroom", "Visual analytics for pruning the attention heads of causal language models.")

with st.sidebar:
    st.header("Model and texts")
    ui.setting(
        st.text_input,
        "Model",
        ui.MODEL,
        help="`default` (the embedded SmolLM2-135M-Instruct), a local Hugging Face directory, a .gguf file or a hub id",
    )
    with ui.guard():
        uploaded = st.file_uploader("Upload an evaluation text (UTF-8)", type=["txt", "md"])
        if uploaded is not None and st.session_state.get("uploaded_text") != uploaded.file_id:
            path = ui.save_upload(uploaded.name, uploaded.getvalue())
            st.session_state["uploaded_text"] = uploaded.file_id
            st.session_state[ui.EVAL_TEXT] = st.session_state[f"widget_{ui.EVAL_TEXT}"] = path
    texts = "`default-eval` / `default-calib` (the Lee corpus split) or the path of a local text file"
    ui.setting(st.text_input, "Evaluation text", ui.EVAL_TEXT, help=texts)
    ui.setting(st.text_input, "Calibration text", ui.CALIB_TEXT, help=texts)
    ui.setting(st.number_input, "Window (tokens)", ui.SEQLEN, min_value=2, max_value=8192, step=16)
    ui.setting(st.number_input, "Evaluation tokens", ui.MAX_TOKENS, min_value=2, max_value=1 << 20, step=256)

with ui.guard():
    lm = ui.model()
    ui.sidebar_summary(lm)
    st.subheader("Model card")
    st.table({key: [str(value)] for key, value in lm.card().items()})
    evaluation = ui.windows(lm)
    with ui.progress_bar("Evaluating the unpruned model") as bar:
        result = cached_perplexity(lm.arch, lm.fingerprint, evaluation, cache=ui.disk_cache(), progress=bar)
    st.metric("Unpruned perplexity", f"{result.perplexity:.3f}")
    st.caption(
        f"Protocol: text {result.text} (sha256 {result.text_sha256[:12]}…), seqlen {result.seqlen}, "
        f"{evaluation.num_windows} windows, {result.predicted_tokens} predicted tokens, "
        f"{'BOS prepended' if evaluation.has_bos else 'no BOS (first token of each window not predicted)'}, "
        f"mask: unpruned"
    )
    st.markdown(
        "Next: **Importance** scores heads, **HARP** searches drop-QK layers and their alpha, **Norm drift** "
        "shows what a mask does to the residual stream, and the **Mask editor** prunes heads with live perplexity."
    )
