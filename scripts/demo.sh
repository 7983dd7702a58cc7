#!/usr/bin/env bash
# The main job on the embedded default store, end to end, in a few minutes on 2 cores:
# build a small Llama-like base and two adapters (MoRA type 6, LoRA), push both, merge
# both with weights into safetensors and into a validated ONNX graph, show lineage,
# serve the ONNX once, verify the store, print how exact the merges are, and point at
# `adapters ui`.
#   DEMO_DIR=/some/dir ./scripts/demo.sh   keeps everything there (default: a temp dir)
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
PY=${PYTHON:-python3}
WORK=${DEMO_DIR:-$(mktemp -d -t adapters-demo.XXXXXX)}
mkdir -p "$WORK"
export ADAPTERS_HOME="$WORK/home"
export PYTHONWARNINGS=ignore
rm -rf "$WORK/merged" "$WORK/merged-onnx"
step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; "$@"; }

"$PY" scripts/make_demo_inputs.py "$WORK"
cd "$WORK"
step adapters push mora --name demo/llama-mora --base-model demo/tiny-llama --base base --tag prod \
     --meta task=memorise --message "MoRA type 6, r=8"
step adapters push lora --name demo/llama-lora --base-model demo/tiny-llama --base base --meta task=style
step adapters list
step adapters merge demo/llama-mora@prod demo/llama-lora --weight 1 --weight 0.5 \
     --base base --to safetensors -o merged
step adapters merge demo/llama-mora@prod demo/llama-lora --weight 1 --weight 0.5 \
     --base base --to onnx -o merged-onnx
step adapters lineage demo/llama-mora
step adapters run merged-onnx --ids 1,2,3,4,5
step adapters verify

# how exact: the figures the two merges printed above, as the outputs' own model cards keep them
printf '\n\033[1m%s\033[0m\n' "exactness (from merged/README.md and merged-onnx/README.md):"
sed -n '/^## Merge$/,/^## /{/^## /d;/^$/d;p}' merged/README.md
sed -n '/^## Validation$/,/^## /{/^## /d;/^$/d;p}' merged-onnx/README.md
echo
echo "demo finished; everything is in $WORK"
echo "browse the store (names, versions, artifacts, the lineage graph) in a web page:"
echo "  ADAPTERS_HOME=$ADAPTERS_HOME adapters ui --open"
echo "  then http://127.0.0.1:8321/lineage/demo/llama-mora for the lineage graph"
