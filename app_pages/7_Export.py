"""Export: the session's mask applied to the model, written as a Hugging Face folder with a model card."""

from __future__ import annotations

import json
from pathlib import Path

import streamlit as st

import ui
from analysis.export import CARD_FILE, KINDS, MASK_FILE, export_command, export_model
from analysis.masks import budget

KIND_HELP = {
    "compact": "pruned weights removed: smaller and faster; loads with trust_remote_code=True (code ships inside)",
    "stock": "source architecture, pruned heads zeroed: no remote code, but no smaller or faster; no drop-QK",
}

ui.page("Export", "Take the pruned model away: a Hugging Face folder that plain transformers loads, with a model card.")

with ui.guard():
    lm = ui.model()
    ui.sidebar_summary(lm)
    mask = ui.current_mask(lm)
    st.markdown(f"**Mask** {ui.describe(mask)}")
    b = budget(mask, lm.shape, int(ui.choice(ui.SEQLEN)))
    params, kv, flops = st.columns(3)
    params.metric("Parameters", f"{b.params_total - b.params_removed:,}", f"-{b.params_removed_pct:.2f}%")
    kv.metric("KV cache bytes per token", f"{b.kv_bytes_per_token:,}", f"-{b.kv_bytes_per_token_saved:,}")
    flops.metric(
        f"Attention FLOPs per token at {b.seq_len}",
        f"{b.attention_flops_per_token:,}",
        f"-{b.attention_flops_per_token_saved:,}",
    )
    st.download_button(
        "Download the mask (JSON)",
        json.dumps(mask.to_json(), indent=2) + "\n",
        file_name=MASK_FILE,
        mime="application/json",
        key="export_mask_download",
    )

    st.subheader("Write a Hugging Face folder")
    folder = st.text_input("Output folder", key="export_folder", placeholder="exports/my-pruned-model")
    kind = st.radio("Kind", KINDS, horizontal=True, key="export_kind", captions=[KIND_HELP[k] for k in KINDS])
    force = st.checkbox("Replace the folder if it exists (once the new export is complete)", key="export_force")
    if st.button("Export", key="export_run", type="primary"):
        evaluation = ui.windows(lm)
        command = export_command(
            str(ui.choice(ui.MODEL)),
            MASK_FILE,
            folder,
            kind,
            str(ui.choice(ui.EVAL_TEXT)),
            evaluation.seqlen,
            int(ui.choice(ui.MAX_TOKENS)),
            force=force,
        )
        with ui.progress_bar("Evaluating, building, checking and writing the export") as bar:
            result = export_model(
                lm,
                mask,
                folder,
                kind,
                force=force,
                windows=evaluation,
                cache=ui.disk_cache(),
                command=f"{command}  # from the app's Export page, with the mask saved as {MASK_FILE}",
                progress=bar,
            )
        st.success(f"Written to {result.path}")
        card = (Path(result.path) / CARD_FILE).read_text(encoding="utf-8")
        with st.expander("Model card (README.md)", expanded=True):
            st.markdown(card.split("---\n", 2)[-1])  # without the YAML header
