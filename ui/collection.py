"""The named-mask collection in the UI: a box that saves a mask under a name (``analysis.pareto``).

The saved masks are points of the Pareto page, next to every mask the methods left in the cache.
"""

from __future__ import annotations

import streamlit as st

from analysis.errors import HeadroomError
from analysis.loading import LoadedModel
from analysis.masks import Mask
from analysis.pareto import named_masks, save_named
from ui import backend


def save_mask_box(lm: LoadedModel, mask: Mask, key: str = "save_mask") -> None:
    """A name field and a button that keep ``mask`` in ``lm``'s collection; a used name is replaced (it says so)."""
    with st.form(key, clear_on_submit=True):
        name = st.text_input("Name", placeholder="e.g. search kv 12288, hand-tuned", key=f"{key}_name").strip()
        if st.form_submit_button("Save to the collection"):
            replaced = name in named_masks(lm, backend.disk_cache())
            try:
                save_named(lm, name, mask, backend.disk_cache())
            except HeadroomError as e:
                st.error(str(e))
                return
            st.success(f"Saved as '{name}'" + (" (replacing the mask of that name)" if replaced else ""))
