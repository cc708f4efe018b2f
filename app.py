"""Headroom: the multipage Streamlit app. Start it with `make run` (``streamlit run app.py``).

Every page is registered here, in the order of the navigation, with the caption under its title;
``ui.scaffold.run`` draws what every page shares around the page file's own content.
"""

from __future__ import annotations

import streamlit as st

from ui import scaffold

HOME = "app_pages/home.py"
PAGES = {  # file: (title, caption)
    HOME: ("Home", "Visual analytics for pruning the attention heads of causal language models."),
    "app_pages/1_Importance.py": (
        "Importance",
        "Head scores on the calibration windows; low means cheap to remove. Click a cell for its details.",
    ),
    "app_pages/2_HARP.py": (
        "HARP",
        "Drop the query/key projections of some layers and search each layer's alpha on calibration text.",
    ),
    "app_pages/3_Norm_drift.py": (
        "Norm drift",
        "How far a mask moves the residual stream from the unpruned model, layer by layer and token by token.",
    ),
    "app_pages/4_Mask_editor.py": (
        "Mask editor",
        "Click a cell to toggle a head. Every change updates the perplexity, the budget and the URL.",
    ),
    "app_pages/5_Head_map.py": (
        "Head map",
        "Each point is a query head, placed by its attention pattern, output norm and importance scores. "
        "Select points (box or lasso) or whole clusters, then prune or keep them in the editor's mask.",
    ),
    "app_pages/6_Pareto.py": (
        "Pareto",
        "Every mask Headroom has evaluated for this model: held-out perplexity against what it saves, and the front.",
    ),
    "app_pages/7_Export.py": (
        "Export",
        "Take the pruned model away: a Hugging Face folder that plain transformers loads, with a model card.",
    ),
    "app_pages/8_Tasks.py": (
        "Tasks",
        "Beyond perplexity: passkey retrieval, induction, last word, continuation agreement and long-context "
        "loss, for unpruned, the current mask and saved masks side by side.",
    ),
}

pages = {path: st.Page(path, title=title, default=path == HOME) for path, (title, _) in PAGES.items()}
current = st.navigation(list(pages.values()))
path = next(p for p, page in pages.items() if page is current)
scaffold.run(current, PAGES[path][1], home=path == HOME)
