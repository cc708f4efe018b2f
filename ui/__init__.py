"""The Streamlit layer of Headroom: what the pages share, and nothing that computes a number.

- :mod:`ui.session`  the user's choices and mask in ``st.session_state``, and the mask in the URL
- :mod:`ui.backend`  the backend's calls as the pages make them: cached per process or on disk, with progress
- :mod:`ui.progress` progress bars for long work
- :mod:`ui.scaffold` what every page shows around its own content (title, errors, sidebar summary)
- :mod:`ui.plots`    plot builders, colours and titles shared by the pages
- :mod:`ui.head_grids` layers x heads grids: clickable, a head score's heatmap, the clusters
- :mod:`ui.importance_view`, :mod:`ui.harp_view` what the Importance and HARP pages draw
- :mod:`ui.editor`, :mod:`ui.mask_edits`, :mod:`ui.live_panel` the mask editor: its drawing, edits, live number
- :mod:`ui.collection` the box that saves a mask to the named collection

Numbers come from ``analysis/``; this package caches, routes and draws.
"""
