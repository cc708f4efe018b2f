"""Home: pick the model and the texts, see the model card and the unpruned perplexity.

The choices made here carry to every page (``st.session_state`` through ``ui.session``). The model
is a cached resource shared read-only by every session; masks reach it only through
``analysis.intervention.apply_mask``.
"""

from __future__ import annotations

import streamlit as st

from analysis.evaluation import cached_perplexity
from ui import backend, progress, scaffold, session

with st.sidebar:
    st.header("Model and texts")
    session.setting(
        st.text_input,
        "Model",
        session.MODEL,
        help="`default` (the embedded SmolLM2-135M-Instruct), a local Hugging Face directory, a .gguf file or a hub id",
    )
    with scaffold.guard():
        uploaded = st.file_uploader("Upload an evaluation text (UTF-8)", type=["txt", "md"])
        if uploaded is not None and st.session_state.get("uploaded_text") != uploaded.file_id:
            path = backend.save_upload(uploaded.name, uploaded.getvalue())
            st.session_state["uploaded_text"] = uploaded.file_id
            st.session_state[session.EVAL_TEXT] = st.session_state[f"widget_{session.EVAL_TEXT}"] = path
    texts = "`default-eval` / `default-calib` (the Lee corpus split) or the path of a local text file"
    session.setting(st.text_input, "Evaluation text", session.EVAL_TEXT, help=texts)
    session.setting(st.text_input, "Calibration text", session.CALIB_TEXT, help=texts)
    session.setting(st.number_input, "Window (tokens)", session.SEQLEN, min_value=2, max_value=8192, step=16)
    session.setting(st.number_input, "Evaluation tokens", session.MAX_TOKENS, min_value=2, max_value=1 << 20, step=256)

lm = backend.model()
scaffold.sidebar_summary(lm)
st.subheader("Model card")
st.table({key: [str(value)] for key, value in lm.card().items()})
evaluation = backend.windows(lm)
with progress.progress_bar("Evaluating the unpruned model") as bar:
    result = cached_perplexity(lm.arch, lm.fingerprint, evaluation, cache=backend.disk_cache(), progress=bar)
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
