#!/usr/bin/env bash
# The GPU check, as short prepared steps that fit 540 s together (under a 600 s command limit):
#   1. providers:  ONNX Runtime's providers, torch's CUDA, each engine opened on the bundled model in a fresh
#                  process of its own, as mae-serve opens it                        (benchmarks/gpu_providers.py)
#   2. raw:        the encoder through each engine's own call, bundled model and a ViT-B/16 shape with random
#                  weights: ORT fp32/fp16, torch fp32/bf16 and bf16 compiled        (benchmarks/engines_raw.py)
#   3. serve:      /embed over HTTP on each engine at c = 1, 64, 256: img/s, p50/p99, mean batch, GPU
#                  utilisation (nvidia-smi dmon), server/raw                        (benchmarks/serve_engines.py)
# Each step has a time limit (its `step` line; a step may also use what earlier ones left unused) and is told the
# seconds it has (--budget-s), so that a row that would not fit is skipped, not killed half-way. A row that fails
# (an engine this host cannot open, a failed ViT-B export: made by the first ViT-B row, once per host, cached in
# runs/bench-models) records its error and the next row runs. Results: one JSON file per step, rewritten after
# every row (a step stopped by its limit keeps what it finished), and gpu.log with the tables and a summary of
# the rows that ran, failed and were skipped, in $MAE_GPU_RESULTS (default benchmarks/results/gpu-<date>).
#
#   bash benchmarks/gpu.sh                      # on the GPU host
#   bash benchmarks/gpu.sh --device cpu --smoke # anywhere: tiny counts, bundled model only (checks the scripts)
#
# Needs: torch (the torch engine, and the ViT-B export with onnxscript; or point MAE_BENCH_VITB_DIR at an
# exported directory with fp32 + fp16), onnxruntime-gpu for the ORT rows (PyPI's 1.31.1 is built for CUDA 13:
# a CUDA 13 torch's nvidia-* packages carry the libraries it loads, put on LD_LIBRARY_PATH below):
#   pip install -e '.[gpu,torch,dev]' onnxscript
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

PLANNED=0  # the limits of the steps so far: a step ends by START + PLANNED, whatever the earlier ones took
MARGIN=10  # seconds a step keeps after its rows' budget, to write its file and stop its processes
step() {  # name, time limit (s), command... (given --budget-s)
    local name=$1 limit=$2; shift 2
    PLANNED=$(( PLANNED + limit ))
    local left=$(( START + PLANNED - $(date +%s) ))
    echo "== $name (limit ${limit} s, ${left} s with what earlier steps left; $(( $(date +%s) - START )) s in)"
    timeout "$left" "$@" --budget-s $(( left - MARGIN )) || echo "== $name: exit $? (see above)"
}

step providers 60 "$PY" benchmarks/gpu_providers.py --device "$DEVICE" --out "$OUT/providers.json"
step raw 200 "$PY" benchmarks/engines_raw.py --device "$DEVICE" --models "$MODELS" "${SMOKE[@]}" --out "$OUT/raw.json"
step serve 270 "$PY" benchmarks/serve_engines.py --device "$DEVICE" --models "$MODELS" "${SMOKE[@]}" \
    --raw "$OUT/raw.json" --out "$OUT/serve.json"
echo "== summary"
"$PY" -c 'import sys; from pathlib import Path; sys.path.insert(0, "."); from benchmarks.engines_raw import summary
print(summary(Path(p) for p in sys.argv[1:]))' "$OUT/providers.json" "$OUT/raw.json" "$OUT/serve.json"
echo "== done in $(( $(date +%s) - START )) s; results in $OUT"
