"""Raw engine throughput: the encoder on full images through each engine's own call, no HTTP and no batcher.

Each configuration (`engine:precision[:compile]`) is opened exactly as the server opens it (`open_engine`,
the same settings, self-check included, so a bf16 that falls back to fp32 is reported as fp32) and
called in a loop at each batch size for `--seconds`; the inputs go from numpy to the device and the
latent back each call, as in the server. Writes a JSON file that benchmarks/serve_engines.py reads for
its server/raw ratios.

    python benchmarks/engines_raw.py --device cuda --models default,vitb --out results/raw.json
    python benchmarks/engines_raw.py --device cpu --models default --smoke          # tiny counts, any machine
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.serve import BUNDLED, random_model_dir  # noqa: E402
from model_dir.schema import load_model_dir  # noqa: E402
from service.server import open_engine  # noqa: E402
from service.settings import Settings  # noqa: E402

GPU_CONFIGS = "onnxruntime:fp32,onnxruntime:fp16,torch:fp32,torch:bf16,torch:bf16:compile"
CPU_CONFIGS = "onnxruntime:fp32,torch:fp32,torch:bf16"


def log(message: str) -> None:
    print(f"engines_raw: {message}", file=sys.stderr, flush=True)


def model_dirs(names: list[str]) -> dict[str, Path]:
    """The bundled model and/or a ViT-B/16-shaped MAE with random weights (exported once, fp32 + fp16)."""
    dirs = {}
    for name in names:
        if name == "default":
            dirs["bundled"] = BUNDLED
        elif name == "vitb":
            dirs["vit_b16_random"] = random_model_dir("mae_vit_base_patch16", ("fp16", "fp32"))
        else:
            sys.exit(f"engines_raw: unknown model {name!r} (default, vitb)")
    return dirs


def parse_config(config: str) -> dict[str, Any]:
    engine, precision, *rest = config.split(":")
    return {"engine": engine, "precision": precision, "torch_compile": rest == ["compile"]}


def measure(engine: Any, batches: list[int], seconds: float) -> dict[str, Any]:
    """img/s per batch size (at least 3 calls each, after 2 warm-up calls that also compile new shapes)."""
    a = engine.arch
    by_batch: dict[int, float] = {}
    for batch in batches:
        pixels = np.random.default_rng(0).standard_normal((batch, a.in_chans, a.img_size, a.img_size)).astype(np.float32)
        ids = engine.all_patches(batch)
        for _ in range(2):
            engine.encode(pixels, ids)
        calls, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds or calls < 3:
            engine.encode(pixels, ids)
            calls += 1
        by_batch[batch] = calls * batch / (time.perf_counter() - start)
        log(f"    batch {batch}: {by_batch[batch]:.1f} img/s")
    best = max(by_batch, key=by_batch.get)
    return {"img_per_s": by_batch[best], "best_batch": best, "by_batch": by_batch}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--models", default="default,vitb")
    p.add_argument("--configs", default=None, help=f"engine:precision[:compile],... (cuda: {GPU_CONFIGS}; "
                   f"cpu: {CPU_CONFIGS})")
    p.add_argument("--batches", default=None, help="batch sizes (cuda: 1,32,128,256; cpu: 1,8,32)")
    p.add_argument("--seconds", type=float, default=2.0, help="per batch size")
    p.add_argument("--smoke", action="store_true", help="tiny counts (batches 1,4; 0.2 s): checks the script runs")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    configs = [parse_config(c) for c in (args.configs or (GPU_CONFIGS if args.device == "cuda" else CPU_CONFIGS))
               .split(",")]
    batches = [int(b) for b in (args.batches or ("1,4" if args.smoke else "1,32,128,256" if args.device == "cuda"
                                                 else "1,8,32")).split(",")]
    seconds = 0.2 if args.smoke else args.seconds
    results = []
    for label, model_dir in model_dirs(args.models.split(",")).items():
        directory = load_model_dir(model_dir)
        for config in configs:
            log(f"{label} {config}")
            t = time.perf_counter()
            try:
                settings = Settings(model_dir=model_dir, device=args.device, **config)
                engine = open_engine(directory, settings)
            except Exception as e:  # a configuration this host cannot run (no CUDA provider, no fp16 variant)
                log(f"  skipped: {e}")
                results.append({"model": label, **config, "skipped": str(e)})
                continue
            load_s = time.perf_counter() - t
            described = engine.describe()
            row = {"model": label, **config, "served_precision": engine.precision("encoder"),
                   "providers": described["graphs"]["encoder"]["providers"], "load_s": load_s,
                   **measure(engine, batches, seconds)}
            log(f"  best {row['img_per_s']:.1f} img/s at batch {row['best_batch']} (load {load_s:.1f} s)")
            results.append(row)
            del engine
    report = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "device": args.device, "machine": platform.machine(),
              "cpu_count": os.cpu_count(), "smoke": args.smoke, "seconds_per_batch": seconds, "batches": batches,
              "versions": versions(), "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(markdown(results))
    log(f"wrote {args.out}")


def versions() -> dict[str, str | None]:
    import onnxruntime as ort

    out: dict[str, str | None] = {"onnxruntime": ort.__version__, "torch": None, "cuda": None}
    try:
        import torch

        out["torch"], out["cuda"] = torch.__version__, torch.version.cuda
        if torch.cuda.is_available():
            out["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return out


def markdown(results: list[dict[str, Any]]) -> str:
    lines = ["| model | engine | precision (served) | compiled | best img/s | at batch | img/s by batch |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        if "skipped" in r:
            lines.append(f"| {r['model']} | {r['engine']} | {r['precision']} | {r['torch_compile']} | skipped: "
                         f"{r['skipped'][:80]} | | |")
            continue
        by = ", ".join(f"{b}: {v:.0f}" for b, v in r["by_batch"].items())
        lines.append(f"| {r['model']} | {r['engine']} | {r['precision']} ({r['served_precision']}) | "
                     f"{r['torch_compile']} | {r['img_per_s']:.1f} | {r['best_batch']} | {by} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
