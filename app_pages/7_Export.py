"""Export: the session's mask applied to the model, written as a Hugging Face folder with a model card.

In a demo (``make demo``) the visitor gives a name, and the folder is that name in the demo's exports
folder (``analysis.access``); anywhere, only an earlier export is ever replaced.
"""

from __future__ import annotations

import json
from pathlib import Path

import streamlit as st

from analysis.access import MAX_NAME_CHARS
from analysis.budget import budget
from analysis.export import KINDS, export_model
from analysis.export_folder import CARD_FILE, MASK_FILE
from analysis.model_card import export_command
from ui import backend, progress, session

KIND_HELP = {
    "compact": "pruned weights removed: smaller and faster; loads with trust_remote_code=True (code ships inside)",
    "stock": "source architecture, pruned heads zeroed: no remote code, but no smaller or faster; no drop-QK",
}


lm = backend.model()
mask = session.current_mask(lm)
st.markdown(f"**Mask** {mask.describe()}")
b = budget(mask, lm.shape, int(session.choice(session.SEQLEN)))
for col, (label, value, saved, total) in zip(
    st.columns(3),
    (
        ("Parameters", b.params_total - b.params_removed, b.params_removed, b.params_total),
        ("KV cache bytes per token", b.kv_bytes_per_token, b.kv_bytes_per_token_saved, b.kv_bytes_per_token_unpruned),
        (
            f"Attention FLOPs per token at {b.seqlen:,}",
            b.attention_flops_per_token,
            b.attention_flops_per_token_saved,
            b.attention_flops_per_token_unpruned,
        ),
    ),
    strict=True,
):
    # A saving is good news: green, the arrow pointing down at what shrinks.
    col.metric(
        label,
        f"{value:,}",
        f"{saved:,} saved ({100 * saved / total:.2f} %)" if saved else None,
        delta_color="normal",
        delta_arrow="down",
    )
st.download_button(
    "Download the mask (JSON)",
    json.dumps(mask.to_json(), indent=2) + "\n",
    file_name=MASK_FILE,
    mime="application/json",
    key="export_mask_download",
)

st.subheader("Write a Hugging Face folder")
policy = backend.access()
if policy.demo:
    name = st.text_input(
        "Export name",
        key="export_name",
        placeholder="my-pruned-model",
        help=f"Letters, digits, '.', '_' and '-', at most {MAX_NAME_CHARS}; it goes in this demo's exports folder",
    )
    replace = "Replace an earlier export of that name (once the new export is complete)"
else:
    folder = st.text_input("Output folder", key="export_folder", placeholder="exports/my-pruned-model")
    replace = "Replace the folder if it is an earlier Headroom export (once the new export is complete)"
kind = st.radio("Kind", KINDS, horizontal=True, key="export_kind", captions=[KIND_HELP[k] for k in KINDS])
force = st.checkbox(replace, key="export_force", help="Only a folder an earlier export wrote is ever replaced.")
evaluation = backend.windows(lm)


def command_for(out: str) -> str:
    """The CLI command making this export into ``out``, with the mask downloaded above."""
    return export_command(
        str(session.choice(session.MODEL)),
        MASK_FILE,
        out,
        kind,
        str(session.choice(session.EVAL_TEXT)),
        evaluation.seqlen,
        int(session.choice(session.MAX_TOKENS)),
        force=force,
    )


st.caption(f"The same export from the command line, with the mask downloaded above as {MASK_FILE}:")
st.code(command_for((name or "NAME") if policy.demo else (folder or "OUT")), language="bash", wrap_lines=True)
if st.button("Export", key="export_run", type="primary"):
    out = str(policy.export_path(name)) if policy.demo else folder
    command = command_for(out)
    with progress.progress_bar("Evaluating, building, checking and writing the export") as bar:
        result = export_model(
            lm,
            mask,
            out,
            kind,
            force=force,
            windows=evaluation,
            cache=backend.disk_cache(),
            command=f"{command}  # from the app's Export page, with the mask saved as {MASK_FILE}",
            progress=bar,
        )
    st.success(f"Written as {name} in the exports folder" if policy.demo else f"Written to {result.path}")
    card = (Path(result.path) / CARD_FILE).read_text(encoding="utf-8")
    with st.expander("Model card (README.md)", expanded=True):
        st.markdown(card.split("---\n", 2)[-1])  # without the YAML header
