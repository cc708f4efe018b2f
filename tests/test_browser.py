"""The app in a real browser: every page shows its main content, and an editor click shows the backend's perplexity.

Starts ``streamlit run app.py`` on the embedded default model (the session cache's converted
checkpoint), drives Debian's chromium through Playwright (the system browser, no download) and
toggles a head of a top layer by clicking its cell in the editor's grid. Then one session tours
every page in a fixed state (one evaluation window, HARP on the top layer with its comparison, its
mask in the editor, on the drift and export pages), checks that each page shows its main number,
plot or table and no error, and saves a screenshot of the whole page under
``test-output/screenshots/``, where ``bench/visual_diff.py`` compares them with the last run's.
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
COMPARE_S = 900  # the comparison scores and evaluates about 16 masks: the longest step of the tour
WIDTH, MAX_HEIGHT = 1280, 6000  # screenshot size: the page's width, its whole height up to this
ERRORS = '[data-testid="stException"], [data-testid="stAlertContentError"]'


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


def _shot(page, name: str) -> None:
    """A screenshot of the whole page: Streamlit scrolls its main block, so the viewport grows to fit it first."""
    height = page.evaluate(
        "() => Math.max(...[...document.querySelectorAll('[data-testid=stMain], [data-testid=stAppViewContainer]')]"
        ".map(e => e.scrollHeight), 800)"
    )
    page.set_viewport_size({"width": WIDTH, "height": min(int(height) + 40, MAX_HEIGHT)})
    page.wait_for_timeout(500)  # plotly redraws at the new size
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"))
    page.set_viewport_size({"width": WIDTH, "height": 1000})


def _no_error(page, name: str) -> None:
    errors = page.locator(ERRORS)
    assert errors.count() == 0, f"page '{name}' shows an error: {errors.first.inner_text()[:300]}"


def _visit(page, title: str) -> None:
    """Open a page through the sidebar, as a user does, so that the session (settings, HARP run, mask) carries."""
    page.locator('[data-testid="stSidebarNav"] a', has_text=title).first.click()
    page.wait_for_timeout(500)
    settle(page, SETTLE_S)


def _click(page, label: str, timeout_s: float = SETTLE_S) -> None:
    page.get_by_role("button", name=label).first.click()
    page.wait_for_timeout(500)
    settle(page, timeout_s)


def _charts(page) -> int:
    return page.locator('[data-testid="stPlotlyChart"] .js-plotly-plot').count()


def test_every_page_renders_and_an_editor_click_shows_the_backend_perplexity(app_url, default_model):
    from playwright.sync_api import sync_playwright

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(_chromium()), args=ARGS)
        page = browser.new_page(viewport={"width": WIDTH, "height": 1000})
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
        shown = _metric(page, "Live perplexity")
        assert "pruned=29%3A4" in page.url or "pruned=29:4" in page.url  # the URL mirrors the mask
        tokens = int(session.DEFAULTS[session.MAX_TOKENS])
        evaluation = make_windows(default_model.tokenizer, default_text("default-eval"), 256, tokens)
        mask = Mask.unpruned(shape, default_model.name).with_head(layer, head, False)
        assert shown == f"{perplexity(default_model.arch, evaluation, mask).perplexity:.3f}"
        _no_error(page, "Mask_editor")
        browser.close()


def test_a_tour_of_every_page_in_a_fixed_state_shows_each_main_content_and_no_error(app_url):
    """One session: one window of text, HARP on the top layer and its comparison, that mask on every later page."""
    from playwright.sync_api import sync_playwright

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    for old in SCREENSHOTS.glob("*.png"):
        old.unlink()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(_chromium()), args=ARGS)
        page = browser.new_page(viewport={"width": WIDTH, "height": 1000})
        page.set_default_timeout(SETTLE_S * 1000)
        page.goto(app_url)
        page.wait_for_selector("h1")
        settle(page, SETTLE_S)
        tokens = page.get_by_label("Evaluation tokens")
        tokens.fill("256")  # one window: the fixed state, and quick on two cores
        tokens.press("Enter")
        settle(page, SETTLE_S)
        assert _metric(page, "Unpruned perplexity")
        _no_error(page, "Home")
        _shot(page, "Home")

        _visit(page, "Importance")
        assert _charts(page) >= 2 and page.locator('[data-testid="stTable"]').count()  # heatmap, bars, details
        _no_error(page, "Importance")
        _shot(page, "Importance")

        _visit(page, "HARP")
        page.get_by_label("N", exact=True).fill("1")
        page.get_by_label("alpha grid step").fill("0.25")
        _click(page, "Run HARP")
        assert _metric(page, "Calibration perplexity, HARP (searched alpha)")
        _click(page, "Compare with the baselines", COMPARE_S)
        assert _charts(page) >= 3 and page.locator('[data-testid="stDataFrame"]').count()
        _no_error(page, "HARP")
        _shot(page, "HARP")
        _click(page, "Send to the mask editor")  # to the editor, with HARP's mask

        assert _metric(page, "Live perplexity")
        _no_error(page, "Mask_editor")
        _shot(page, "Mask_editor")

        _visit(page, "Norm drift")
        assert _metric(page, "Final KL(unpruned || pruned, with its alphas)")
        _no_error(page, "Norm_drift")
        _shot(page, "Norm_drift")

        _visit(page, "Head map")
        assert _charts(page) >= 2 and page.locator('[data-testid="stDataFrame"]').count()
        _no_error(page, "Head_map")
        _shot(page, "Head_map")

        _visit(page, "Export")
        assert _metric(page, "Parameters") and page.locator('[data-testid="stCode"]').count()
        _no_error(page, "Export")
        _shot(page, "Export")

        toured = {"Home", "Importance", "HARP", "Mask editor", "Norm drift", "Head map", "Export"}
        links = page.locator('[data-testid="stSidebarNav"] a')
        others = [t for t in (links.nth(i).inner_text().strip() for i in range(links.count())) if t not in toured]
        for title in others:  # pages added since, in the same session: each renders without an error
            _visit(page, title)
            assert page.locator("h1").count()
            _no_error(page, title)
            _shot(page, title.replace(" ", "_"))
        browser.close()
