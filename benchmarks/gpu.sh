#!/usr/bin/env bash
# The GPU check, as short prepared steps (about 8 min on a GPU host with 16 cores, plus the ViT-B export once):
#   1. providers:  ONNX Runtime's providers, whether a session really gets CUDA, torch's CUDA, each engine
#                  opened on the bundled model                                   (benchmarks/gpu_providers.py)
#   2. raw:        the encoder through each engine's own call, bundled model and a ViT-B/16 shape with random
#                  weights: ORT fp32/fp16, torch fp32/bf16 and bf16 compiled      (benchmarks/engines_raw.py)
#   3. serve:      /embed over HTTP on each engine at c = 1, 64, 256: img/s, p50/p99, mean batch, GPU
#                  utilisation (nvidia-smi dmon), server/raw                      (benchmarks/serve_engines.py)
# Results: one JSON file per step (+ the markdown tables in gpu.log) in $MAE_GPU_RESULTS
# (default benchmarks/results/gpu-<date>).
#
#   bash benchmarks/gpu.sh                      # on the GPU host
#   bash benchmarks/gpu.sh --device cpu --smoke # anywhere: tiny counts, bundled model only (checks the scripts)
#
# Needs: torch (the torch engine, and the one-time ViT-B export into runs/bench-models; or point
# MAE_BENCH_VITB_DIR at an exported directory with fp32 + fp16), onnxruntime-gpu for the ORT rows (PyPI's
# 1.31.1 is built for CUDA 13: a CUDA 13 torch's nvidia-* packages carry the libraries it loads, put on
# LD_LIBRARY_PATH below). A step that cannot run on this host says so in its file and the next one runs.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
DEVICE=cuda
SMOKE=()
while [ $# -gt 0 ]; do
    case "$1" in
        --device) DEVICE=$2; shift 2 ;;
        --smoke) SMOKE=(--smoke); shift ;;
        *) echo "usage: $0 [--device cuda|cpu] [--smoke]" >&2; exit 2 ;;
    esac
done
OUT=${MAE_GPU_RESULTS:-benchmarks/results/gpu-$(date +%Y%m%d-%H%M)}
MODELS=${MAE_GPU_MODELS:-default,vitb}
[ ${#SMOKE[@]} -gt 0 ] && MODELS=${MAE_GPU_MODELS:-default}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu.log") 2>&1
START=$(date +%s)

# CUDA 13 libraries from pip's nvidia-* packages (a CUDA 13 torch brings them), for onnxruntime-gpu.
NV_LIBS=$("$PY" -c 'import glob, os, site; print(":".join(sorted({os.path.dirname(p) for d in site.getsitepackages() for p in glob.glob(d + "/nvidia/*/lib/lib*.so*")})))' 2>/dev/null)
[ -n "$NV_LIBS" ] && export LD_LIBRARY_PATH="$NV_LIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

if [ -n "${MAE_BENCH_VITB_DIR:-}" ]; then
    mkdir -p runs/bench-models
    ln -sfn "$(realpath "$MAE_BENCH_VITB_DIR")" runs/bench-models/mae_vit_base_patch16-fp16-fp32
fi

step() {  # name, time limit (s), command...
    local name=$1 limit=$2; shift 2
    echo "== $name (limit ${limit} s, $(( $(date +%s) - START )) s in)"
    timeout "$limit" "$@" || echo "== $name: exit $? (see above)"
}

step providers 120 "$PY" benchmarks/gpu_providers.py --device "$DEVICE" --out "$OUT/providers.json"
case ",$MODELS," in *,vitb,*)  # once per host: cached in runs/bench-models
    step export 300 "$PY" -c "import sys; sys.path.insert(0, '.'); from benchmarks.serve import random_model_dir; print(random_model_dir('mae_vit_base_patch16', ('fp16', 'fp32')))" ;;
esac
step raw 240 "$PY" benchmarks/engines_raw.py --device "$DEVICE" --models "$MODELS" "${SMOKE[@]}" --out "$OUT/raw.json"
step serve 300 "$PY" benchmarks/serve_engines.py --device "$DEVICE" --models "$MODELS" "${SMOKE[@]}" \
    --raw "$OUT/raw.json" --out "$OUT/serve.json"
echo "== done in $(( $(date +%s) - START )) s; results in $OUT"
