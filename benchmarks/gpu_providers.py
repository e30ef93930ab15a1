"""What this host can serve with: ONNX Runtime's providers and whether a session really gets CUDA, torch's CUDA,
and each engine opened on the bundled model on the device asked for. Prints and writes a JSON file.

    python benchmarks/gpu_providers.py --device cuda --out results/providers.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.engines_raw import versions  # noqa: E402
from model_dir.schema import load_model_dir  # noqa: E402
from service.server import open_engine  # noqa: E402
from service.settings import BUNDLED_MODEL_DIR, Settings  # noqa: E402


def nvidia_smi() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    done = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                          capture_output=True, text=True, timeout=30)
    return done.stdout.strip() or done.stderr.strip()


def engine_report(engine: str, device: str, precision: str) -> dict[str, Any]:
    """Open the engine on the bundled model (self-check included) and say what it got, or why it could not."""
    t = time.perf_counter()
    try:
        opened = open_engine(load_model_dir(BUNDLED_MODEL_DIR),
                             Settings(engine=engine, device=device, precision=precision))
    except Exception as e:
        return {"engine": engine, "device": device, "precision": precision, "error": f"{type(e).__name__}: {e}"}
    d = opened.describe()
    return {"engine": engine, "device": d["device"], "precision": opened.precision("encoder"),
            "providers": d["graphs"]["encoder"]["providers"], "open_s": time.perf_counter() - t,
            "self_check": [(r["graph"], r["precision"], round(r["cosine"], 6), r["passed"])
                           for r in (d["self_check"] or {}).get("results", [])]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    import onnxruntime as ort

    report: dict[str, Any] = {"nvidia_smi": nvidia_smi(), "versions": versions(),
                              "onnxruntime_providers": ort.get_available_providers(),
                              "onnxruntime_device": ort.get_device()}
    reduced = "fp16" if args.device == "cuda" else "int8"
    report["engines"] = [engine_report("onnxruntime", args.device, precision) for precision in ("fp32", reduced)]
    report["engines"] += [engine_report("torch", args.device, precision) for precision in ("fp32", "bf16")]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
