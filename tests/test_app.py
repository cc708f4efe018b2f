"""The home page, through Streamlit's AppTest, on the real embedded model."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from analysis.corpus import default_text, make_windows
from analysis.evaluation import perplexity

pytestmark = pytest.mark.slow
APP = str(Path(__file__).resolve().parent.parent / "app.py")


def test_home_page_shows_the_card_and_the_backend_perplexity(default_model):
    at = AppTest.from_file(APP, default_timeout=300).run()
    assert not at.exception and not at.error
    windows = make_windows(default_model.tokenizer, default_text("default-eval"), 256, 2048)
    expected = perplexity(default_model.arch, windows).perplexity
    assert at.metric[0].value == f"{expected:.3f}"
    assert default_model.fingerprint in at.table[0].value.to_string()


def test_a_missing_model_path_is_an_error_message_not_a_crash(default_model, tmp_path):
    at = AppTest.from_file(APP, default_timeout=300).run()
    at.sidebar.text_input[0].set_value(str(tmp_path / "nowhere")).run()
    assert not at.exception
    assert "does not exist" in at.error[0].value
