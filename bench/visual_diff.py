"""Which pages look different from last time: compares the browser test's screenshots with a baseline.

The browser test (``tests/test_browser.py``) saves one screenshot per page, in a fixed state, under
``test-output/screenshots/``. This script compares each with the same page's picture in the
baseline folder (``test-output/screenshots-baseline/``), lists the pages whose pictures changed
(share of pixels that differ by more than a small tolerance, and the box that holds them), writes a
diff image per changed page, and with ``--accept`` makes the current pictures the new baseline.
A helper for review, not a test: fonts and anti-aliasing make exact equality meaningless.

    .venv/bin/python -m bench.visual_diff            # after `pytest tests/test_browser.py`
    .venv/bin/python -m bench.visual_diff --accept   # keep these pictures as the baseline
    .venv/bin/python -m bench.visual_diff --docs docs/screenshots   # the README's pictures of the main pages
"""

from __future__ import annotations

import argparse
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageChops

ROOT = Path(__file__).resolve().parent.parent
CURRENT = ROOT / "test-output" / "screenshots"
BASELINE = ROOT / "test-output" / "screenshots-baseline"
DIFFS = ROOT / "test-output" / "screenshots-diff"
TOLERANCE = 16  # per-channel difference (0-255) below which two pixels count as equal
CHANGED_SHARE = 0.001  # a page whose differing pixels exceed this share is listed as changed
DOC_PAGES = ("Home", "Importance", "HARP", "Norm_drift", "Mask_editor", "Head_map", "Export")
DOC_WIDTH, DOC_MAX_HEIGHT, DOC_COLOURS = 1280, 2400, 256  # README pictures: page width, top of long pages, palette


@dataclass(frozen=True)
class PageDiff:
    page: str
    status: str  # "same", "changed", "new", "gone", "resized"
    differing_share: float = 0.0
    box: tuple[int, int, int, int] | None = None  # left, top, right, bottom of the differing pixels


def compare(current: Path, baseline: Path) -> PageDiff:
    """How the picture ``current`` differs from ``baseline`` (same page)."""
    a, b = Image.open(baseline).convert("RGB"), Image.open(current).convert("RGB")
    if a.size != b.size:
        return PageDiff(current.stem, "resized", 1.0, None)
    diff = ImageChops.difference(a, b).convert("L").point(lambda v: 255 if v > TOLERANCE else 0)
    share = sum(diff.histogram()[255:]) / (a.size[0] * a.size[1])
    status = "changed" if share > CHANGED_SHARE else "same"
    return PageDiff(current.stem, status, share, diff.getbbox())


def compare_folders(current: Path, baseline: Path, diffs: Path | None = None) -> list[PageDiff]:
    """Every page of either folder; with ``diffs``, the changed ones are drawn there (changes in red)."""
    pages = sorted({p.name for p in current.glob("*.png")} | {p.name for p in baseline.glob("*.png")})
    results = []
    for name in pages:
        now, before = current / name, baseline / name
        if not before.exists():
            results.append(PageDiff(now.stem, "new"))
        elif not now.exists():
            results.append(PageDiff(before.stem, "gone"))
        else:
            result = compare(now, before)
            results.append(result)
            if diffs is not None and result.status == "changed":
                diffs.mkdir(parents=True, exist_ok=True)
                _draw(now, before, diffs / name)
    return results


def _draw(current: Path, baseline: Path, out: Path) -> None:
    """The current picture, faded, with the differing pixels in red."""
    a, b = Image.open(baseline).convert("RGB"), Image.open(current).convert("RGB")
    mask = ImageChops.difference(a, b).convert("L").point(lambda v: 255 if v > TOLERANCE else 0)
    faded = Image.blend(b, Image.new("RGB", b.size, "white"), 0.6)
    faded.paste(Image.new("RGB", b.size, (220, 0, 0)), mask=mask)
    faded.save(out)


def write_docs(current: Path, out: Path, pages: tuple[str, ...] = DOC_PAGES) -> list[Path]:
    """Small copies of the main pages for the README: at most 1280 wide, the top 2,400 px, a 256-colour palette."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in pages:
        source = current / f"{name}.png"
        if not source.exists():
            continue
        image = Image.open(source).convert("RGB")
        if image.width > DOC_WIDTH:
            image = image.resize((DOC_WIDTH, round(image.height * DOC_WIDTH / image.width)), Image.LANCZOS)
        image = image.crop((0, 0, image.width, min(image.height, DOC_MAX_HEIGHT)))
        path = out / f"{name.lower()}.png"
        image.quantize(DOC_COLOURS).save(path, optimize=True)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--current", type=Path, default=CURRENT)
    parser.add_argument("--baseline", type=Path, default=BASELINE)
    parser.add_argument("--accept", action="store_true", help="make the current pictures the baseline")
    parser.add_argument("--docs", type=Path, help="write small copies of the main pages there (the README's)")
    args = parser.parse_args(argv)
    if not any(args.current.glob("*.png")):
        print(f"no screenshots in {args.current}: run `pytest tests/test_browser.py` first", file=sys.stderr)
        return 2
    if args.docs:
        for path in write_docs(args.current, args.docs):
            print(f"{path}  {path.stat().st_size // 1024} KiB")
        return 0
    if args.accept:
        shutil.rmtree(args.baseline, ignore_errors=True)
        shutil.copytree(args.current, args.baseline)
        print(f"baseline: {len(list(args.baseline.glob('*.png')))} pictures in {args.baseline}")
        return 0
    if not args.baseline.is_dir():
        print(f"no baseline in {args.baseline}: run with --accept once to keep these pictures", file=sys.stderr)
        return 2
    results = compare_folders(args.current, args.baseline, DIFFS)
    for r in results:
        detail = f"{100 * r.differing_share:6.2f} % of pixels, box {r.box}" if r.status == "changed" else ""
        print(f"{r.status:>8}  {r.page:<24} {detail}")
    changed = [r.page for r in results if r.status != "same"]
    print(f"{len(changed)} of {len(results)} pages changed" + (f"; diff images in {DIFFS}" if changed else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
