"""The model card (README.md) an export ships, and the command line that makes the export."""

from __future__ import annotations

import json
import shlex
from typing import TYPE_CHECKING

from analysis.evaluation import PerplexityResult
from analysis.export_folder import MASK_FILE
from analysis.exported.configuration_headroom import NONE
from analysis.loading import LoadedModel
from analysis.masks import Mask
from analysis.pruned_model import CHECK_TOKENS, LayerStructure

if TYPE_CHECKING:
    from analysis.export import ExportResult


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
