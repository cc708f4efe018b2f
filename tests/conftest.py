"""Shared fixtures: tiny random models of every supported family, a tiny Llama saved to disk, the
pages' tiny app, and the real embedded model. Plain helpers (no fixtures) are in ``tests/helpers.py``.

The real model is converted from its GGUF once per test run into a session-wide temporary cache, so
every module that needs it shares one conversion and no run depends on an earlier one.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from analysis.architecture import Architecture
from analysis.loading import LoadedModel, load_model
from tests.helpers import FAMILY_TYPES, save_checkpoint, tiny_app, tiny_model
from ui import session


@pytest.fixture(params=FAMILY_TYPES)
def tiny_arch(request) -> Architecture:
    return Architecture(tiny_model(request.param))


@pytest.fixture(scope="session", autouse=True)
def session_cache(tmp_path_factory) -> Iterator[Path]:
    """A cache root for this run, exported as $HEADROOM_CACHE so subprocesses (CLI, app) share it.

    From the first test on, so no test reads or writes the project's own ``cache/``; the variable is
    put back as it was when the run ends.
    """
    root = tmp_path_factory.mktemp("headroom-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HEADROOM_CACHE", str(root))
        yield root


@pytest.fixture
def cache_dir(tmp_path, monkeypatch) -> Path:
    """An empty result cache (and fingerprint memo) of this test's own, exported via $HEADROOM_CACHE."""
    root = tmp_path / "headroom-cache"
    monkeypatch.setenv("HEADROOM_CACHE", str(root))
    return root


@pytest.fixture(scope="session")
def default_model(session_cache):
    """The real embedded SmolLM2-135M-Instruct, converted once for the whole run."""
    return load_model("default", cache_root=session_cache)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    """A tiny random Llama with a BOS-adding word tokenizer saved as a HF directory (one per test module)."""
    directory = tmp_path_factory.mktemp("llama") / "tiny-llama"
    save_checkpoint(directory)
    return directory


@pytest.fixture(scope="module")
def app_root(tmp_path_factory, session_cache) -> Path:
    """The folder of this module's tiny app: a tiny Llama and word texts (:func:`tests.helpers.tiny_app`)."""
    return tmp_path_factory.mktemp("app")


@pytest.fixture(scope="module")
def tiny(app_root) -> dict[str, object]:
    """Session settings that point every page at the tiny app's Llama and texts."""
    return tiny_app(app_root)


@pytest.fixture(scope="module")
def lm(tiny) -> LoadedModel:
    """The tiny app's Llama, loaded as the pages load it."""
    return load_model(str(tiny[session.MODEL]))
