#!/usr/bin/env bash
# One-time set-up on a fresh machine (safe to run again):
# CPU torch first, so that nothing pulls a multi-GB CUDA build on a machine without a GPU,
# then this package with its dev extra.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "$PY" -m pip install -q torch
  else
    "$PY" -m pip install -q torch==2.13.0
  fi
fi
# onnxruntime and onnxruntime-gpu overwrite each other's files: keep only the -gpu one.
if "$PY" -m pip show onnxruntime >/dev/null 2>&1; then
  "$PY" -m pip uninstall -y -q onnxruntime
fi
"$PY" -m pip install -q -e ".[dev]"
