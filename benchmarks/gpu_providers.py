"""What this host can serve with: ONNX Runtime's providers, torch's CUDA, and each engine opened on the bundled
model on the device asked for, as mae-serve would open it. Prints and writes a JSON file.

Each engine is opened in a fresh child process of its own (this script with --engine), so that an ONNX Runtime
report never has torch, or the CUDA libraries torch loads, in its process where mae-serve would not: the report
records whether torch was loaded after all, and the engine's own account of its device (`device_reason`, the
`cuda_libraries` it loaded) from its describe().

    python benchmarks/gpu_providers.py --device cuda --budget-s 50 --out results/providers.json
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

from benchmarks.engines_raw import Budget, Row, run_rows, versions  # noqa: E402

REPORT_S = 30.0  # a row's guess at a child's start, imports, engine open and self-check


def log(message: str) -> None:
    print(f"gpu_providers: {message}", file=sys.stderr, flush=True)


def nvidia_smi() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    done = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                          capture_output=True, text=True, timeout=30)
    return done.stdout.strip() or done.stderr.strip()


def engine_report(engine: str, device: str, precision: str) -> dict[str, Any]:
    """In this process: open the engine on the bundled model (self-check included) and say what it got."""
    from model_dir.schema import load_model_dir
    from service.server import open_engine
    from service.settings import BUNDLED_MODEL_DIR, Settings

    start = time.perf_counter()
    opened = open_engine(load_model_dir(BUNDLED_MODEL_DIR), Settings(engine=engine, device=device, precision=precision))
    d = opened.describe()
    return {"served_device": d["device"], "served_precision": opened.precision("encoder"),
            "providers": d["graphs"]["encoder"]["providers"], "open_s": time.perf_counter() - start,
            "device_reason": d.get("device_reason"), "cuda_libraries": d.get("cuda_libraries"),
            "torch_loaded": "torch" in sys.modules,
            "self_check": [(r["graph"], r["precision"], round(r["cosine"], 6), r["passed"])
                           for r in (d["self_check"] or {}).get("results", [])]}


def child_report(engine: str, device: str, precision: str, budget: Budget) -> dict[str, Any]:
    """engine_report in a fresh child process, which prints it as its last stdout line."""
    try:
        done = subprocess.run([sys.executable, __file__, "--engine", engine, "--device", device, "--precision",
                               precision], capture_output=True, text=True, timeout=budget.timeout())
    except subprocess.TimeoutExpired as e:
        raise TimeoutError(f"stopped after {e.timeout:.0f} s, the step's budget") from None
    sys.stderr.write(done.stderr)
    if done.returncode != 0:
        raise RuntimeError(f"exit {done.returncode}: {' | '.join(done.stderr.strip().splitlines()[-3:])}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--budget-s", type=float, default=None, help="seconds for all engine reports: one that would "
                   "not fit in what is left is skipped")
    p.add_argument("--out", type=Path, help="the JSON file (required unless --engine)")
    p.add_argument("--engine", choices=["onnxruntime", "torch"], help="print this engine's report alone, as JSON, "
                   "from this process (what the script runs each child as)")
    p.add_argument("--precision", default="fp32", help="with --engine")
    args = p.parse_args()
    if args.engine:
        print(json.dumps(engine_report(args.engine, args.device, args.precision)))
        return
    if args.out is None:
        p.error("--out is required")
    import onnxruntime as ort

    budget = Budget(args.budget_s)
    reduced = "fp16" if args.device == "cuda" else "int8"
    rows = [Row(f"{engine}:{precision} on {args.device}", {"engine": engine, "device": args.device,
                                                           "precision": precision}, REPORT_S,
                lambda engine=engine, precision=precision: child_report(engine, args.device, precision, budget))
            for engine, precision in (("onnxruntime", "fp32"), ("onnxruntime", reduced), ("torch", "fp32"),
                                      ("torch", "bf16"))]
    report: dict[str, Any] = {"nvidia_smi": nvidia_smi(), "versions": versions(),
                              "onnxruntime_providers": ort.get_available_providers(),
                              "onnxruntime_device": ort.get_device()}
    run_rows(rows, report, args.out, budget, log)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
