#!/usr/bin/env bash
# Creates ./.venv and installs Modelium into it (editable), with the test tools.
# On a machine without an NVIDIA GPU, PyTorch's CPU build is installed first, so that the
# `torch` requirement is already met and pip does not fetch a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    .venv/bin/python -m pip install --quiet torch
  else
    .venv/bin/python -m pip install --quiet "torch==2.13.0"
  fi
fi
.venv/bin/python -m pip install --quiet -e '.[test]'
echo "Modelium is installed in .venv ($(.venv/bin/modelium --help >/dev/null && echo ok))"
