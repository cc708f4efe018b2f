"""Texts, the default split and windows, exactly as shared/docs/protocol.md's perplexity protocol says."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import analysis.corpus as corpus
from analysis.corpus import Text, decode_text, default_text, lee_articles, load_text, make_windows
from analysis.errors import HeadroomError

BOS = 1


class FakeTokenizer:
    """Whitespace tokenizer: a word of digits is that token id, any other word is id 2.

    ``adds_bos`` says whether it puts BOS in front by default, as Llama's tokenizer does; both variants
    have a ``bos_token_id``, as SmolLM2's (which never adds it) has. Every call is recorded.
    """

    bos_token_id = BOS

    def __init__(self, adds_bos: bool) -> None:
        self.adds_bos = adds_bos
        self.calls: list[tuple[str, bool]] = []

    def __call__(self, text: str, add_special_tokens: bool = True, **kwargs) -> SimpleNamespace:
        self.calls.append((text, add_special_tokens))
        ids = [int(w) if w.isdigit() else 2 for w in text.split()]
        if add_special_tokens and self.adds_bos:
            ids = [BOS, *ids]
        return SimpleNamespace(input_ids=ids)


def numbered(n: int) -> Text:
    """A text whose tokens are 100, 101, ..., 100 + n - 1 (never BOS)."""
    return Text.of("numbers", " ".join(str(100 + i) for i in range(n)))


# --- the default split ----------------------------------------------------------------------------


def test_default_split_is_disjoint_and_has_the_documented_sizes():
    calib, evaluation = load_text("default-calib"), load_text("default-eval")
    calib_articles, eval_articles = calib.text.split("\n"), evaluation.text.split("\n")
    assert len(calib_articles) == 200
    assert len(eval_articles) == 100
    assert not set(calib_articles) & set(eval_articles)  # no article of one is in the other
    articles = lee_articles()
    assert len(articles) == 300
    assert calib_articles == articles[:200]
    assert eval_articles == articles[200:]
    assert all(a and a == a.strip() and "\n" not in a for a in articles)
    assert calib.name != evaluation.name and calib.sha256 != evaluation.sha256


@pytest.mark.parametrize("which", ["default-calib", "default-eval"])
def test_default_text_sha256_is_stable(which):
    first, second = load_text(which), default_text(which)
    assert first == second
    assert first.sha256 == hashlib.sha256(first.text.encode("utf-8")).hexdigest()
    assert re.fullmatch(r"[0-9a-f]{64}", first.sha256)


# --- decoding user text ---------------------------------------------------------------------------


def test_latin1_text_is_rejected_with_position():
    data = "hello\ncafé au lait\n".encode("latin-1")
    # "hello\n" is 6 bytes and "caf" 3 more, so é (0xe9) is at offset 9, on line 2.
    assert data[9] == 0xE9
    with pytest.raises(HeadroomError) as info:
        decode_text("menu.txt", data)
    message = str(info.value)
    assert "menu.txt is not valid utf-8" in message
    assert "byte 0xe9 at offset 9 (line 2)" in message
    assert "name its encoding (latin-1, for example)" in message and info.value.settings == ("encoding",)


def test_latin1_text_decodes_with_its_encoding():
    data = "hello\ncafé au lait\n".encode("latin-1")
    text = decode_text("menu.txt", data, encoding="latin-1")
    assert text.text == "hello\ncafé au lait\n"
    assert text.name == "menu.txt"
    # The corpus identity is the sha256 of the text's UTF-8 bytes, not of the file's bytes.
    assert text.sha256 == hashlib.sha256("hello\ncafé au lait\n".encode()).hexdigest()
    assert text.sha256 != hashlib.sha256(data).hexdigest()


def test_latin1_file_is_rejected_then_loaded_with_encoding(tmp_path):
    path = tmp_path / "menu.txt"
    path.write_bytes("first line\nsecond\nna\xefve\n".encode("latin-1"))
    # "first line\n" is 11 bytes, "second\n" 7, "na" 2: ï (0xef) is at offset 20, on line 3.
    with pytest.raises(HeadroomError, match=re.escape("byte 0xef at offset 20 (line 3)")):
        load_text(str(path))
    assert load_text(str(path), encoding="latin-1").text == "first line\nsecond\nnaïve\n"


def test_utf8_text_is_accepted():
    text = decode_text("t.txt", "naïve café — ok\n".encode())
    assert text == Text.of("t.txt", "naïve café — ok\n")


@pytest.mark.parametrize("data", [b"abc\x00def", b"\x00", b"PK\x03\x04\x00\x00binary"])
def test_binary_data_is_rejected(data):
    offset = data.index(b"\x00")
    with pytest.raises(HeadroomError, match=re.escape(f"blob looks like binary data (a NUL byte at offset {offset})")):
        decode_text("blob", data)


@pytest.mark.parametrize("encoding", ["utf-16", "UTF-16-LE", "utf_16_be", "utf-32", "U32"])
def test_utf16_and_utf32_text_may_contain_nul_bytes(encoding):
    data = "hello world\n".encode(encoding)
    assert b"\x00" in data
    assert decode_text("wide.txt", data, encoding=encoding).text == "hello world\n"


@pytest.mark.parametrize("data", [b"", b" ", b"  \n\t\r\n  "])
def test_empty_text_is_rejected(data):
    with pytest.raises(HeadroomError, match=r"empty\.txt is empty"):
        decode_text("empty.txt", data)


def test_empty_file_is_rejected(tmp_path):
    path = tmp_path / "blank.txt"
    path.write_text("\n\n   \n", encoding="utf-8")
    with pytest.raises(HeadroomError, match=r"blank\.txt is empty"):
        load_text(str(path))


def test_oversized_bytes_are_rejected(monkeypatch):
    monkeypatch.setattr(corpus, "MAX_TEXT_BYTES", 16)
    assert decode_text("ok.txt", b"x" * 16).text == "x" * 16  # the limit itself is allowed
    with pytest.raises(HeadroomError, match=r"big\.txt is .* MiB; the limit is .* Use a shorter excerpt"):
        decode_text("big.txt", b"x" * 17)


def test_oversized_file_is_rejected_before_reading(tmp_path, monkeypatch):
    path = tmp_path / "big.txt"
    path.write_bytes(b"word " * 100)
    monkeypatch.setattr(corpus, "MAX_TEXT_BYTES", 499)

    def no_reading(self, *args, **kwargs):
        raise AssertionError(f"{self} was read although it is over the limit")

    monkeypatch.setattr(Path, "read_bytes", no_reading)
    monkeypatch.setattr(Path, "read_text", no_reading)
    with pytest.raises(HeadroomError, match=r"big\.txt is .* MiB; the limit is"):
        load_text(str(path))


def test_missing_file_is_rejected(tmp_path):
    path = tmp_path / "missing.txt"
    with pytest.raises(HeadroomError, match=r"text file .*missing\.txt does not exist; give a file path"):
        load_text(str(path))


def test_directory_is_not_a_text(tmp_path):
    with pytest.raises(HeadroomError, match="does not exist; give a file path"):
        load_text(str(tmp_path))


@pytest.mark.parametrize("encoding", ["no-such-codec", "base64"])
def test_unknown_encoding_is_rejected(encoding, tmp_path):
    with pytest.raises(HeadroomError, match=f"unknown text encoding '{encoding}'; use a Python codec name"):
        decode_text("t.txt", b"plain text", encoding=encoding)
    path = tmp_path / "t.txt"
    path.write_bytes(b"plain text")
    with pytest.raises(HeadroomError, match=f"unknown text encoding '{encoding}'"):
        load_text(str(path), encoding=encoding)


def test_load_text_reads_a_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("one two three\n", encoding="utf-8")
    text = load_text(str(path))
    assert text == Text.of("notes.txt", "one two three\n")


# --- windows --------------------------------------------------------------------------------------


def test_windows_without_bos():
    tok = FakeTokenizer(adds_bos=False)
    text = numbered(50)
    w = make_windows(tok, text, seqlen=8)
    # 50 tokens // 8 = 6 windows of 8; the last 50 - 48 = 2 tokens are dropped.
    expected = torch.arange(100, 148).view(6, 8)
    assert w.input_ids.dtype == torch.long
    assert torch.equal(w.input_ids, expected)
    assert not w.has_bos
    assert w.num_windows == 6
    # Targets are input_ids[:, 1:]: the first token of each window is not predicted.
    assert torch.equal(w.input_ids[:, 1:], expected[:, 1:])
    assert w.predicted_tokens == 6 * (8 - 1) == 42
    # The whole text was tokenized once, without special tokens.
    text_calls = [c for c in tok.calls if c[0] == text.text]
    assert text_calls == [(text.text, False)]
    assert w.metadata() == {
        "text": "numbers",
        "text_sha256": text.sha256,
        "seqlen": 8,
        "windows": 6,
        "predicted_tokens": 42,
        "bos": False,
    }


def test_windows_with_bos():
    tok = FakeTokenizer(adds_bos=True)
    text = numbered(50)
    w = make_windows(tok, text, seqlen=8)
    chunks = torch.arange(100, 148).view(6, 8)
    assert w.has_bos
    assert w.input_ids.shape == (6, 9)
    assert torch.equal(w.input_ids[:, 0], torch.full((6,), BOS))  # [BOS] + chunk
    assert torch.equal(w.input_ids[:, 1:], chunks)  # the targets: every chunk token is predicted
    assert w.predicted_tokens == 6 * 8 == 48
    assert (w.input_ids[:, 1:] != BOS).all()  # no BOS inside chunks: tokenized without special tokens
    assert [c for c in tok.calls if c[0] == text.text] == [(text.text, False)]
    assert w.metadata()["bos"] is True and w.metadata()["predicted_tokens"] == 48


def test_tokenizer_without_bos_id_never_adds_one():
    tok = FakeTokenizer(adds_bos=True)
    tok.bos_token_id = None
    w = make_windows(tok, numbered(20), seqlen=5)
    assert not w.has_bos and w.input_ids.shape == (4, 5)


@pytest.mark.parametrize("adds_bos", [False, True])
def test_exact_multiple_keeps_every_token(adds_bos):
    w = make_windows(FakeTokenizer(adds_bos), numbered(24), seqlen=8)
    assert w.num_windows == 3
    assert torch.equal(w.input_ids[:, -8:].reshape(-1), torch.arange(100, 124))


@pytest.mark.parametrize(
    ("max_tokens", "windows"),
    [
        (8, 1),  # 8 // 8
        (20, 2),  # 20 // 8: the partial third chunk is not used
        (24, 3),
        (47, 5),
        (48, 6),
        (10_000, 6),  # more than the text has: all 6 windows
        (None, 6),
    ],
)
def test_max_tokens_keeps_the_first_chunks(max_tokens, windows):
    w = make_windows(FakeTokenizer(False), numbered(50), seqlen=8, max_tokens=max_tokens)
    assert w.num_windows == windows
    assert torch.equal(w.input_ids.reshape(-1), torch.arange(100, 100 + 8 * windows))  # the first ones


@pytest.mark.parametrize(("adds_bos", "minimum"), [(False, 2), (True, 1)])
@pytest.mark.parametrize("seqlen", [0, -1, -8])
def test_seqlen_must_be_positive(adds_bos, minimum, seqlen):
    with pytest.raises(HeadroomError, match=rf"seqlen must be at least {minimum} tokens, got {seqlen}"):
        make_windows(FakeTokenizer(adds_bos), numbered(50), seqlen=seqlen)


def test_seqlen_one_without_bos_predicts_nothing_and_is_rejected():
    with pytest.raises(HeadroomError, match="seqlen must be at least 2 tokens, got 1"):
        make_windows(FakeTokenizer(False), numbered(50), seqlen=1)
    w = make_windows(FakeTokenizer(True), numbered(50), seqlen=1)  # with BOS one token is predicted
    assert w.input_ids.shape == (50, 2) and w.predicted_tokens == 50


def test_seqlen_beyond_the_context_is_rejected():
    assert make_windows(FakeTokenizer(False), numbered(50), seqlen=16, max_positions=16).num_windows == 3
    with pytest.raises(HeadroomError, match=r"seqlen 17 is longer than .* context of 16 .* use a seqlen of 16 or"):
        make_windows(FakeTokenizer(False), numbered(50), seqlen=17, max_positions=16)
    # With BOS a window takes seqlen + 1 positions.
    assert make_windows(FakeTokenizer(True), numbered(50), seqlen=15, max_positions=16).input_ids.shape == (3, 16)
    with pytest.raises(HeadroomError, match=r"seqlen 16 is longer than .* context of 16 .* use a seqlen of 15 or"):
        make_windows(FakeTokenizer(True), numbered(50), seqlen=16, max_positions=16)


def test_max_tokens_below_one_window_is_rejected():
    with pytest.raises(HeadroomError, match="max-tokens 7 is smaller than one window of 8 tokens"):
        make_windows(FakeTokenizer(False), numbered(50), seqlen=8, max_tokens=7)


@pytest.mark.parametrize("adds_bos", [False, True])
def test_text_shorter_than_one_window_is_rejected(adds_bos):
    with pytest.raises(HeadroomError, match="numbers has 7 tokens, fewer than one window of 8"):
        make_windows(FakeTokenizer(adds_bos), numbered(7), seqlen=8)
