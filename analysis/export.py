"""Exporting a masked model as a Hugging Face directory that plain transformers loads.

Two kinds:

* ``compact``: the pruned parts are physically gone. Query heads' q_proj rows and o_proj columns,
  KV groups whose query heads are all pruned, q/k (and their q/k norms) of drop-QK layers, and
  the whole attention of alpha = 0 layers are removed; alpha is folded into the weights. Where the q/k
  norms span every head (OLMo2), pruned heads keep their q/k rows, which the norm reads. Layers may
  end with different head counts, so the directory ships its modeling code
  (``analysis/exported/``, loaded through ``auto_map`` with ``trust_remote_code=True``).
* ``stock``: the source architecture with pruned heads zeroed and alpha folded: no remote code, but
  no smaller and no faster. A mask with drop-QK layers cannot be expressed this way.

Alpha scales the branch where it joins the residual stream (``Architecture.branch_output``); the adapter
says which tensors carry it (``Architecture.branch_scale_state``: o_proj's weight and bias, or the weight of
a post-attention norm, which would undo any scale of its input). A fused qkv projection (Phi-3) is sliced
into its q, k and v rows and fused again from the kept rows (``Architecture.qkv_state``).

Every export is checked against the masked model (``apply_mask``) on a few tokens before it is
moved into place, is built in a temporary folder next to its destination, and replaces an existing
folder only when asked to, only if that folder is itself a Headroom export, and only at the very end.
An export keeps the dtype the model was loaded in (its ``config.json`` and model card say which).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from analysis.architecture import Architecture, ModelShape, Projection, count_parameters
from analysis.cache import DiskCache
from analysis.corpus import Windows
from analysis.errors import HeadroomError
from analysis.evaluation import PerplexityResult, Progress, batches, cached_perplexity
from analysis.exported.configuration_headroom import ATTENTION, DROP_QK, NONE
from analysis.files import atomic_directory, atomic_write_text
from analysis.intervention import apply_mask
from analysis.loading import LoadedModel
from analysis.masks import FORMAT, Budget, Mask, budget

KINDS = ("compact", "stock")
MASK_FILE = "headroom_mask.json"
CARD_FILE = "README.md"
CHECK_TOKENS = 64  # tokens of the evaluation text on which every export is compared with the masked model
# float32: an export further off than this is a bug and is not written. 1e-4, or this many float32
# epsilons of the largest |logit| when that is more: folding alphas up to 1.35 into weights and dropping
# 24 KV groups (the KV 12,288 search mask) measured 1.41e-4 on the default model, about 40 eps of its
# largest logit, where one wrong head or a wrong alpha step is off by more than 1e-2.
MAX_LOGIT_DIFFERENCE = 1e-4
FLOAT32_EPSILONS = 128
# 16-bit exports: this many machine epsilons of the largest |logit|. The export folds alpha into weights
# rounded to the dtype and multiplies matrices of other shapes, so the two round differently: measured up
# to 1.7 eps on the default model in bfloat16 and 2.6 eps in float16, where one wrong head or a wrong
# alpha step (0.1) is off by 60 to 120 eps.
LOW_PRECISION_EPSILONS = 4


def max_logit_difference(dtype: torch.dtype, largest_logit: float) -> float:
    """The largest |logit difference| an export in ``dtype`` may have from the masked model."""
    if dtype == torch.float32:
        return max(MAX_LOGIT_DIFFERENCE, FLOAT32_EPSILONS * torch.finfo(dtype).eps * largest_logit)
    return LOW_PRECISION_EPSILONS * torch.finfo(dtype).eps * max(1.0, largest_logit)


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote and what it measured."""

    path: str
    kind: str
    dtype: str  # of the exported weights: the dtype the model was loaded in
    params_before: int
    params_after: int
    budget: Budget
    perplexity_before: PerplexityResult | None
    perplexity_after: PerplexityResult | None
    max_abs_logit_difference: float  # export vs the masked model, on the check tokens
    command: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# --- what each layer keeps ------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerStructure:
    """What one layer of an export keeps; heads are numbered as in the source."""

    kind: str  # ATTENTION, DROP_QK or NONE (see analysis/exported/configuration_headroom.py)
    query_heads: tuple[int, ...]
    kv_heads: tuple[int, ...]
    o_bias: bool = False  # o_proj gets a bias (the mask's) that the family's o_proj lacks

    def to_json(self) -> dict[str, Any]:
        """The layer's entry of the compact export's ``headroom_layers`` (``o_bias`` only where true)."""
        obj: dict[str, Any] = {"kind": self.kind, "query_heads": list(self.query_heads)}
        obj["kv_heads"] = list(self.kv_heads)
        return {**obj, "o_bias": True} if self.o_bias else obj


