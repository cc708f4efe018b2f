"""Time to interactive of every page in a real browser, with a warm disk cache (issue 16's 5-second target).

Starts ``streamlit run app.py`` on the caller's ``HEADROOM_CACHE`` (so the converted model and every
cached result are on disk) and opens each page in headless chromium through Playwright, each in a new
browser context, i.e. a new Streamlit session with default choices. A page counts as *interactive*
from the moment it stops changing: its script has run and finished, and neither the number of
elements in the main area nor the number of drawn plotly figures changes for two seconds (those two
seconds are not counted), so a figure still being drawn in the browser counts against the page. Also
printed: the figures drawn and the error boxes shown.

Two passes: ``cold`` is the first visit of each page in a freshly started server (the first page
there also loads the model into memory from the converted copy on disk); ``warm`` opens each page
again in a new session of the same server (what a second visitor or a reload sees).

    HEADROOM_CACHE=cache .venv/bin/python -m bench.page_load [--pages Importance,HARP] [--fresh-server]

``--fresh-server`` starts a new server for every page of the cold pass, so each page pays the model
load (the worst case of "opening a page").
"""

from __future__ import annotations

import argparse
import sys
import time

from bench.browser_latency import ARGS, CHROMIUM, SETTLE_S, load, serve

PAGES = ("", "Importance", "HARP", "Norm_drift", "Mask_editor", "Head_map", "Pareto", "Export", "Tasks")
QUIET_S = 2.0
# What the page looks like now: the script's state, how many elements the main area has, how many
# plotly charts it has and how many of them have drawn their SVG, how many error boxes; "interactive"
# is the last change of it, once the script has finished and every chart is drawn.
STATE = """
() => {
  const app = document.querySelector('[data-testid="stApp"]');
  const main = document.querySelector('[data-testid="stMain"]');
  if (!app || !main) return null;
  return {
    script: app.getAttribute('data-test-script-state'),
    elements: main.querySelectorAll('[data-testid="stElementContainer"]').length,
    figures: [...main.querySelectorAll('.js-plotly-plot')].filter(f => f.querySelector('.main-svg')).length,
    charts: main.querySelectorAll('[data-testid="stPlotlyChart"]').length,
    errors: main.querySelectorAll('[data-testid="stException"], [data-testid="stAlertContentError"]').length,
  };
}
"""


def open_page(browser, url: str, verbose: bool = False) -> dict[str, float]:
    """Open ``url`` in a new session; seconds until the page stopped changing, with its figure count."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(SETTLE_S * 1000)
    started = time.perf_counter()
    page.goto(url)
    last, changed, ran = None, started, False
    while time.perf_counter() - started < SETTLE_S:
        now = time.perf_counter()
        state = page.evaluate(STATE)
        ran |= bool(state) and state["script"] == "running"
        drawn = bool(state) and state["figures"] >= state["charts"]
        if state != last:
            last, changed = state, now
            if verbose:
                print(f"  {now - started:6.2f} s {state}", file=sys.stderr, flush=True)
        elif ran and drawn and state["script"] == "notRunning" and now - changed >= QUIET_S:
            break
        time.sleep(0.05)
    else:
        changed = float("nan")  # still changing: printed as nan, the other pages still measured
    context.close()
    return {"interactive": changed - started, "figures": last["figures"], "errors": last["errors"]}


def line(name: str, t: dict[str, float]) -> str:
    return f"{name or 'Home':>12} {t['interactive']:>12.2f} {t['figures']:>8} {t['errors']:>7}   ({load()})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", default=",".join(PAGES), help="url paths, comma-separated ('' is Home)")
    parser.add_argument("--fresh-server", action="store_true", help="a new server for every page of the cold pass")
    parser.add_argument("--verbose", action="store_true", help="every change of each page's state, on stderr")
    args = parser.parse_args()
    pages = args.pages.split(",")

    from playwright.sync_api import sync_playwright

    header = f"{'page':>12} {'interactive':>12} {'figures':>8} {'errors':>7}   seconds from opening the page"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        print("cold: first visit of each page" + (", each in a new server" if args.fresh_server else ""))
        print(header)
        if args.fresh_server:
            for name in pages:
                with serve() as url:
                    print(line(name, open_page(browser, f"{url}/{name}", args.verbose)), flush=True)
        with serve() as url:
            if not args.fresh_server:
                for name in pages:
                    print(line(name, open_page(browser, f"{url}/{name}", args.verbose)), flush=True)
            else:
                open_page(browser, f"{url}/")  # the model in memory, as after any first visit
            print("warm: each page again, in a new session of the same server")
            print(header)
            worst = 0.0
            for name in pages:
                t = open_page(browser, f"{url}/{name}", args.verbose)
                worst = max(worst, t["interactive"])
                print(line(name, t), flush=True)
            print(f"slowest warm page: {worst:.2f} s ({load()})")
        browser.close()


if __name__ == "__main__":
    main()
