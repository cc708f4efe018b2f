"""Demo mode: nothing a visitor types or uploads reads or writes outside the allowed folders.

Each test builds a demo policy from the environment, as ``make demo`` sets it, on folders of its own,
plants files and links outside them, and checks that the input is refused with a message and that
everything outside is byte-identical afterwards.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from analysis.access import DEMO_ENV, EXPORTS_ENV, MAX_NAME_CHARS, MODELS_ENV, Access
from analysis.errors import HeadroomError
from analysis.export import export_model
from analysis.export_folder import MASK_FILE
from analysis.mask_files import load_mask
from analysis.masks import Mask
from tests.helpers import every_kind_of_pruning, tiny_lm, tree


@pytest.fixture
def server(tmp_path, monkeypatch) -> Path:
    """A server's folders: the cache (with uploads), the exports folder, and an outside with things to protect."""
    monkeypatch.setenv("HEADROOM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(EXPORTS_ENV, str(tmp_path / "exports"))
    monkeypatch.setenv(MODELS_ENV, "operator/model-a, /srv/models/b")
    monkeypatch.setenv(DEMO_ENV, "1")
    outside = tmp_path / "outside"
    (outside / "folder").mkdir(parents=True)
    (outside / "folder" / "precious.txt").write_text("keep me")
    (outside / "secret.txt").write_text("server secret")
    return tmp_path


def test_the_workbench_trusts_its_user(server, monkeypatch):
    monkeypatch.delenv(DEMO_ENV)
    access = Access.from_env()
    assert not access.demo
    secret = str(server / "outside" / "secret.txt")
    assert access.model(str(server / "outside")) == str(server / "outside")
    assert access.text(secret) == secret


@pytest.mark.parametrize("flag", ["yes", "true", "2"])
def test_an_unreadable_demo_setting_is_refused(server, monkeypatch, flag):
    monkeypatch.setenv(DEMO_ENV, flag)
    with pytest.raises(HeadroomError, match=f"{DEMO_ENV}='{flag}' is not 0 or 1"):
        Access.from_env()


def test_a_demo_offers_the_default_and_the_operators_models_only(server):
    access = Access.from_env()
    assert access.models == ("default", "operator/model-a", "/srv/models/b")
    for spec in access.models:
        assert access.model(spec) == spec
    for spec in (
        str(server / "outside"),
        "/etc",
        "../outside",
        "default/../..",
        "operator/model-a\x00",
        "operator/model-a\n",
        "d" * 5000,
        "other/hub-model",
    ):
        with pytest.raises(HeadroomError, match="this demo offers only the models default, operator/model-a"):
            access.model(spec)


def _plant(server: Path) -> dict[str, str]:
    """Texts a visitor might name: a real upload, and links and paths from the uploads folder to the outside."""
    uploads = Path(Access.from_env().uploads_dir)
    (uploads / "abc").mkdir(parents=True)
    (uploads / "abc" / "mine.txt").write_text("uploaded words")
    (uploads / "abc" / "link.txt").symlink_to(server / "outside" / "secret.txt")
    (uploads / "dirlink").symlink_to(server / "outside", target_is_directory=True)
    return {
        "upload": str(uploads / "abc" / "mine.txt"),
        "absolute": str(server / "outside" / "secret.txt"),
        "system": "/etc/hostname",
        "dot-dot": str(uploads / "abc" / ".." / ".." / ".." / "outside" / "secret.txt"),
        "relative": "../outside/secret.txt",
        "file link": str(uploads / "abc" / "link.txt"),
        "folder link": str(uploads / "dirlink" / "secret.txt"),
        "the uploads folder": str(uploads),
        "a folder of uploads": str(uploads / "abc"),
        "nul": str(uploads / "abc" / "mine.txt") + "\x00",
        "newline": str(uploads / "abc" / "mine.txt") + "\n",
        "long": str(uploads / "abc" / ("m" * 5000)),
    }


def test_a_demo_reads_only_the_built_in_texts_and_uploads(server):
    access = Access.from_env()
    specs = _plant(server)
    assert access.text("default-eval") == "default-eval" and access.text("default-calib") == "default-calib"
    upload = specs.pop("upload")
    assert access.text(upload) == upload
    for case, spec in specs.items():
        with pytest.raises(HeadroomError, match="reads only the built-in texts"):
            access.text(spec)
            pytest.fail(f"{case} was accepted")


BAD_NAMES = {
    "empty": ("", "is empty"),
    "absolute": ("/tmp/escaped", "is a path"),
    "dot-dot": ("..", "is a path"),
    "dot-dot below": ("../outside/folder", "is a path"),
    "dot": (".", "is a path"),
    "backslash": ("..\\outside", "is a path"),
    "hidden": (".hidden", "must start with a letter or digit"),
    "home": ("~", "must start with a letter or digit"),
    "nul": ("mine\x00", "control character"),
    "newline": ("mine\nother", "control character"),
    "long": ("m" * (MAX_NAME_CHARS + 1), f"is {MAX_NAME_CHARS + 1} characters long"),
    "very long": ("m" * 100_000, "characters long"),
    "space": ("my model", "only letters, digits"),
}


@pytest.mark.parametrize("case", BAD_NAMES)
def test_an_export_name_that_is_not_a_plain_name_is_refused(server, case):
    name, message = BAD_NAMES[case]
    before = tree(server)
    with pytest.raises(HeadroomError, match=message):
        Access.from_env().export_path(name)
    assert tree(server) == before


def test_an_export_name_goes_directly_below_the_exports_folder(server):
    access = Access.from_env()
    path = access.export_path("my-model.v2_" + "m" * (MAX_NAME_CHARS - 12))
    assert path.parent == server / "exports" and path.parent.is_dir() and not path.exists()


@pytest.mark.parametrize("target", ["folder", "secret.txt"])
def test_a_link_in_the_exports_folder_leads_nowhere(server, target):
    """A link planted in the exports folder (to a folder or a file outside) is refused by name and by export."""
    exports = server / "exports"
    exports.mkdir()
    (exports / "planted").symlink_to(server / "outside" / target, target_is_directory=target == "folder")
    before = tree(server)
    access = Access.from_env()
    with pytest.raises(HeadroomError, match="taken by a link"):
        access.export_path("planted")
    lm = tiny_lm("llama")
    with pytest.raises(HeadroomError, match="symbolic link"):
        export_model(lm, every_kind_of_pruning(lm), exports / "planted", force=True)
    assert tree(server) == before


def test_a_demo_export_replaces_an_earlier_export_and_nothing_else(server):
    access = Access.from_env()
    lm = tiny_lm("llama")
    export_model(lm, Mask.unpruned(lm.shape, lm.name), access.export_path("mine"))
    mask = every_kind_of_pruning(lm)
    export_model(lm, mask, access.export_path("mine"), force=True)
    assert load_mask(server / "exports" / "mine" / MASK_FILE, lm.shape, lm.name) == mask
    (server / "exports" / "notes").mkdir()
    (server / "exports" / "notes" / "mine.txt").write_text("keep me")
    before = tree(server)
    with pytest.raises(HeadroomError, match="nothing was deleted"):
        export_model(lm, mask, access.export_path("notes"), force=True)
    assert tree(server) == before


@pytest.mark.parametrize(
    "name", ["..", "../../escape.txt", "/etc/hostname", ".hidden", "a b\\c.txt", "x\x00y\nz.txt", "n" * 5000 + ".txt"]
)
def test_an_upload_name_becomes_a_plain_file_name_inside_the_uploads_folder(server, name):
    access = Access.from_env()
    path = access.upload_path(name, "f" * 64)
    assert path.parent.parent == Path(access.uploads_dir) and path.parent.name == "f" * 16
    assert 0 < len(path.name) <= MAX_NAME_CHARS and not path.name.startswith(".")
    assert all(c.isalnum() or c in "._-" for c in path.name)
    path.parent.mkdir(parents=True)
    path.write_text("words")  # a real file system takes the name


def test_streamlit_caps_uploads_at_the_documented_text_limit():
    """The server's own upload limit (MiB) is the text limit; the smaller mask limit is checked in code."""
    import tomllib

    from analysis.corpus import MAX_TEXT_BYTES

    config = tomllib.loads((Path(__file__).resolve().parent.parent / ".streamlit" / "config.toml").read_text())
    assert config["server"]["maxUploadSize"] * 2**20 == MAX_TEXT_BYTES
