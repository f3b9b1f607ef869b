#!/usr/bin/env bash
# The main job on the embedded default: set up, convert SmolLM2-135M-Instruct to a validated int8
# model folder, then answer a spoken question (the voice assistant on a bundled recording).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
MODEL=models/smollm2-135m-instruct
if [ ! -f "$MODEL/edgellm.json" ]; then
  .venv/bin/edgellm convert smollm2-135m-instruct -o "$MODEL"
fi
.venv/bin/edgellm info "$MODEL"
if [ -f demos/voice_assistant/__main__.py ]; then
  .venv/bin/python -m demos.voice_assistant --model "$MODEL" --wav demos/voice_assistant/samples/what_is_the_capital_of_france.wav
else
  .venv/bin/edgellm generate -m "$MODEL" "What is 2 plus 2?"
fi
