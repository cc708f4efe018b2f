"""bfloat16 against float32: load time, memory, perplexity and live-toggle time, each dtype in its own process.

Default: the embedded default model (SmolLM2-135M-Instruct) in float32 and bfloat16 on the default
eval slice (``--tokens`` of ``default-eval`` at seqlen 256). Per dtype: the load from the converted
cache, RSS after the load, the protocol perplexity and its time, the incremental evaluator's median
time for one head toggled at 3/4 depth and in the top layer (``--live-tokens``, the editor's default
1,024; each toggle a different head), and the peak RSS. The relative perplexity difference to
float32 is printed last. Every figure has the load average of the moment beside it.

RSS counts the clean file pages of a memory-mapped checkpoint (which the kernel can drop), so the
peaks of anonymous memory (``RssAnon``) and of file pages (``RssFile``) are printed too. Memory
figures are GiB (2**30 bytes).

``--standin-1b DIR``: the 1B-class target (load <= 30 s from the converted cache, RSS <= 6 GB in
bfloat16, perplexity within 1 % of float32) on a stand-in: a random-weight model shaped like
Llama-3.2-1B (16 layers, hidden 2,048, 32 query / 8 KV heads, MLP 8,192, vocabulary 128,256, tied
embeddings; 1.24 B parameters) saved in ``DIR`` as a float32 safetensors checkpoint, as a converted
GGUF is, with the default model's tokenizer. It is built once (about 5 GB); later runs reuse it. Its
random weights give an almost uniform next-token distribution, so its perplexity comparison says
little: the default model's is the meaningful one.

    .venv/bin/python -m bench.dtype
    .venv/bin/python -m bench.dtype --standin-1b /tmp/llama-1b-standin --tokens 512
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

DTYPES = ("float32", "bfloat16")
LLAMA_1B = {
    "vocab_size": 128256,
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "max_position_embeddings": 131072,
    "rope_theta": 500000.0,
    "tie_word_embeddings": True,
}


def load() -> str:
    return "load " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def status_gb(*fields: str) -> dict[str, float]:
    """Fields of /proc/self/status (``VmRSS``, ``RssAnon``, ``RssFile``) now, in GiB."""
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in fields:
            values[name] = int(value.split()[0]) / 2**20
    return values


def rss_gb() -> float:
    """Resident set size now (not the peak), from /proc."""
    return status_gb("VmRSS").get("VmRSS", float("nan"))


class PeakMemory:
    """Peaks of anonymous and file-backed resident memory, sampled every 20 ms in a daemon thread."""

    def __init__(self) -> None:
        self.peak = {"RssAnon": 0.0, "RssFile": 0.0}
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while True:
            for name, value in status_gb(*self.peak).items():
                self.peak[name] = max(self.peak[name], value)
            time.sleep(0.02)


def measure(spec: str, dtype: str, tokens: int, live_tokens: int, toggles: int, device: str) -> dict[str, Any]:
    """One dtype, in this process: every figure with the load average when it was taken."""
    from analysis.corpus import default_text, make_windows
    from analysis.evaluation import IncrementalEvaluator, perplexity
    from analysis.loading import load_model
    from analysis.masks import Mask

    out: dict[str, Any] = {"dtype": dtype}
    memory = PeakMemory()
    start = time.perf_counter()
    lm = load_model(spec, device=device, dtype=dtype)
    out["load_s"] = (time.perf_counter() - start, load())
    out["rss_after_load_gb"] = (rss_gb(), load())
    text = default_text("default-eval")
    windows = make_windows(lm.tokenizer, text, 256, tokens, lm.max_positions)
    start = time.perf_counter()
    out["perplexity"] = (perplexity(lm.arch, windows).perplexity, load())
    out["perplexity_s"] = (time.perf_counter() - start, load())
    live = make_windows(lm.tokenizer, text, 256, live_tokens, lm.max_positions)
    evaluator = IncrementalEvaluator(lm.arch, live)
    base = Mask.unpruned(lm.shape, lm.name)
    evaluator.perplexity(base)
    layers = lm.shape.num_layers
    for layer in (3 * layers // 4, layers - 1):
        times = []
        for r in range(toggles):
            t = time.perf_counter()
            evaluator.perplexity(base.with_head(layer, r % lm.shape.num_heads, False))
            times.append(time.perf_counter() - t)
        out[f"toggle_layer_{layer}_s"] = (statistics.median(times), load())
    out["peak_rss_gb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, load())
    out["peak_anon_gb"] = (memory.peak["RssAnon"], load())
    out["peak_file_gb"] = (memory.peak["RssFile"], load())
    if device == "cuda":
        import torch

        out["peak_gpu_memory_gb"] = (torch.cuda.max_memory_allocated() / 2**30, load())
    out["model"] = f"{lm.name}, {layers} layers, {lm.shape.total_params:,} parameters"
    return out


def build_standin(directory: Path) -> None:
    """The random-weight Llama-3.2-1B-shaped checkpoint, float32 safetensors, default model's tokenizer."""
    if (directory / "config.json").is_file():
        return
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from analysis.loading import resolve

    print(f"building the 1B stand-in in {directory} (once; about 5 GB) ({load()})", flush=True)
    default_dir, _ = resolve("default")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**LLAMA_1B, bos_token_id=1, eos_token_id=2)).to(torch.float32)
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(str(default_dir)).save_pretrained(directory)


