"""The screenshot comparison lists exactly the pages whose pictures changed."""

from __future__ import annotations

from PIL import Image, ImageDraw

from bench.visual_diff import compare_folders


def _page(path, box=None, size=(200, 100)):
    image = Image.new("RGB", size, "white")
    if box:
        ImageDraw.Draw(image).rectangle(box, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def test_changed_new_gone_and_resized_pages_are_listed_and_same_pages_are_not(tmp_path):
    now, before, diffs = tmp_path / "now", tmp_path / "before", tmp_path / "diffs"
    _page(before / "home.png")
    _page(now / "home.png")
    _page(before / "editor.png")
    _page(now / "editor.png", box=(10, 20, 29, 39))  # 400 of 20,000 pixels
    _page(before / "export.png")
    _page(now / "tasks.png")
    _page(before / "harp.png")
    _page(now / "harp.png", size=(200, 120))
    results = {r.page: r for r in compare_folders(now, before, diffs)}
    assert {name: r.status for name, r in results.items()} == {
        "home": "same",
        "editor": "changed",
        "export": "gone",
        "tasks": "new",
        "harp": "resized",
    }
    assert results["editor"].differing_share == 400 / 20_000
    assert results["editor"].box == (10, 20, 30, 40)
    assert [p.name for p in diffs.iterdir()] == ["editor.png"]


def test_docs_copies_are_at_most_1280_wide_cropped_and_keep_the_picture(tmp_path):
    from bench.visual_diff import DOC_MAX_HEIGHT, write_docs

    _page(tmp_path / "now" / "HARP.png", box=(0, 0, 1279, 99), size=(2560, 6000))  # a black band at the top
    _page(tmp_path / "now" / "Home.png", size=(800, 300))
    written = {p.name: p for p in write_docs(tmp_path / "now", tmp_path / "docs", ("Home", "HARP", "Export"))}
    assert sorted(written) == ["harp.png", "home.png"]  # a page without a screenshot is skipped
    harp = Image.open(written["harp.png"]).convert("RGB")
    assert harp.size == (1280, DOC_MAX_HEIGHT)  # halved to 1280 x 3000, then the top kept
    assert harp.getpixel((100, 20)) == (0, 0, 0) and harp.getpixel((1000, 20)) == (255, 255, 255)
    assert Image.open(written["home.png"]).size == (800, 300)  # narrower pages keep their size
