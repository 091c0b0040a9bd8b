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
# A Triton server for machines without NVIDIA's container: the tritonserver binary and its python
# backend ship in the nvidia-pytriton wheel (only the binary is used, so not its Python deps). Its
# python backend stub is built against numpy 1.x: that numpy goes into a folder of its own, put
# first on the stub's path by Modelium (modelium/runtimes/triton.py).
if ! .venv/bin/python -c "import importlib.util as u; assert u.find_spec('pytriton')" 2>/dev/null; then
  .venv/bin/python -m pip install --quiet --no-deps "nvidia-pytriton==0.7.0"
fi
if [ ! -d .venv/triton-python/numpy ]; then
  .venv/bin/python -m pip install --quiet --target .venv/triton-python "numpy>=1.26,<2"
fi
echo "Modelium is installed in .venv ($(.venv/bin/modelium --help >/dev/null && echo ok))"
