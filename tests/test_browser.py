"""The app in a real browser: every page renders, and a click in the editor shows the backend's perplexity.

Starts ``streamlit run app.py`` on the embedded default model (the session cache's converted
checkpoint), drives Debian's chromium through Playwright (the system browser, no download), saves a
screenshot of every page under ``test-output/screenshots/`` and toggles a head of a top layer by
clicking its cell in the editor's grid.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from analysis.corpus import default_text, make_windows
from analysis.evaluation import perplexity
from analysis.masks import Mask
from bench.browser_latency import ARGS, serve, settle
from bench.browser_latency import CHROMIUM as BENCH_CHROMIUM
from ui import session

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
SCREENSHOTS = ROOT / "test-output" / "screenshots"
CHROMIUM = Path(BENCH_CHROMIUM)
SETTLE_S = 300  # the longest a page may compute on its first visit (2 shared cores)


def _chromium() -> Path:
    """Debian's chromium, installed with apt-get when missing (``make test`` does it first)."""
    if not CHROMIUM.exists() and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "chromium"], capture_output=True, timeout=600)
    if not CHROMIUM.exists():
        pytest.skip("chromium is not installed and `apt-get install -y chromium` could not install it")
    return CHROMIUM


@pytest.fixture(scope="module")
def app_url(default_model, session_cache) -> Iterator[str]:
    """The app served on a free port, sharing the session cache (the converted model) with the tests."""
    with serve(str(session_cache)) as url:
        yield url


def _metric(page, label: str) -> str:
    box = page.locator('[data-testid="stMetric"]', has_text=label).first
    return box.locator('[data-testid="stMetricValue"]').inner_text().strip()


def _pages() -> list[str]:
    """URL paths of the multipage app: the home page and every file of app_pages/, in their numeric order."""
    return [""] + [p.stem.split("_", 1)[1] for p in sorted((ROOT / "app_pages").glob("[0-9]*_*.py"))]


def test_every_page_renders_and_an_editor_click_shows_the_backend_perplexity(app_url, default_model):
    from playwright.sync_api import sync_playwright

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(_chromium()), args=ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(SETTLE_S * 1000)
        # The editor: click the cell of layer 29, head 4 (grid points are in layer-major order).
        page.goto(f"{app_url}/Mask_editor")
        settle(page, SETTLE_S)
        shape = default_model.shape
        layer, head = shape.num_layers - 1, 4
        before = _metric(page, "Live perplexity")
        page.locator(".js-plotly-plot .scatterlayer .point").nth(layer * shape.num_heads + head).click(force=True)
        started = time.monotonic()
        page.wait_for_function(
            "before => [...document.querySelectorAll('[data-testid=\"stMetric\"]')].some("
            "m => m.innerText.includes('Live perplexity') && !m.innerText.includes(before))",
            arg=before,
        )
        print(f"click -> new perplexity on screen: {time.monotonic() - started:.2f} s")
        settle(page, SETTLE_S)
        page.screenshot(path=str(SCREENSHOTS / "Mask_editor-toggled.png"), full_page=True)
        shown = _metric(page, "Live perplexity")
        assert "pruned=29%3A4" in page.url or "pruned=29:4" in page.url  # the URL mirrors the mask
        tokens = int(session.DEFAULTS[session.MAX_TOKENS])
        evaluation = make_windows(default_model.tokenizer, default_text("default-eval"), 256, tokens)
        mask = Mask.unpruned(shape, default_model.name).with_head(layer, head, False)
        assert shown == f"{perplexity(default_model.arch, evaluation, mask).perplexity:.3f}"

        for path in _pages():  # every page, the other engineers' too, in a fresh session each
            page.goto(f"{app_url}/{path}")
            page.wait_for_selector("h1")
            settle(page, SETTLE_S)
            page.screenshot(path=str(SCREENSHOTS / f"{path or 'Home'}.png"), full_page=True)
            assert page.locator('[data-testid="stException"]').count() == 0, f"a traceback on page '{path}'"
            if not path:
                assert _metric(page, "Unpruned perplexity")

        browser.close()
