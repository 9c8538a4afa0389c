#!/usr/bin/env bash
# Run ON the GPU machine (repository root, through the device tool) after ort-gpu-carry put
# onnxruntime-gpu in /tmp/site and prepare.sh's .gpusite/ was carried. Installs the four
# distributions editable (no index), records the machine, then runs what is asked and leaves
# everything under $OUT for the session to commit:
#   bash benchmarks/gpu/run.sh tests   # pytest -m gpu (a few minutes)
#   bash benchmarks/gpu/run.sh bench   # the GPU plan of benchmarks/rollout_speed.py (~5 minutes)
#   bash benchmarks/gpu/run.sh all     # both: may pass one call's 10-minute limit; prefer two calls
set -uo pipefail
: "${OUT:?run through the device tool, which sets OUT}"
what=${1:-all}
export PYTHONPATH=/tmp/site:$PWD/.gpusite
python3 -m pip install -q --no-deps --no-index --no-build-isolation \
  -e . -e plugins/dreamerv3 -e plugins/tdmpc2 -e exporters/onnx > "$OUT/install.txt" 2>&1 \
  || { cat "$OUT/install.txt"; exit 1; }
python3 - > "$OUT/machine.txt" 2>&1 <<'PY'
import torch  # before onnxruntime, so the CUDA libraries it brings are loaded
import onnxruntime as ort
import onnxscript, pluggy, safetensors, rich
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))
print("onnxruntime", ort.__version__, ort.get_available_providers())
for mod in (onnxscript, pluggy, safetensors, rich):
    print(mod.__name__, getattr(mod, "__version__", "?"), mod.__file__)
PY
cat "$OUT/machine.txt"
status=0
if [[ $what == all || $what == tests ]]; then
  python3 -m pytest -m gpu -p no:cacheprovider -q -rs \
    tests/test_onnx_runtime.py tests/test_onnx_rollout_graph.py tests/test_registry_resolve.py \
    > "$OUT/pytest-gpu.txt" 2>&1
  code=$?; status=$((status || code))
  echo "pytest -m gpu exit $code"; tail -15 "$OUT/pytest-gpu.txt"
fi
if [[ $what == all || $what == bench ]]; then
  python3 benchmarks/rollout_speed.py --device gpu --max-seconds 2 \
    --out "$OUT/rollout_speed_gpu.json" > "$OUT/bench.txt" 2>&1
  code=$?; status=$((status || code))
  echo "benchmark exit $code"; tail -40 "$OUT/bench.txt"
fi
exit $status
