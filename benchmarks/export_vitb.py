"""Export a ViT-B/16-shaped MAE (random weights) with mae-export and time its encoder in ONNX Runtime on this CPU.

Reports the export wall time (export, variants and verification), file sizes, encoder throughput
of fp32 vs int8 at one batch size (interleaved runs in the same process, medians) and the int8
cosine against torch. Prints a markdown table and writes JSON.

    .venv/bin/python -m benchmarks.export_vitb [--model mae_vit_base_patch16] [--runs 7]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from model import Checkpoint, MaskedAutoencoderViT, get_config
from model_dir.schema import load_model_dir
from model_dir.self_check import cosine_per_image
from training.export import export_model_dir, quiet_library_logs

RESULTS = Path(__file__).resolve().parent / "results" / "export_vitb.json"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def time_sessions(sessions: dict[str, ort.InferenceSession], feeds: dict[str, np.ndarray],
                  runs: int) -> dict[str, list[float]]:
    """Seconds per run of each session, interleaved so that background load hits all of them alike."""
    for s in sessions.values():
        s.run(None, feeds)  # warm-up: allocations and kernel selection
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(runs):
        for name, s in sessions.items():
            t = time.perf_counter()
            s.run(None, feeds)
            times[name].append(time.perf_counter() - t)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mae_vit_base_patch16")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--runs", type=int, default=7, help="timed runs per precision and K")
    p.add_argument("--precisions", default="fp32,fp16,int8")
    p.add_argument("--json", type=Path, default=RESULTS)
    args = p.parse_args()
    quiet_library_logs()

    torch.manual_seed(0)
    config = get_config(args.model)
    mae = MaskedAutoencoderViT(config).eval()
    L = config.num_patches
    with tempfile.TemporaryDirectory(prefix="export-bench-") as tmp:
        ckpt = Path(tmp) / "checkpoint.pth"
        Checkpoint(model=mae.state_dict(), config=config, kind="mae").save(ckpt)
        log: list[str] = []
        t0 = time.perf_counter()
        out = export_model_dir(ckpt, Path(tmp) / "model", precisions=args.precisions.split(","), name=args.model,
                               log=lambda line: (log.append(line), print(line, flush=True)))
        export_s = time.perf_counter() - t0
        model_dir = load_model_dir(out)
        sizes = {f.path: f.bytes + sum((out / e.path).stat().st_size for e in f.external_data)
                 for by_precision in model_dir.spec.files.values() for f in by_precision.values()}
        verification_cos = min(r.cosine for r in model_dir.spec.verification.rows
                               if r.graph == "encoder" and r.precision == "int8")

        sessions = {prec: ort.InferenceSession(str(model_dir.path("encoder", prec)), providers=["CPUExecutionProvider"])
                    for prec in ("fp32", "int8")}
        g = torch.Generator().manual_seed(1)
        pixels = torch.randn(args.batch, config.in_chans, config.img_size, config.img_size, generator=g)
        throughput = []
        for keep in (L, L // 4):  # /embed (whole image) and /reconstruct at mask ratio 0.75
            ids_keep = torch.argsort(torch.rand(args.batch, L, generator=g), dim=1)[:, :keep]
            feeds = {"pixels": pixels.numpy(), "ids_keep": ids_keep.numpy()}
            with torch.no_grad():
                reference = mae.forward_encoder(pixels, ids_keep).numpy()
            int8_cos = float(cosine_per_image(reference, sessions["int8"].run(None, feeds)[0]).min())
            times = time_sessions(sessions, feeds, args.runs)
            med = {k: float(np.median(v)) for k, v in times.items()}
            throughput.append({
                "keep": keep, "batch": args.batch, "runs": args.runs,
                "fp32_median_s": med["fp32"], "int8_median_s": med["int8"],
                "fp32_images_per_s": args.batch / med["fp32"], "int8_images_per_s": args.batch / med["int8"],
                "int8_speedup": med["fp32"] / med["int8"], "int8_cosine_vs_torch": int8_cos,
            })

    result = {
        "model": args.model, "cpu": cpu_name(), "cpu_count": os.cpu_count(),
        "onnxruntime": ort.__version__, "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "export_wall_s": export_s, "export_log": log,
        "file_bytes": sizes, "int8_min_cosine_verification": verification_cos, "throughput": throughput,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")

    print(f"\n{args.model} on {result['cpu']} ({result['cpu_count']} CPUs), onnxruntime {ort.__version__}\n")
    print(f"export (graphs, variants, verification): {export_s:.0f} s; int8 min cosine in verification "
          f"{verification_cos:.6f}\n")
    print("| file | MB |\n|---|---|")
    for name, size in sizes.items():
        print(f"| {name} | {size / 1e6:.1f} |")
    print("\n| K | fp32 img/s | int8 img/s | int8 speed-up | int8 cosine |\n|---|---|---|---|---|")
    for r in throughput:
        print(f"| {r['keep']} | {r['fp32_images_per_s']:.2f} | {r['int8_images_per_s']:.2f} | "
              f"{r['int8_speedup']:.2f}x | {r['int8_cosine_vs_torch']:.6f} |")
    print(f"\n(batch {args.batch}, median of {args.runs} interleaved runs; JSON: {args.json})")


if __name__ == "__main__":
    main()
