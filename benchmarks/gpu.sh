#!/usr/bin/env bash
# GPU check (<= 8 min): which ONNX Runtime providers this host has, and, when CUDA is among them,
# /embed throughput of a ViT-B/16-shaped MAE (random weights) in fp32 and fp16 next to the raw session's.
#
#   bash benchmarks/gpu.sh            # results in benchmarks/results/serve-gpu.json or $MAE_GPU_RESULT (+ markdown)
#
# Needs: onnxruntime-gpu (pip install -e '.[gpu]'), wrk, and either torch (to export the random model once,
# cached in runs/bench-models) or MAE_BENCH_VITB_DIR pointing at an exported directory with fp32 + fp16.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
RESULT=${MAE_GPU_RESULT:-benchmarks/results/serve-gpu.json}
START=$(date +%s)

echo "== host"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "nvidia-smi: not found"
"$PY" - <<'EOF'
import onnxruntime as ort
print("onnxruntime", ort.__version__, "device", ort.get_device())
print("providers:", ", ".join(ort.get_available_providers()))
EOF

if ! "$PY" -c 'import onnxruntime as o, sys; sys.exit("CUDAExecutionProvider" not in o.get_available_providers())'; then
    echo "== no CUDAExecutionProvider in this onnxruntime build: nothing to measure on a GPU (install onnxruntime-gpu)"
    exit 0
fi

echo "== does a session really get CUDA? (a listed provider can still fail to load its libraries)"
"$PY" - <<'EOF'
import sys, tempfile, numpy as np, onnxruntime as ort
from pathlib import Path
sys.path.insert(0, ".")
from service.runtime import CUDA
# The smallest graph at hand: a 1-node Identity model written with the onnx helper when available.
try:
    import onnx
    from onnx import TensorProto, helper
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    g = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    path = Path(tempfile.mkdtemp()) / "identity.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    s = ort.InferenceSession(str(path), providers=[CUDA, "CPUExecutionProvider"])
    print("session providers:", s.get_providers())
except ImportError:
    print("onnx not installed: skipping the identity-session check")
EOF

if [ -n "${MAE_BENCH_VITB_DIR:-}" ]; then
    mkdir -p runs/bench-models
    ln -sfn "$(realpath "$MAE_BENCH_VITB_DIR")" runs/bench-models/mae_vit_base_patch16-fp16-fp32
fi

echo "== ViT-B/16 /embed on CUDA: fp32 and fp16, batched and naive, vs raw ORT"
timeout $((8 * 60 - ($(date +%s) - START) - 10)) "$PY" benchmarks/serve.py --models vitb --precisions fp32,fp16 \
    --device cuda --vitb-batch 32 --seconds 6 --raw-seconds 2 --raw-batches 1,8,32,64 --out "$RESULT"
echo "== done in $(( $(date +%s) - START )) s; results in $RESULT"