def layer_structure(mask: Mask, arch: Architecture) -> list[LayerStructure]:
    """Per layer: kind (attention / drop_qk / none), kept query heads and kept KV heads.

    A layer with every query head pruned adds only o_proj's bias, if any (the source's or the mask's): without
    one it is ``none``, with one it is a drop-QK layer with no heads (its output is the bias).
    """
    shape = arch.shape
    layers = []
    for i in range(shape.num_layers):
        spec = mask.layer(i)
        query = tuple(h for h, keep in enumerate(spec.heads) if keep)
        kv = tuple(sorted({shape.kv_group(h) for h in query}))
        if spec.alpha == 0.0 or (not query and not shape.o_bias and spec.bias is None):
            layers.append(LayerStructure(NONE, (), ()))
            continue
        kind = DROP_QK if spec.drop_qk or not query else ATTENTION
        layers.append(LayerStructure(kind, query, kv, o_bias=spec.bias is not None and not shape.o_bias))
    return layers


def _rows(heads: Sequence[int], head_dim: int) -> torch.Tensor:
    """Indices of the rows (or columns) of ``heads`` in a projection with heads of ``head_dim``."""
    return torch.tensor([h * head_dim + j for h in heads for j in range(head_dim)], dtype=torch.long)


def _keep(t: torch.Tensor, dim: int, rows: torch.Tensor, compact: bool) -> torch.Tensor:
    """Only ``rows`` along ``dim``: selected (compact) or the others zeroed (stock)."""
    if compact:
        return t.index_select(dim, rows)
    keep = torch.zeros(t.shape[dim], dtype=t.dtype)
    keep[rows] = 1
    return t * keep.view(-1, *([1] * (t.dim() - 1 - dim)))