def row(name: str, results: dict[str, dict[str, Any]], fmt: str) -> None:
    cells = []
    for dtype in DTYPES:
        value, avg = results[dtype][name]
        cells.append(f"{format(value, fmt):>12} ({avg})")
    print(f"{name:<22} " + "  ".join(cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--standin-1b", type=Path, default=None, metavar="DIR", help="measure the 1B-class stand-in")
    parser.add_argument("--tokens", type=int, default=2048, help="perplexity tokens of default-eval")
    parser.add_argument("--live-tokens", type=int, default=1024, help="tokens of the incremental evaluator")
    parser.add_argument("--toggles", type=int, default=3, help="toggles per layer (median)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--child", choices=DTYPES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.model, args.child, args.tokens, args.live_tokens, args.toggles, args.device)))
        return

    spec = args.model
    if args.standin_1b:
        build_standin(args.standin_1b)
        spec = str(args.standin_1b)
    from analysis.loading import model_fingerprint

    start = time.perf_counter()
    model_fingerprint(spec)  # converts a GGUF or hashes a checkpoint once; the timed loads read the cache and memo
    print(f"fingerprint (first time: hash, later: memo): {time.perf_counter() - start:.1f} s ({load()})", flush=True)
    results = {}
    for dtype in DTYPES:  # one process each, so that RSS is the dtype's own
        argv = [sys.executable, "-m", "bench.dtype", "--model", spec, "--child", dtype, "--device", args.device]
        argv += ["--tokens", str(args.tokens), "--live-tokens", str(args.live_tokens), "--toggles", str(args.toggles)]

        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        if done.returncode:
            sys.exit(f"{dtype} run failed:\n{done.stderr}")
        results[dtype] = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"{results['float32']['model']}, on {args.device}")
    print(f"perplexity on {args.tokens} tokens of default-eval at seqlen 256; toggles on {args.live_tokens} tokens")
    print(f"{'':<22} " + "  ".join(f"{d:>12} {'':>{len(load()) + 2}}" for d in DTYPES))
    toggle_rows = sorted(k for k in results["float32"] if k.startswith("toggle_"))
    for name, fmt in [
        ("load_s", ".2f"),
        ("rss_after_load_gb", ".2f"),
        ("perplexity", ".4f"),
        ("perplexity_s", ".2f"),
        *[(k, ".3f") for k in toggle_rows],
        ("peak_rss_gb", ".2f"),
        ("peak_anon_gb", ".2f"),
        ("peak_file_gb", ".2f"),
        *([("peak_gpu_memory_gb", ".2f")] if args.device == "cuda" else []),
    ]:
        row(name, results, fmt)
    f32, bf16 = results["float32"]["perplexity"][0], results["bfloat16"]["perplexity"][0]
    print(f"bfloat16 perplexity vs float32: {100 * (bf16 - f32) / f32:+.3f} % ({load()})")


if __name__ == "__main__":
    main()
