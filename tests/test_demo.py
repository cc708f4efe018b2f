"""Demo mode in the app (``make demo``): visitors pick from lists, upload, and name exports; nothing they do
names a file on the server. Through Streamlit's AppTest on a tiny Llama the operator listed.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from analysis.access import DEMO_ENV, EXPORTS_ENV, MODELS_ENV, Access
from analysis.corpus import load_text, make_windows
from analysis.evaluation import perplexity
from analysis.export_folder import MASK_FILE
from analysis.loading import load_model
from analysis.mask_files import load_mask
from analysis.masks import Mask
from tests.helpers import open_page, save_checkpoint, tree, word_text
from ui import session

EXPORT = "app_pages/7_Export.py"


@pytest.fixture
def demo(tmp_path, monkeypatch) -> dict[str, object]:
    """A demo server (its cache, exports folder and one listed tiny model) and an outside worth protecting."""
    save_checkpoint(tmp_path / "models" / "tiny-llama")
    monkeypatch.setenv("HEADROOM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(EXPORTS_ENV, str(tmp_path / "exports"))
    monkeypatch.setenv(MODELS_ENV, str(tmp_path / "models" / "tiny-llama"))
    monkeypatch.setenv(DEMO_ENV, "1")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.txt").write_text(word_text(200, 3))
    return {session.MODEL: str(tmp_path / "models" / "tiny-llama"), session.SEQLEN: 16, session.MAX_TOKENS: 64}


def errors(at) -> list[str]:
    assert not at.exception, at.exception
    return [e.value for e in at.error]


def test_the_demo_home_page_offers_lists_and_uploads_never_a_path(demo, tmp_path):
    at = open_page(settings=demo).run()
    assert [w.label for w in at.sidebar.text_input] == []  # nothing to type a path into
    boxes = {box.label: box for box in at.sidebar.selectbox}
    assert list(boxes["Model"].options) == ["default", str(tmp_path / "models" / "tiny-llama")]
    assert list(boxes["Evaluation text"].options) == list(boxes["Calibration text"].options)
    assert list(boxes["Evaluation text"].options) == ["default-calib", "default-eval"]
    assert "at most 64 MiB" in at.sidebar.file_uploader[0].label
    text = word_text(300, 1).encode()
    at.sidebar.file_uploader[0].set_value(("my notes.txt", text, "text/plain")).run()
    assert errors(at) == []
    uploaded = at.session_state[session.EVAL_TEXT]
    assert Path(uploaded).resolve().is_relative_to((tmp_path / "cache" / "uploads").resolve())
    assert "my_notes.txt" in at.sidebar.selectbox(key=f"widget_{session.EVAL_TEXT}").options[-1]
    lm = load_model(str(demo[session.MODEL]))
    expected = perplexity(lm.arch, make_windows(lm.tokenizer, load_text(uploaded), 16, 64, lm.max_positions))
    assert at.metric[0].value == f"{expected.perplexity:.3f}"


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        (session.MODEL, "../models/tiny-llama", "this demo offers only the models"),
        (session.MODEL, "/etc", "this demo offers only the models"),
        (session.EVAL_TEXT, "outside/secret.txt", "reads only the built-in texts"),
        (session.EVAL_TEXT, "/etc/hostname", "reads only the built-in texts"),
        (session.CALIB_TEXT, "cache/uploads/../../outside/secret.txt", "reads only the built-in texts"),
    ],
)
def test_a_path_in_the_session_is_refused_by_the_backend(demo, tmp_path, key, value, message):
    """Visitors cannot type these; if a session held one anyway, the backend still refuses to open it."""
    value = value if value.startswith(("/", "..")) else str(tmp_path / value)
    at = open_page(settings={**demo, key: value}).run()
    if key == session.CALIB_TEXT:  # the home page reads only the evaluation text; the HARP page the calibration
        at.switch_page("app_pages/2_HARP.py").run()
        at.button[0].click().run()
    assert any(message in e for e in errors(at)), errors(at)


def _upload_text(demo: dict[str, object]) -> dict[str, object]:
    """The session as after an upload: its evaluation text in the uploads folder."""
    path = Access.from_env().upload_path("eval.txt", "a" * 64)
    path.parent.mkdir(parents=True)
    path.write_text(word_text(300, 2))
    return {**demo, session.EVAL_TEXT: str(path)}


def _export(at, name: str, replace: bool = False):
    at.text_input(key="export_name").set_value(name)
    at.checkbox(key="export_force").set_value(replace)
    return at.button(key="export_run").click().run()


def test_the_demo_export_page_writes_by_name_below_the_exports_folder_only(demo, tmp_path):
    lm = load_model(str(demo[session.MODEL]))
    mask = Mask.unpruned(lm.shape, lm.name).with_head(1, 2, False)
    at = open_page(EXPORT, {**_upload_text(demo), session.MASK: mask.to_json()}).run()
    assert errors(at) == [] and [w.label for w in at.text_input] == ["Export name"]
    (tmp_path / "exports").mkdir()
    (tmp_path / "exports" / "notes").mkdir()
    (tmp_path / "exports" / "notes" / "mine.txt").write_text("keep me")
    (tmp_path / "exports" / "planted").symlink_to(tmp_path / "outside", target_is_directory=True)
    before = tree(tmp_path / "outside"), tree(tmp_path / "exports")
    for name, replace, message in [
        ("../outside", True, "is a path"),
        (str(tmp_path / "outside"), True, "is a path"),
        ("mine\nother", False, "control character"),
        ("m" * 5000, False, "characters long"),
        ("planted", True, "taken by a link"),
        ("notes", False, "already exists"),
        ("notes", True, "nothing was deleted"),
    ]:
        assert any(message in e for e in errors(_export(at, name, replace))), (name, errors(at))
        assert (tree(tmp_path / "outside"), tree(tmp_path / "exports")) == before
    assert errors(_export(at, "mine")) == []
    assert at.success[0].value == "Written as mine in the exports folder"
    assert load_mask(tmp_path / "exports" / "mine" / MASK_FILE, lm.shape, lm.name) == mask
    assert any("already exists" in e for e in errors(_export(at, "mine")))
    assert errors(_export(at, "mine", replace=True)) == []  # an earlier export is replaced
    assert tree(tmp_path / "outside") == before[0]
