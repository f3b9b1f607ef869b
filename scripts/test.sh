#!/usr/bin/env bash
# The test suite: fast unit layer on tiny random models, integration layer on the real default
# model (converted once into .cache/models/ and reused), the voice demo with real Vosk.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
