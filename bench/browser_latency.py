"""Click to number in a real browser: the mask editor of ``streamlit run app.py`` driven by headless chromium.

Starts the app on a free port (with the caller's ``HEADROOM_CACHE``, so the converted model and the
disk cache are shared), opens the editor in Debian's chromium through Playwright, waits for the
page to settle, then clicks grid cells of a bottom, a middle and a top layer (a different head each
time, so every mask is new) and measures in the browser, from the mouse-down:

* ``first``: until the "Live perplexity" metric shows a new value (the first estimate);
* ``exact``: until it shows the exact number (no "≈");
* ``reply``: until the server's first message after the click (what the page costs before any compute);
* ``msgs`` / ``KB``: websocket messages and kilobytes the server sent for the click (page overhead).

Prints the median of each per layer, the first click of the session on its own, and the load
average beside every figure.

    .venv/bin/python -m bench.browser_latency [--repeats 5] [--layers 2,15,29]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SETTLE_S = 600  # the editor's first visit builds the live evaluator if the warm-up has not

# Installed once per page: timestamps (performance.now) of the last mouse-down, the first new value of the
# metric after it, the first exact one, and the server's first message after it.
PROBE = """
() => {
  const probe = window.__probe = {click: null, first: null, exact: null, before: null};
  const value = () => {
    const box = [...document.querySelectorAll('[data-testid="stMetric"]')]
      .find(m => m.innerText.includes('Live perplexity'));
    return box ? box.querySelector('[data-testid="stMetricValue"]').innerText.trim() : null;
  };
  probe.value = value;
  document.addEventListener('mousedown', () => {
    probe.click = performance.now(); probe.first = probe.exact = null; probe.before = value();
  }, true);
  new MutationObserver(() => {
    if (probe.click === null) return;
    const v = value();
    if (v === null || v === probe.before) return;
    const now = performance.now();
    if (probe.first === null) probe.first = now;
    if (probe.exact === null && !v.startsWith('≈')) probe.exact = now;
  }).observe(document.body, {subtree: true, childList: true, characterData: true});
}
"""


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve(cache: str | None = None) -> Iterator[str]:
    """``streamlit run app.py`` on a free port and the cache ``cache`` (default ``$HEADROOM_CACHE``), then stopped."""
    port = free_port()
    env = os.environ | ({"HEADROOM_CACHE": cache} if cache else {})
    command = [sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true"]
    command += ["--server.port", str(port), "--browser.gatherUsageStats", "false"]
    command += ["--server.fileWatcherType", "none"]  # an edit during a run must not show "source changed" prompts
    server = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(f"{url}/_stcore/health", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


def settle(page, timeout_s: float = SETTLE_S) -> None:
    """Wait until no script runs: no running indicator for a second."""
    deadline, quiet_since = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        if page.locator('[data-testid="stStatusWidget"]').count():
            quiet_since = None
        elif quiet_since is None:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since > 1.0:
            return
        time.sleep(0.1)
    raise TimeoutError(f"the page was still running after {timeout_s} s")


class Wire:
    """Websocket messages from the server: count, bytes, and the time of the first one after a mark."""

    def __init__(self, page) -> None:
        self.messages, self.bytes, self.first_at = 0, 0, None
        page.on("websocket", lambda ws: ws.on("framereceived", self._frame))

    def _frame(self, payload: bytes | str) -> None:
        if self.first_at is None:
            self.first_at = time.perf_counter()
        self.messages += 1
        self.bytes += len(payload)

    def mark(self) -> None:
        self.messages, self.bytes, self.first_at = 0, 0, None


def click(page, wire: Wire, index: int) -> dict[str, float]:
    """Click grid point ``index`` and return the timings and traffic of that click."""
    wire.mark()
    started = time.perf_counter()
    page.locator(".js-plotly-plot .scatterlayer .point").nth(index).click(force=True)
    page.wait_for_function("() => window.__probe.exact !== null", timeout=SETTLE_S * 1000)
    probe = page.evaluate("() => ({click: __probe.click, first: __probe.first, exact: __probe.exact})")
    settle(page)
    return {
        "first": (probe["first"] - probe["click"]) / 1000,
        "exact": (probe["exact"] - probe["click"]) / 1000,
        "reply": (wire.first_at - started) if wire.first_at else float("nan"),
        "msgs": wire.messages,
        "KB": wire.bytes / 1024,
    }


def row(name: str, clicks: list[dict[str, float]]) -> str:
    med = {k: statistics.median(c[k] for c in clicks) for k in clicks[0]}
    return (
        f"{name:>22} {med['first']:>8.2f} {med['exact']:>8.2f} {med['reply']:>8.2f} {med['msgs']:>6.0f} "
        f"{med['KB']:>7.1f}   ({load()})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="clicks per layer (a new head each)")
    parser.add_argument("--layers", default="", help="comma-separated; default: 2, the middle and the top layer")
    args = parser.parse_args()

    from playwright.sync_api import sync_playwright

    with serve() as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(SETTLE_S * 1000)
        wire = Wire(page)
        opened = time.perf_counter()
        page.goto(f"{url}/Mask_editor")
        page.wait_for_selector(".js-plotly-plot .scatterlayer .point")
        settle(page)
        print(f"editor opened and settled in {time.perf_counter() - opened:.1f} s ({load()})")
        page.evaluate(PROBE)
        cells = page.evaluate("() => document.querySelector('.js-plotly-plot').data[1].customdata")
        layers, heads = max(c[0] for c in cells) + 1, max(c[1] for c in cells) + 1
        chosen = [int(x) for x in args.layers.split(",")] if args.layers else [2, layers // 2, layers - 1]
        print(f"{layers} layers x {heads} heads; seconds from mouse-down (medians of {args.repeats} clicks)")
        print(f"{'toggled layer':>22} {'first':>8} {'exact':>8} {'reply':>8} {'msgs':>6} {'KB':>7}")
        first_click = None
        for layer in chosen:
            clicks = []
            for r in range(args.repeats):
                clicks.append(click(page, wire, layer * heads + r % heads))
                first_click = first_click or (layer, clicks[0])
            print(row(f"{layer} ({'top quarter' if layer >= 3 * layers / 4 else 'below'})", clicks))
        layer, c = first_click
        print(
            f"first click of the session (layer {layer}): first {c['first']:.2f} s, exact {c['exact']:.2f} s ({load()})"
        )
        browser.close()


if __name__ == "__main__":
    main()
