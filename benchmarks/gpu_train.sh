#!/usr/bin/env bash
# Training on a CUDA GPU (torch only, no ONNX Runtime), one prepared script (<= 6 min):
#   1. the MAE paper's Table 2 on a GPU: ViT-L visible-only encoder vs mask tokens in the encoder
#      (bf16 autocast at batch 256, fp32 at batch 64), and ours vs Hugging Face ViTMAEForPreTraining;
#   2. the training CLI end to end on CUDA: mae-train (bf16) on an ImageFolder made from the
#      committed Fashion-MNIST fixture, then mae-export of its checkpoint (verified against torch).
#
#   bash benchmarks/gpu_train.sh [results folder]     # JSON + logs in the folder (default runs/gpu)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the repo, also where it is not pip-installed
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
RESULTS=${1:-runs/gpu}
WORK=$(mktemp -d)
mkdir -p "$RESULTS"
START=$(date +%s)

echo "== host"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())'

echo "== Table 2 and ours vs Hugging Face on CUDA"
"$PY" benchmarks/train_speed.py --device cuda --amp bf16 --arch large --batch 256 --repeats 10 --hf-batch 256 \
    --out "$RESULTS/train_speed_cuda_bf16.json"
"$PY" benchmarks/train_speed.py --device cuda --arch large --batch 64 --repeats 10 --only table2 \
    --out "$RESULTS/train_speed_cuda_fp32.json"

echo "== mae-train on CUDA (bf16) and mae-export"
"$PY" - "$WORK/data" <<'PYEOF'
import json, shutil, sys
from pathlib import Path
fixture, out = Path("tests/fixtures/fmnist"), Path(sys.argv[1]) / "train"
for item in json.loads((fixture / "labels.json").read_text())["images"]:
    (out / str(item["class_id"])).mkdir(parents=True, exist_ok=True)
    shutil.copy(fixture / item["file"], out / str(item["class_id"]))
PYEOF
"$PY" -m training.pretrain --model mae_vit_tiny_fmnist --dataset imagefolder --data-path "$WORK/data" \
    --epochs 3 --batch-size 64 --device cuda --amp bf16 --output-dir "$WORK/run" --quiet
cp "$WORK/run/metrics.jsonl" "$RESULTS/pretrain_cuda_metrics.jsonl"
"$PY" -m training.export --checkpoint "$WORK/run/checkpoint-final.pth" --out "$WORK/model" --precision fp32 \
    --name gpu-smoke 2>&1 | tail -n 12
"$PY" -c 'import json, sys; v = json.load(open(sys.argv[1]))["verification"]; print(json.dumps(v)[:600])' \
    "$WORK/model/model.json" | tee "$RESULTS/export_verification.txt"
echo "== done in $(( $(date +%s) - START )) s"
