"""GPU timings on a random-weight model shaped like Llama-3.1-8B, in bfloat16 (run by ``bench/gpu_check.sh``).

The model (32 layers, hidden 4,096, 32 query / 8 KV heads, MLP 14,336, vocabulary 128,256; 8.0 B
parameters) is built with random weights directly on the GPU; the default model's tokenizer turns
``default-eval`` (or ``--text``) into its windows. Random weights make the perplexities meaningless; the timings are
what a real checkpoint of this shape costs. Printed, each with the load average beside it:

- live toggle: the incremental evaluator on ``--tokens`` tokens at seqlen 256, median of 3 toggles of
  one head at 3/4 depth (layer 24) and in the top layer, against one full recompute;
- HARP: the whole ``harp()`` on the top ``--harp-layers`` layers, grid 0, 0.25, ..., 1;
- export: the compact export of that HARP mask written to ``--out`` and loaded back on the GPU;
  prefill (one forward pass filling the KV cache, last position's logits) at 8k and 32k random
  tokens and greedy decode of 32 tokens after each, original against compact.

    .venv/bin/python -m bench.gpu_timings [--tokens 2048] [--harp-layers 8] [--out /tmp/headroom-8b-export]
        [--tokenizer DIR --text FILE]   # where the default model's package or gensim is missing (a GPU machine)

``--smoke`` runs the same steps on the CPU with an 8-layer model of the same family and short
contexts, to check the script without a GPU.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from analysis.architecture import Architecture
from analysis.corpus import load_text, make_windows
from analysis.evaluation import IncrementalEvaluator, perplexity
from analysis.export import export_model
from analysis.harp import harp, top_layers
from analysis.loading import LoadedModel, resolve
from analysis.masks import Mask
from bench.export_speed import cache_bytes

LLAMA_31_8B = {
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "max_position_embeddings": 131072,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
SMOKE = {**LLAMA_31_8B, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 8, "head_dim": 16}
SMOKE |= {"num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 49152}
CONTEXTS = (8192, 32768)
DECODE_TOKENS = 32


def load() -> str:
    return "load " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def synced(fn):
    """``fn()`` and its wall time, with the GPU's queued work (if any) finished before and after."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else lambda: None
    sync()
    start = time.perf_counter()
    result = fn()
    sync()
    return result, time.perf_counter() - start


def report(label: str, value: str) -> None:
    print(f"{label:<44} {value:>16}   ({load()})", flush=True)


def toggle_seconds(evaluator: IncrementalEvaluator, base: Mask, layer: int) -> float:
    """Median time of three toggles in ``layer``, each of another head (no answer from the evaluator's memory)."""
    times = []
    for head in range(3):
        mask = base.with_head(layer, head, False)
        times.append(synced(lambda m=mask: evaluator.perplexity(m))[1])
    return statistics.median(times)


def gpu_memory() -> None:
    if torch.cuda.is_available():
        report("peak GPU memory so far (GB)", f"{torch.cuda.max_memory_allocated() / 2**30:.1f}")


@torch.inference_mode()
def prefill_and_decode(model: torch.nn.Module, ids: torch.Tensor) -> tuple[float, float, int]:
    out, prefill_s = synced(lambda: model(input_ids=ids, use_cache=True, logits_to_keep=1))
    kv = cache_bytes(out.past_key_values)

    def decode():
        state = out
        for _ in range(DECODE_TOKENS):
            token = state.logits[:, -1:].argmax(-1)
            state = model(input_ids=token, past_key_values=state.past_key_values, use_cache=True, logits_to_keep=1)

    _, decode_s = synced(decode)
    return prefill_s, DECODE_TOKENS / decode_s, kv


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--harp-layers", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("/tmp/headroom-8b-export"))
    parser.add_argument("--smoke", action="store_true", help="a tiny model on the CPU: checks the script")
    parser.add_argument("--tokenizer", default=None, help="a tokenizer folder (default: the default model's)")
    parser.add_argument("--text", default="default-eval", help="the text of the windows (default: default-eval)")
    args = parser.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("bench.gpu_timings needs a CUDA GPU (or --smoke)")
    device, shape = ("cpu", SMOKE) if args.smoke else ("cuda", LLAMA_31_8B)
    contexts = (256, 512) if args.smoke else CONTEXTS

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or str(resolve("default")[0]))
    torch.manual_seed(0)
    with torch.device(device):
        model, build_s = synced(
            lambda: AutoModelForCausalLM.from_config(LlamaConfig(**shape), dtype=torch.bfloat16).eval()
        )
    model.requires_grad_(False)
    lm = LoadedModel(
        model, tokenizer, Architecture(model), "random Llama-3.1-8B shape", "random-llama-3.1-8b", "random"
    )
    where = torch.cuda.get_device_name() if device == "cuda" else "CPU (smoke)"
    print(f"{where}: {lm.name}, {lm.shape.total_params:,} parameters, bfloat16")
    report("build on the device (s)", f"{build_s:.1f}")
    windows = make_windows(tokenizer, load_text(args.text), 256, args.tokens)

    evaluator, capture_s = synced(lambda: IncrementalEvaluator(lm.arch, windows))
    report(f"incremental evaluator capture, {windows.predicted_tokens} tokens (s)", f"{capture_s:.3f}")
    base = Mask.unpruned(lm.shape, lm.name)
    evaluator.perplexity(base)
    top = lm.shape.num_layers - 1
    for layer in (3 * lm.shape.num_layers // 4, top):
        report(f"toggle one head in layer {layer}, median of 3 (s)", f"{toggle_seconds(evaluator, base, layer):.3f}")
    _, full_s = synced(lambda: perplexity(lm.arch, windows, base.with_head(top, 2, False)))
    report("full recompute for comparison (s)", f"{full_s:.3f}")
    gpu_memory()

    layers = top_layers(lm.shape.num_layers, args.harp_layers)
    result, harp_s = synced(lambda: harp(lm.arch, lm.name, windows, layers, [0.0, 0.25, 0.5, 0.75, 1.0]))
    report(f"HARP, top {args.harp_layers} layers, 5-point grid (s)", f"{harp_s:.1f}")
    del evaluator
    torch.cuda.empty_cache()

    shutil.rmtree(args.out, ignore_errors=True)
    _, export_s = synced(lambda: export_model(lm, result.mask, args.out))
    report("compact export written (s)", f"{export_s:.1f}")
    compact = AutoModelForCausalLM.from_pretrained(
        args.out, trust_remote_code=True, dtype=torch.bfloat16, device_map=device
    ).eval()
    models = {"original": model, "compact": compact}
    warm = torch.randint(3, shape["vocab_size"], (1, 128), device=device)
    for m in models.values():
        prefill_and_decode(m, warm)  # warm-up, not timed
    for context in contexts:
        ids = torch.randint(3, shape["vocab_size"], (1, context), device=device)
        for name, m in models.items():
            prefill_s, tokens_per_s, kv = prefill_and_decode(m, ids)
            report(f"{name}: prefill {context} tokens (s)", f"{prefill_s:.3f}")
            report(f"{name}: decode after {context} (tokens/s)", f"{tokens_per_s:.1f}")
            report(f"{name}: KV cache after {context} (GB)", f"{kv / 2**30:.2f}")
    gpu_memory()
    shutil.rmtree(args.out, ignore_errors=True)


if __name__ == "__main__":
    main()