def _keep_projection(
    projection: Projection, heads: Sequence[int], head_dim: int, compact: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The (weight, bias) rows of ``heads`` of a q, k or v projection, on the CPU (see ``_keep``)."""
    rows = _rows(heads, head_dim)
    weight = _keep(projection.weight.detach().to("cpu"), 0, rows, compact)
    bias = None if projection.bias is None else _keep(projection.bias.detach().to("cpu"), 0, rows, compact)
    return weight, bias


def _state_dict(arch: Architecture, mask: Mask, layers: list[LayerStructure], compact: bool) -> dict[str, torch.Tensor]:
    """The export's tensors on the CPU: the source's, with alpha folded and each layer's attention pruned.

    Alpha is folded first (``Architecture.branch_scale_state``), since scaling commutes with removing heads. Where
    the q/k norms span every head (``ModelShape.qk_norm_spans_heads``) q and k keep every head's rows.
    """
    names = {module: name for name, module in arch.model.named_modules()}
    # Unchanged tensors share storage with the source (never written); changed ones are new tensors.
    state = {name: t.detach().to("cpu") for name, t in arch.model.state_dict().items()}
    shape = arch.shape
    hd = shape.head_dim
    for i, layer in enumerate(layers):
        prefix = names[arch.attention(i)]
        o_scale = 1.0  # what alpha multiplies o_proj by: alpha, unless a post-attention norm carries it
        if mask.alpha[i] != 1.0:
            scaled = arch.branch_scale_state(i, mask.alpha[i])
            o_scale = mask.alpha[i] if f"{prefix}.o_proj.weight" in scaled else 1.0
            state.update(scaled)
        if (bias := mask.bias_of(i)) is not None:  # mask v2: folded into o_proj's bias, after alpha like the rest
            extra = torch.tensor(bias, dtype=state[f"{prefix}.o_proj.weight"].dtype) * o_scale
            state[f"{prefix}.o_proj.bias"] = state.get(f"{prefix}.o_proj.bias", 0.0) + extra
        own = {k.removeprefix(prefix + "."): state.pop(k) for k in list(state) if k.startswith(prefix + ".")}
        query, kv = layer.query_heads, layer.kv_heads
        q_heads, k_heads = (
            (range(shape.num_heads), range(shape.num_kv_heads)) if shape.qk_norm_spans_heads else (query, kv)
        )
        q, k, v = arch.query_key_value(i)
        kept: dict[str, torch.Tensor] = {}
        if layer.kind != NONE or not compact:
            kept["o_proj.weight"] = _keep(own["o_proj.weight"], 1, _rows(query, hd), compact)
            if "o_proj.bias" in own:
                kept["o_proj.bias"] = own["o_proj.bias"] * (1.0 if layer.kind != NONE else 0.0)
            values = _keep_projection(v, kv, hd, compact)
        if layer.kind == ATTENTION or not compact:
            queries, keys = (
                _keep_projection(q, q_heads, hd, compact),
                _keep_projection(k, k_heads, hd, compact),
            )
            kept.update(arch.qkv_state(queries, keys, values))
            kept.update({name: t for name, t in own.items() if name.startswith(("q_norm.", "k_norm."))})
        elif layer.kind == DROP_QK:
            kept.update(arch.qkv_state(None, None, values))
        state.update({f"{prefix}.{name}": t for name, t in kept.items()})
    return state


# --- building and checking the exported model ------------------------------------------------------


def _config_dict(arch: Architecture) -> dict[str, Any]:
    volatile = {"model_type", "architectures", "auto_map", "transformers_version", "dtype", "torch_dtype"}
    return {k: v for k, v in arch.config.to_dict().items() if k not in volatile}


def _build(cls: type, config: Any, state: dict[str, torch.Tensor]) -> nn.Module:
    """``cls(config)`` holding ``state`` (tied embeddings tied again), in eval mode, with no random init."""
    from transformers.initialization import no_init_weights

    with no_init_weights():
        model = cls(config)
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()
    return model.eval().requires_grad_(False)


def _compact_model(arch: Architecture, mask: Mask) -> nn.Module:
    layers = layer_structure(mask, arch)
    config_class, model_class = arch.export_classes()
    config = config_class(
        **{
            **_config_dict(arch),
            "head_dim": arch.shape.head_dim,
            "headroom_layers": [layer.to_json() for layer in layers],
            "headroom_qkv_bias": arch.shape.qkv_bias,
            "headroom_o_bias": arch.shape.o_bias,
            "headroom_qk_norm_spans_heads": arch.shape.qk_norm_spans_heads,
        }
    )
    model = _build(model_class, config, _state_dict(arch, mask, layers, compact=True))
    config.register_for_auto_class()  # save_pretrained copies the modeling files and writes auto_map
    model.register_for_auto_class("AutoModelForCausalLM")
    return model


def _check_stock(mask: Mask, shape: ModelShape) -> None:
    if mask.bias and not shape.o_bias:
        raise HeadroomError(
            f"a stock export cannot express the mask's o_proj bias (layers {[i for i, _ in mask.bias]}): this "
            "family's o_proj has no bias. Use the compact kind (loads with trust_remote_code=True), which adds one",
            settings=("kind",),
        )
    if mask.drop_qk:
        raise HeadroomError(
            f"a stock export cannot express drop-QK (layers {sorted(mask.drop_qk)}): the source architecture always "
            "computes queries and keys. Use the compact kind (loads with trust_remote_code=True), or remove the "
            "drop-QK layers from the mask",
            settings=("kind",),
        )


def _stock_model(arch: Architecture, mask: Mask) -> nn.Module:
    _check_stock(mask, arch.shape)
    config = type(arch.config).from_dict(arch.config.to_dict())
    return _build(type(arch.model), config, _state_dict(arch, mask, layer_structure(mask, arch), compact=False))


@torch.no_grad()
def _logit_difference(
    arch: Architecture, mask: Mask, exported: nn.Module, input_ids: torch.Tensor
) -> tuple[float, float]:
    """Max |logit difference| between the export and the masked model (float32 logits, with any soft-capping),
    and the largest |logit| of the masked model."""
    with apply_mask(arch, mask):
        expected = arch.logits(arch.final_hidden(input_ids)).float().cpu()
    got = exported(input_ids=input_ids.cpu(), use_cache=False).logits.float()
    return float((got - expected).abs().max()), float(expected.abs().max())


# --- the destination --------------------------------------------------------------------------------


MAX_NAME_BYTES = 200  # an export folder's name; its staging siblings add 30 bytes and a file name may have 255
REQUIRED_FILES = ("config.json", MASK_FILE, CARD_FILE)  # with weights, what marks a folder as a Headroom export


def export_problem(path: Path) -> str | None:
    """Why ``path`` is not a Headroom export, or None when it is one: only such a folder is ever replaced.

    An export is a real folder (not a link) holding only files (no sub-folder, no link), among them
    ``REQUIRED_FILES`` and ``*.safetensors`` weights, with a Headroom mask (JSON, ``format`` ``headroom.mask``)
    as its mask file.
    """
    if path.is_symlink():
        return "it is a symbolic link"
    if not path.is_dir():
        return "it is not a folder"
    entries = list(path.iterdir())
    odd = sorted(p.name for p in entries if p.is_symlink() or not p.is_file())
    if odd:
        return f"it holds {odd[0]!r}, a folder or link that no export writes"
    missing = [name for name in REQUIRED_FILES if not (path / name).is_file()]
    if missing:
        return f"it has no {' and no '.join(missing)}"
    if not any(p.suffix == ".safetensors" for p in entries):
        return "it has no weights (*.safetensors)"
    try:
        mask = json.loads((path / MASK_FILE).read_bytes())
    except (ValueError, OSError):
        return f"its {MASK_FILE} is not JSON"
    if not isinstance(mask, dict) or mask.get("format") != FORMAT:
        return f"its {MASK_FILE} is not a Headroom mask"
    return None


def _refuse_to_replace(path: Path, problem: str) -> HeadroomError:
    return HeadroomError(
        f"{path} is not a Headroom export ({problem}), so it is never replaced and nothing was deleted; "
        "give a new folder name, or the name of an earlier export to replace"
    )


def check_destination(out: str | Path, force: bool) -> Path:
    """Refuse a destination the export could not (or must not) be moved to, before any long computation.

    ``force`` replaces only an earlier Headroom export (:func:`export_problem`); any other non-empty
    folder, a file or a link is refused, and nothing is deleted.
    """
    text = str(out).strip()
    if not text:
        raise HeadroomError("the output folder is empty; give a folder name such as exports/my-model")
    control = next((c for c in text if ord(c) < 32 or ord(c) == 127), None)
    if control is not None:
        raise HeadroomError(f"the output folder's name holds the control character {control!r}; give a plain name")
    path = Path(text).expanduser()
    if len(path.name.encode("utf-8")) > MAX_NAME_BYTES:
        raise HeadroomError(
            f"the output folder's name is {len(path.name.encode('utf-8'))} bytes long; give one of at most "
            f"{MAX_NAME_BYTES} bytes"
        )
    if path.is_symlink():
        raise HeadroomError(f"{path} is a symbolic link; an export never writes through one. Give a new folder name")
    if path.exists() and not path.is_dir():
        raise HeadroomError(f"{path} exists and is not a folder; give a new folder name")
    if path.is_dir() and any(path.iterdir()):
        if not force:
            raise HeadroomError(
                f"{path} already exists and is not empty; pick another folder, or ask to replace it",
                settings=("force",),
            )
        if problem := export_problem(path):
            raise _refuse_to_replace(path, problem)
    parent = path.parent
    if not parent.is_dir():
        raise HeadroomError(f"folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise HeadroomError(f"folder {parent} is not writable; pick a folder you can write to")
    return path


def _move_into_place(built: Path, path: Path, force: bool) -> None:
    """Rename ``built`` to ``path``; an existing export at ``path`` is renamed aside first and deleted only afterwards.

    What is deleted is checked after it was renamed aside, so a folder that changed since
    :func:`check_destination` (anything but an earlier export) is put back untouched and refused.
    """
    if path.is_symlink():
        raise HeadroomError(f"{path} became a symbolic link while the export was built; nothing was written")
    if not path.exists() or (path.is_dir() and not any(path.iterdir())):
        os.replace(built, path)
        return
    if not force:
        raise HeadroomError(f"{path} appeared while the export was built; pick another folder, or ask to replace it")
    old = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.old")
    os.rename(path, old)
    if problem := export_problem(old):
        os.rename(old, path)
        raise _refuse_to_replace(path, problem)
    try:
        os.rename(built, path)
    except OSError:
        os.rename(old, path)
        raise
    shutil.rmtree(old, ignore_errors=True)


# --- the model card -----------------------------------------------------------------------------------


def _ppl_line(label: str, p: PerplexityResult | None) -> str:
    if p is None:
        return f"| {label} | not measured | | | |"
    return f"| {label} | {p.perplexity:.4f} | {p.mean_nll:.6f} | {p.predicted_tokens:,} | {json.dumps(p.mask)} |"


def model_card(lm: LoadedModel, mask: Mask, result: ExportResult, layers: list[LayerStructure]) -> str:
    """The export's README.md: source, mask, budget on all three axes, perplexity, check and command."""
    b = result.budget
    p = result.perplexity_after or result.perplexity_before
    compact = result.kind == "compact"
    load = "trust_remote_code=True" if compact else ""
    lines = [
        "---",
        "library_name: transformers",
        "tags: [headroom, pruned, attention-head-pruning]",
        "---",
        f"# {lm.name}, attention pruned with Headroom ({result.kind} export)",
        "",
        f"- Source model: `{lm.name}` ({lm.arch.family}, {lm.shape.num_layers} layers x {lm.shape.num_heads} query "
        f"heads, {lm.shape.num_kv_heads} KV heads), source `{lm.source}`, fingerprint `{lm.fingerprint}`",
        f"- Mask: `{MASK_FILE}` (Headroom mask v1): {json.dumps(mask.summary())}",
        f"- Weights: {result.dtype}, the dtype the source was loaded in when this export was made",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder"{", " + load if load else ""})',
        'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")',
        "```",
        "",
    ]
    if compact:
        lines += [
            "The pruned weights are physically removed, so layers may have different head counts; the modeling "
            "code that reads them (`modeling_headroom.py`, `configuration_headroom.py`) is in this folder and "
            "imports only torch and transformers. Drop-QK layers compute `o_proj(v_proj(x))` per token and "
            "keep no KV cache; layers with alpha = 0 have no attention. Alpha is folded into the weights.",
        ]
    else:
        lines += [
            "Stock export: the source architecture, loadable without remote code. Pruned heads are zeroed "
            "(q_proj rows, o_proj columns, k/v rows of KV groups with no kept head) and alpha is folded into "
            "the weights. It is exactly as large and as fast as the source: the zeros are still stored and "
            "multiplied. Use a compact export for a smaller, faster model.",
        ]
    lines += [
        "",
        f"## Budget (attention FLOPs at sequence length {b.seqlen})",
        "",
        "| axis | source | export | saved |",
        "|---|---:|---:|---:|",
        f"| parameters | {result.params_before:,} | {result.params_after:,} | {b.params_removed:,} "
        f"({b.params_removed_pct:.2f}%) |",
        f"| KV cache bytes per token | {b.kv_bytes_per_token_unpruned:,} | {b.kv_bytes_per_token:,} | "
        f"{b.kv_bytes_per_token_saved:,} |",
        f"| attention FLOPs per token | {b.attention_flops_per_token_unpruned:,} | {b.attention_flops_per_token:,} "
        f"| {b.attention_flops_per_token_saved:,} |",
        "",
    ]
    if not compact:
        lines += ["A stock export keeps every parameter and KV head; the savings above are a compact export's.", ""]
    lines += ["## Perplexity", ""]
    if p is not None:
        lines += [
            f"Protocol perplexity (Headroom): text `{p.text}` (sha256 `{p.text_sha256}`), windows of {p.seqlen} "
            f"tokens, {p.predicted_tokens:,} predicted tokens.",
            "",
            "| model | perplexity | mean NLL | predicted tokens | mask |",
            "|---|---:|---:|---:|---|",
            _ppl_line("source, unpruned", result.perplexity_before),
            _ppl_line("masked (= this export)", result.perplexity_after),
        ]
    else:
        lines.append("Not measured.")
    lines += [
        "",
        f"Checked before writing: the largest absolute logit difference between this export and the masked "
        f"source model on {CHECK_TOKENS} tokens was {result.max_abs_logit_difference:.2e} (logits in float32, "
        f"weights in {result.dtype} in both).",
        "",
        "## Layers",
        "",
        "| layer | attention | kept query heads | kept KV heads | alpha |",
        "|---:|---|---|---|---:|",
    ]
    for i, layer in enumerate(layers):
        kind = layer.kind if compact else ("none" if layer.kind == NONE else "attention (zeroed heads)")
        lines.append(f"| {i} | {kind} | {list(layer.query_heads)} | {list(layer.kv_heads)} | {mask.alpha[i]:g} |")
    lines += ["", "## Command", "", "```sh", result.command, "```", ""]
    return "\n".join(lines)


# --- the export ---------------------------------------------------------------------------------------


def export_command(
    model: str,
    mask_file: str,
    out: str,
    kind: str,
    text: str,
    seqlen: int,
    max_tokens: int | None,
    encoding: str = "utf-8",
    force: bool = False,
    dtype: str | None = None,
) -> str:
    """The ``python -m analysis export`` command line that makes this export (for the model card)."""
    words = ["python", "-m", "analysis", "export", "--model", model, "--mask", mask_file, "--out", out]
    words += ["--kind", kind, "--text", text, "--seqlen", str(seqlen)]
    words += ["--max-tokens", str(max_tokens)] if max_tokens else []
    words += ["--encoding", encoding] if encoding != "utf-8" else []
    words += ["--dtype", dtype] if dtype else []
    words += ["--force"] if force else []
    return shlex.join(words)


def export_model(
    lm: LoadedModel,
    mask: Mask,
    out: str | Path,
    kind: str = "compact",
    *,
    force: bool = False,
    windows: Windows | None = None,
    cache: DiskCache | None = None,
    command: str = "",
    progress: Progress | None = None,
) -> ExportResult:
    """Write ``lm`` under ``mask`` to the folder ``out`` as a ``kind`` export; see the module docstring.

    With ``windows``, the unpruned and the masked perplexity (cached on disk) go into the model card,
    and the first ``CHECK_TOKENS`` tokens are the check input; without, a fixed token sequence is.
    """
    if kind not in KINDS:
        raise HeadroomError(f"unknown export kind '{kind}'; use one of {', '.join(KINDS)}")
    path = check_destination(out, force)
    if kind == "stock":
        _check_stock(mask, lm.shape)
    arch = lm.arch
    n = len(batches(windows)) if windows is not None else 0
    total = 2 * n + 3

    def at(offset: int) -> Progress:
        return lambda done, _total: progress(offset + done, total) if progress else None

    before = after = None
    if windows is not None:
        before = cached_perplexity(arch, lm.fingerprint, windows, None, cache, at(0))
        after = cached_perplexity(arch, lm.fingerprint, windows, mask, cache, at(n))
    exported = _compact_model(arch, mask) if kind == "compact" else _stock_model(arch, mask)
    at(2 * n)(1, total)
    if windows is not None:
        check = windows.input_ids[:1, :CHECK_TOKENS]
    else:
        check = (torch.arange(CHECK_TOKENS) % arch.config.vocab_size).unsqueeze(0)
    difference, largest = _logit_difference(arch, mask, exported, check)
    if not difference <= max_logit_difference(arch.model.dtype, largest):
        raise RuntimeError(f"the {kind} export differs from the masked model by {difference:.2e}; nothing was written")
    at(2 * n)(2, total)
    layers = layer_structure(mask, arch)
    result = ExportResult(
        path=str(path),
        kind=kind,
        dtype=lm.dtype,
        params_before=arch.shape.total_params,
        params_after=count_parameters(exported),
        budget=budget(mask, arch.shape, windows.seqlen if windows is not None else 256),
        perplexity_before=before,
        perplexity_after=after,
        max_abs_logit_difference=difference,
        command=command,
    )

    def fill(tmp: Path) -> None:
        exported.save_pretrained(tmp)
        lm.tokenizer.save_pretrained(tmp)
        mask.save(tmp / MASK_FILE)
        atomic_write_text(tmp / CARD_FILE, model_card(lm, mask, result, layers))

    staging = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.export")
    try:
        atomic_directory(staging, fill)
        _move_into_place(staging, path, force)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    at(2 * n)(3, total)
    return result
