"""Original vs compact exports at long context: prefill latency, decode speed with a full KV cache, sizes.

The masks: HARP N = 8 on the default model (drop-QK on the top 8 layers, the README's searched
alphas) and, with ``--mask FILE``, any other mask (the search's best mask at the same KV saving, for
one). Every model is loaded from disk the way a user would load it (the original from its converted
checkpoint, each export with ``trust_remote_code=True``), in float32, with the same torch threads.

One measurement at context N: a forward pass over the first N tokens of ``default-eval`` that fills
a KV cache and computes the logits of the last position only (as ``generate`` does) is the prefill
time; then ``--decode-tokens`` greedy tokens, one at a time on that cache, give the decode speed with
N tokens already in the cache. Each figure is the median of ``--repeats`` measurements after one
untimed warm-up pass per model, the models alternating within every repeat so that a change of
machine load hits them alike. Beside every row: the 1-minute load average, lowest and highest over
that row's measurements. Quote only rows measured on an idle machine (load well under 1 on 2 cores).

    .venv/bin/python -m bench.export_speed [--mask best.json] [--repeats 3]
    .venv/bin/python -m bench.export_speed --quick   # a smoke run, minutes
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from analysis.architecture import count_parameters
from analysis.corpus import default_text
from analysis.export import export_model
from analysis.loading import load_model, resolve
from analysis.masks import Mask
from bench.common import file_mask, harp_mask

CONTEXTS = (2048, 4096, 8192)
QUICK_CONTEXTS = (256, 512)


def cache_bytes(cache) -> int:
    """Bytes of the keys and values a cache holds (layers without attention hold none)."""
    tensors = [t for layer in cache.layers for t in (layer.keys, layer.values) if t is not None]
    return sum(t.numel() * t.element_size() for t in tensors)


@torch.inference_mode()
def measure(model: torch.nn.Module, ids: torch.Tensor, decode_tokens: int) -> tuple[float, float, int]:
    """(prefill seconds, decode tokens per second, KV cache bytes after the prefill) at context ``ids``."""
    start = time.perf_counter()
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    prefill = time.perf_counter() - start
    kv = cache_bytes(out.past_key_values)
    start = time.perf_counter()
    for _ in range(decode_tokens):
        token = out.logits[:, -1:].argmax(-1)
        out = model(input_ids=token, past_key_values=out.past_key_values, use_cache=True, logits_to_keep=1)
    return prefill, decode_tokens / (time.perf_counter() - start), kv


def load_models(lm, masks: dict[str, Mask], folder: Path) -> dict[str, torch.nn.Module]:
    models = {"original": AutoModelForCausalLM.from_pretrained(resolve("default")[0], dtype=torch.float32)}
    for name, mask in masks.items():
        export_model(lm, mask, folder / name)
        models[name] = AutoModelForCausalLM.from_pretrained(folder / name, trust_remote_code=True, dtype=torch.float32)
    return {name: model.eval() for name, model in models.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mask", default=None, help="a mask JSON file compared beside HARP N = 8")
    parser.add_argument("--repeats", type=int, default=3, help="measurements per model and context (median)")
    parser.add_argument("--decode-tokens", type=int, default=16, help="greedy tokens timed after each prefill")
    parser.add_argument("--quick", action="store_true", help="smoke run: contexts 256 and 512, 1 repeat, 4 tokens")
    args = parser.parse_args()
    contexts = QUICK_CONTEXTS if args.quick else CONTEXTS
    repeats, decode_tokens = (1, 4) if args.quick else (args.repeats, args.decode_tokens)

    lm = load_model("default")
    masks = {"harp8": harp_mask(lm, 8)}
    if args.mask:
        masks["mask"] = file_mask(lm, args.mask)
    with tempfile.TemporaryDirectory() as tmp:
        models = load_models(lm, masks, Path(tmp))
    text = default_text("default-eval").text + default_text("default-calib").text
    ids = torch.tensor([lm.tokenizer(text, add_special_tokens=False).input_ids[: max(contexts)]])
    for model in models.values():
        measure(model, ids[:, : contexts[0]], 1)  # warm-up, not timed

    print(f"{lm.name}, float32, {torch.get_num_threads()} torch threads, median of {repeats} runs, models alternating")
    for name, mask in masks.items():
        print(f"{name}: {mask.describe()}")
    print("ratios are export / original: below 1 for prefill seconds, above 1 for decode tokens/s, mean faster")
    figures: dict[tuple[str, int], list[tuple[float, float, int]]] = {}
    loads: dict[int, list[float]] = {n: [] for n in contexts}
    for _ in range(repeats):
        for n in contexts:
            for name, model in models.items():
                figures.setdefault((name, n), []).append(measure(model, ids[:, :n], decode_tokens))
                loads[n].append(os.getloadavg()[0])

    def median(name: str, n: int, field: int) -> float:
        return statistics.median(f[field] for f in figures[name, n])

    names = list(models)
    header = "".join(f"{n:>14}" for n in names) + "".join(f"{n + '/orig':>14}" for n in names[1:])
    print(f"{'':34}{header}   load (1 min)")
    rows = [("parameters", {n: float(count_parameters(m)) for n, m in models.items()}, "{:,.0f}", None)]
    for n in contexts:
        rows.append((f"prefill {n} tokens (s)", {m: median(m, n, 0) for m in names}, "{:.3f}", n))
        rows.append((f"decode tokens/s with {n} cached", {m: median(m, n, 1) for m in names}, "{:.2f}", n))
        rows.append((f"KV cache bytes at {n} tokens", {m: median(m, n, 2) for m in names}, "{:,.0f}", None))
    for label, values, fmt, n in rows:
        cells = "".join(f"{fmt.format(values[m]):>14}" for m in names)
        ratios = "".join(f"{values[m] / values['original']:>14.3f}" for m in names[1:])
        load = f"   {min(loads[n]):.2f}-{max(loads[n]):.2f}" if n else ""
        print(f"{label:34}{cells}{ratios}{load}")


if __name__ == "__main__":
    main()
