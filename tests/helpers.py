"""Helpers shared by test modules (a test module never imports another test module)."""

from __future__ import annotations

from pathlib import Path

from streamlit.testing.v1 import AppTest

ROOT = Path(__file__).resolve().parent.parent
HOME = "app.py"


def open_page(
    name: str = HOME,
    settings: dict[str, object] | None = None,
    query: dict[str, str] | None = None,
    timeout_s: float = 120,
) -> AppTest:
    """The app opened on page ``name`` (a file under app_pages/, or the home page), not run yet.

    It goes through ``app.py`` as a browser does, so ``st.navigation`` and the shared scaffold
    (title, sidebar summary, error handling) run around the page; ``settings`` seed the session
    state and ``query`` the URL.
    """
    at = AppTest.from_file(str(ROOT / HOME), default_timeout=timeout_s)
    for key, value in (settings or {}).items():
        at.session_state[key] = value
    for key, value in (query or {}).items():
        at.query_params[key] = value
    if name != HOME:
        at.switch_page(name)
    return at
