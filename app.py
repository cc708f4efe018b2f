"""Headroom home page: the model card and its unpruned protocol perplexity.

Start with `make run`. The model is a cached resource shared read-only by every session; masks reach
it only through ``analysis.intervention.apply_mask``.
"""

from __future__ import annotations

import streamlit as st

from analysis.corpus import load_text, make_windows
from analysis.errors import HeadroomError
from analysis.evaluation import PerplexityResult, cached_perplexity
from analysis.loading import DEFAULT_MODEL, LoadedModel, load_model


@st.cache_resource(show_spinner="Loading the model (the first start converts the GGUF, about 30 s)…")
def shared_model(spec: str) -> LoadedModel:
    return load_model(spec)


def unpruned_perplexity(lm: LoadedModel, text_spec: str, seqlen: int, max_tokens: int) -> PerplexityResult:
    windows = make_windows(lm.tokenizer, load_text(text_spec), seqlen, max_tokens, lm.max_positions)
    bar = st.progress(0.0, text="Evaluating the unpruned model…")
    result = cached_perplexity(
        lm.arch, lm.fingerprint, windows, progress=lambda done, total: bar.progress(done / total)
    )
    bar.empty()
    return result


st.set_page_config(page_title="Headroom", layout="wide")
st.title("Headroom")
st.caption("Visual analytics for pruning the attention heads of causal language models.")

spec = st.sidebar.text_input(
    "Model", value=DEFAULT_MODEL, help="'default', a local HF directory, a .gguf file or a hub id"
)
text_spec = st.sidebar.selectbox("Corpus", ["default-eval", "default-calib"])
seqlen = st.sidebar.number_input("Window (tokens)", min_value=16, max_value=4096, value=256, step=16)
max_tokens = st.sidebar.number_input("Evaluation tokens", min_value=16, max_value=65536, value=2048, step=256)

try:
    lm = shared_model(spec)
    st.subheader("Model")
    st.table({k: [str(v)] for k, v in lm.card().items()})
    result = unpruned_perplexity(lm, text_spec, int(seqlen), int(max_tokens))
    st.metric("Unpruned perplexity", f"{result.perplexity:.3f}")
    st.caption(
        f"{result.text} (sha256 {result.text_sha256[:12]}…), seqlen {result.seqlen}, "
        f"{result.predicted_tokens} predicted tokens, unpruned"
    )
except HeadroomError as e:
    st.error(str(e))
