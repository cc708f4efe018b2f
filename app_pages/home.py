"""Home: pick the model and the texts, see the model card and the unpruned perplexity.

The choices made here carry to every page (``st.session_state`` through ``ui.session``). The model
is a cached resource shared read-only by every session; masks reach it only through
``analysis.intervention.apply_mask``. In a demo (``make demo``) models and texts are picked from
lists (``analysis.access``): nothing typed here names a file on the server.
"""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from analysis.corpus import DEFAULT_TEXTS, MAX_TEXT_BYTES
from analysis.evaluation import cached_perplexity
from analysis.loading import DTYPE_CHOICES
from ui import backend, progress, scaffold, session

policy = backend.access()
with st.sidebar:
    st.header("Model and texts")
    if policy.demo:
        st.info(
            "Demo: pick a model and texts from the lists, or upload your own text. Nothing you type names a file "
            "on this server."
        )
        session.setting(st.selectbox, "Model", session.MODEL, options=policy.models)
    else:
        session.setting(
            st.text_input,
            "Model",
            session.MODEL,
            help="`default` (the embedded SmolLM2-135M-Instruct), a local Hugging Face directory, a .gguf file or a "
            "hub id",
        )
    session.setting(
        st.selectbox,
        "Weights dtype",
        session.DTYPE,
        options=DTYPE_CHOICES,
        help="auto: bfloat16 where the model runs on a CUDA GPU, float32 on the CPU. Logits are upcast to float32 "
        "and sums kept in float64 whatever the dtype; results of different dtypes are cached apart",
    )
    with scaffold.guard():
        uploaded = st.file_uploader(
            f"Upload an evaluation text (UTF-8, at most {MAX_TEXT_BYTES // 2**20} MiB)", type=["txt", "md"]
        )
        if uploaded is not None and st.session_state.get("uploaded_text") != uploaded.file_id:
            path = backend.save_upload(uploaded.name, uploaded.getvalue())
            st.session_state["uploaded_text"] = uploaded.file_id
            st.session_state[session.UPLOADS] = list(dict.fromkeys([*st.session_state.get(session.UPLOADS, []), path]))
            st.session_state[session.EVAL_TEXT] = st.session_state[f"widget_{session.EVAL_TEXT}"] = path
    if policy.demo:
        texts = [*DEFAULT_TEXTS, *st.session_state.get(session.UPLOADS, [])]
        for label, key in (("Evaluation text", session.EVAL_TEXT), ("Calibration text", session.CALIB_TEXT)):
            chosen = str(session.choice(key))  # listed even if not allowed, so that the error below can say why
            options = texts if chosen in texts else [*texts, chosen]
            session.setting(st.selectbox, label, key, options=options, format_func=lambda spec: Path(spec).name)
    else:
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
