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
# A Triton server for machines without NVIDIA's container: the tritonserver binary, its python
# backend and their libraries ship in the nvidia-pytriton wheel. Only those are taken out of it,
# into .venv/triton (the wheel's Python package and its dependencies are not needed). Its python
# backend stub is built against numpy 1.x: that numpy goes into a folder of its own, put first on
# the stub's path by Modelium (modelium/runtimes/triton.py).
if [ ! -x .venv/triton/pytriton/tritonserver/bin/tritonserver ]; then
  wheels=$(mktemp -d)
  .venv/bin/python -m pip download --quiet --no-deps --dest "$wheels" "nvidia-pytriton==0.7.0"
  .venv/bin/python - "$wheels" .venv/triton <<'PY'
import pathlib, stat, sys, zipfile
wheel = next(pathlib.Path(sys.argv[1]).glob("nvidia_pytriton-*.whl"))
target = pathlib.Path(sys.argv[2])
with zipfile.ZipFile(wheel) as zf:
    for name in zf.namelist():
        if name.startswith(("pytriton/tritonserver/", "nvidia_pytriton.libs/")) and not name.endswith("/"):
            path = pathlib.Path(zf.extract(name, target))
            if "/bin/" in name or name.endswith("_stub") or ".so" in name:
                path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
PY
  rm -rf "$wheels"
fi
if [ ! -d .venv/triton-python/numpy ]; then
  .venv/bin/python -m pip install --quiet --target .venv/triton-python "numpy>=1.26,<2"
fi
echo "Modelium is installed in .venv ($(.venv/bin/modelium --help >/dev/null && echo ok))"
