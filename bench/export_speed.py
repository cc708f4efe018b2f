"""Original vs compact export, side by side in one run: prefill latency, decode speed, KV cache, parameters.

The mask is HARP with N = 8 on the default model (drop-QK on the top 8 layers, the alphas of the
README's HARP table). Both models are loaded from disk the way a user would load them (the original
from its converted checkpoint, the export with ``trust_remote_code=True``), in float32, with the same
torch threads. Prefill is one forward pass over the first N tokens of ``default-eval`` that fills a
KV cache and computes the logits of the last position only (as ``generate`` does); the timings are
medians of ``--repeats`` runs after one untimed warm-up pass, the two models alternating. Decode is
greedy, one token at a time with the cache, after a 256-token prefill. KV-cache bytes are measured
on the cache object after the 2,048-token prefill.

    .venv/bin/python -m bench.export_speed [--repeats 3] [--decode-tokens 64]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from analysis.architecture import count_parameters
from analysis.corpus import default_text
from analysis.export import export_model
from analysis.harp import top_layers
from analysis.loading import load_model, resolve
from analysis.masks import Mask

HARP8_ALPHAS = (0.4, 0.1, 0.7, 0.7, 0.4, 0.3, 0.1, 0.0)  # low -> high layer, README's HARP table
LENGTHS = (256, 1024, 2048)


def cache_bytes(cache) -> int:
    """Bytes of the keys and values a cache holds (layers without attention hold none)."""
    tensors = [t for layer in cache.layers for t in (layer.keys, layer.values) if t is not None]
    return sum(t.numel() * t.element_size() for t in tensors)


@torch.inference_mode()
def prefill_seconds(model: torch.nn.Module, ids: torch.Tensor) -> tuple[float, int]:
    start = time.perf_counter()
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    return time.perf_counter() - start, cache_bytes(out.past_key_values)


@torch.inference_mode()
def decode_tokens_per_second(model: torch.nn.Module, prompt: torch.Tensor, tokens: int) -> float:
    out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
    start = time.perf_counter()
    for _ in range(tokens):
        token = out.logits[:, -1:].argmax(-1)
        out = model(input_ids=token, past_key_values=out.past_key_values, use_cache=True, logits_to_keep=1)
    return tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--decode-tokens", type=int, default=64)
    args = parser.parse_args()

    lm = load_model("default")
    layers = top_layers(lm.shape.num_layers, len(HARP8_ALPHAS))
    mask = Mask.unpruned(lm.shape, lm.name, lm.fingerprint).with_drop_qk(layers)
    for layer, alpha in zip(layers, HARP8_ALPHAS, strict=True):
        mask = mask.with_layer(layer, alpha=alpha)
    with tempfile.TemporaryDirectory() as tmp:
        export_model(lm, mask, Path(tmp) / "harp8")
        models = {
            "original": AutoModelForCausalLM.from_pretrained(resolve("default")[0], dtype=torch.float32),
            "compact": AutoModelForCausalLM.from_pretrained(
                Path(tmp) / "harp8", trust_remote_code=True, dtype=torch.float32
            ),
        }
    ids = torch.tensor([lm.tokenizer(default_text("default-eval").text, add_special_tokens=False).input_ids])
    for model in models.values():
        model.eval()
        prefill_seconds(model, ids[:, : LENGTHS[0]])  # warm-up, not timed
    print(f"{lm.name}: compact export of HARP N = 8, drop-QK on layers {layers[0]}-{layers[-1]}, alphas {HARP8_ALPHAS}")
    print(f"float32, {torch.get_num_threads()} torch threads, median of {args.repeats} runs, models alternating")
    rows: list[tuple[str, float, float, str]] = []
    params = {name: count_parameters(m) for name, m in models.items()}
    rows.append(("parameters", params["original"], params["compact"], "{:,.0f}"))
    kv: dict[str, int] = {}
    for length in LENGTHS:
        times: dict[str, list[float]] = {name: [] for name in models}
        for _ in range(args.repeats):
            for name, model in models.items():
                seconds, kv[name] = prefill_seconds(model, ids[:, :length])
                times[name].append(seconds)
        rows.append((f"prefill {length} tokens (s)", *(statistics.median(times[n]) for n in models), "{:.3f}"))
    rows.append((f"KV cache bytes after {LENGTHS[-1]} tokens", kv["original"], kv["compact"], "{:,.0f}"))
    speed = {name: decode_tokens_per_second(model, ids[:, :256], args.decode_tokens) for name, model in models.items()}
    rows.append((f"decode tokens/s ({args.decode_tokens} after 256)", speed["original"], speed["compact"], "{:.1f}"))

    print(f"{'':36} {'original':>14} {'compact':>14} {'compact/original':>17}")
    for label, a, b, fmt in rows:
        print(f"{label:36} {fmt.format(a):>14} {fmt.format(b):>14} {b / a:>17.3f}")


if __name__ == "__main__":
    main()
