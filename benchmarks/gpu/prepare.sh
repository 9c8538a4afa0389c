#!/usr/bin/env bash
# Run HERE (the CPU machine, from the repository root) before a GPU session: packs, for the GPU
# machine's Python 3.12, the pure-Python and binary wheels it may lack (it has torch, onnx and CPU
# onnxruntime, and no package index) into .gpusite/, git-ignored, well under one call's 64 MiB.
# onnxruntime-gpu itself travels separately: ../shared/tools/ort-gpu-carry.
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qx "/.gpusite/" "$exclude" 2>/dev/null || echo "/.gpusite/" >> "$exclude"
wheels=$(mktemp -d)
trap 'rm -rf "$wheels"' EXIT
# Versions follow requirements/dev-constraints.txt where it pins them.
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any \
  -c requirements/dev-constraints.txt -d "$wheels" \
  onnxscript onnx-ir ml_dtypes pluggy safetensors rich markdown-it-py mdurl pygments \
  pytest iniconfig packaging typing_extensions
rm -rf .gpusite && mkdir .gpusite
for whl in "$wheels"/*.whl; do python3 -m zipfile -e "$whl" .gpusite; done
du -sh .gpusite
cat <<'MSG'
Then, on the GPU machine, after the four ort-gpu-carry calls (same warm machine), two calls with
  carry [".gpusite"]:  bash benchmarks/gpu/run.sh tests   and then   bash benchmarks/gpu/run.sh bench
MSG
