"""Texts and the windows cut from them, exactly as ``shared/docs/protocol.md`` says.

The default corpus is the Lee news corpus shipped in gensim's test data: 300 articles, one per line.
Its fixed split never overlaps: articles 0-199 are calibration (``default-calib``), articles 200-299
are evaluation (``default-eval``); each part is its articles joined with newlines.
"""

from __future__ import annotations

import codecs
import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from analysis.errors import HeadroomError

DEFAULT_TEXTS = ("default-calib", "default-eval")
CALIBRATION_ARTICLES = range(0, 200)
EVALUATION_ARTICLES = range(200, 300)
MAX_TEXT_BYTES = 64 * 2**20  # a user text larger than this is refused, not truncated


@dataclass(frozen=True)
class Text:
    """A named text and the sha256 of its UTF-8 bytes (the protocol's corpus identity)."""

    name: str
    text: str
    sha256: str

    @classmethod
    def of(cls, name: str, text: str) -> Text:
        return cls(name, text, hashlib.sha256(text.encode("utf-8")).hexdigest())


def lee_articles() -> list[str]:
    from gensim.test.utils import datapath

    lines = Path(datapath("lee_background.cor")).read_text(encoding="utf-8").split("\n")
    return [line.strip() for line in lines if line.strip()]


def default_text(which: str) -> Text:
    """``default-calib`` or ``default-eval`` from the Lee corpus split."""
    articles = lee_articles()
    part = CALIBRATION_ARTICLES if which == "default-calib" else EVALUATION_ARTICLES
    return Text.of(f"lee-{which.removeprefix('default-')}", "\n".join(articles[i] for i in part))


def _check_size(name: str, size: int) -> None:
    if size > MAX_TEXT_BYTES:
        raise HeadroomError(
            f"{name} is {size / 2**20:.1f} MiB; the limit is {MAX_TEXT_BYTES // 2**20} MiB. "
            "Use a shorter excerpt: perplexity needs far less text than that."
        )


def decode_text(name: str, data: bytes, encoding: str = "utf-8") -> Text:
    """Decode user bytes, refusing binary data, bad encodings and empty text with a clear message."""
    _check_size(name, len(data))
    try:
        codec = codecs.lookup(encoding).name  # canonical: "UTF_16LE" -> "utf-16-le"
        nul = data.find(b"\x00")
        if nul >= 0 and not codec.startswith(("utf-16", "utf-32")):
            raise HeadroomError(f"{name} looks like binary data (a NUL byte at offset {nul}); give a plain text file")
        text = data.decode("utf-8-sig" if codec == "utf-8" else encoding)  # a UTF-8 BOM is not text
    except LookupError:
        raise HeadroomError(
            f"unknown text encoding '{encoding}'; use a Python codec name such as utf-8 or latin-1"
        ) from None
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise HeadroomError(
            f"{name} is not valid {encoding}: byte 0x{data[e.start]:02x} at offset {e.start} (line {line}) {e.reason}. "
            "Convert the file to UTF-8, or name its encoding (latin-1, for example).",
            settings=("encoding",),
        ) from None
    if not text.strip():
        raise HeadroomError(f"{name} is empty; give a text with at least one window of tokens")
    return Text.of(name, text)


def load_text(spec: str, encoding: str = "utf-8") -> Text:
    """``default-calib``, ``default-eval`` or the path of a text file."""
    if spec in DEFAULT_TEXTS:
        return default_text(spec)
    path = Path(spec)
    if not path.is_file():
        raise HeadroomError(f"text file {spec} does not exist; give a file path, default-calib or default-eval")
    _check_size(path.name, path.stat().st_size)  # before reading it into memory
    return decode_text(path.name, path.read_bytes(), encoding)


@dataclass(frozen=True)
class Windows:
    """Consecutive non-overlapping chunks of one text, ready to feed.

    ``input_ids`` is ``[n, seqlen + 1]`` with a BOS column when the tokenizer adds BOS by default
    (then every chunk token is predicted), else ``[n, seqlen]`` (the first token is not predicted).
    Either way the targets are ``input_ids[:, 1:]``.
    """

    input_ids: torch.Tensor
    seqlen: int
    has_bos: bool
    text_name: str
    text_sha256: str

    @property
    def num_windows(self) -> int:
        return self.input_ids.shape[0]

    @property
    def predicted_tokens(self) -> int:
        return self.input_ids.shape[0] * (self.input_ids.shape[1] - 1)

    def cache_key(self) -> dict[str, object]:
        """What identifies these windows in a result-cache key: their :meth:`metadata` but the text's name
        (content, never a name or path) and the predicted tokens (which follow from the rest)."""
        return {k: v for k, v in self.metadata().items() if k not in ("text", "predicted_tokens")}

    def metadata(self) -> dict[str, object]:
        """The windows as the CLI reports them."""
        return {
            "text": self.text_name,
            "text_sha256": self.text_sha256,
            "seqlen": self.seqlen,
            "windows": self.num_windows,
            "predicted_tokens": self.predicted_tokens,
            "bos": self.has_bos,
        }


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts a BOS token in front by default (the protocol's BOS rule)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a").input_ids
    return bool(ids) and ids[0] == bos and tokenizer("a", add_special_tokens=False).input_ids[:1] != [bos]


def make_windows(
    tokenizer, text: Text, seqlen: int, max_tokens: int | None = None, max_positions: int | None = None
) -> Windows:
    """Tokenize ``text`` once without special tokens and cut it into windows per the protocol."""
    bos = adds_bos(tokenizer)
    if seqlen < (1 if bos else 2):
        raise HeadroomError(
            f"seqlen must be at least {1 if bos else 2} tokens, got {seqlen}; give a window length such as 256",
            settings=("seqlen",),
        )
    if max_positions is not None and seqlen + bos > max_positions:
        raise HeadroomError(
            f"seqlen {seqlen} is longer than the model's context of {max_positions} positions; "
            f"use a seqlen of {max_positions - bos} or less",
            settings=("seqlen",),
        )
    if max_tokens is not None and max_tokens < seqlen:
        raise HeadroomError(
            f"max-tokens {max_tokens} is smaller than one window of {seqlen} tokens; raise max-tokens or lower seqlen",
            settings=("max_tokens", "seqlen"),
        )
    ids = tokenizer(text.text, add_special_tokens=False, verbose=False).input_ids
    n = len(ids) // seqlen
    if max_tokens is not None:
        n = min(n, max_tokens // seqlen)
    if n == 0:
        raise HeadroomError(
            f"{text.name} has {len(ids)} tokens, fewer than one window of {seqlen}; "
            "use a longer text or a smaller seqlen",
            settings=("seqlen",),
        )
    chunks = torch.tensor(ids[: n * seqlen], dtype=torch.long).view(n, seqlen)
    if bos:
        chunks = torch.cat([torch.full((n, 1), tokenizer.bos_token_id, dtype=torch.long), chunks], dim=1)
    return Windows(chunks, seqlen, bos, text.name, text.sha256)
