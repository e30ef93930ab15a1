"""/embed over HTTP on each engine: img/s, p50/p99, mean batch, GPU utilisation, and server/raw ratios.

For each model and configuration (`engine:precision[:compile]`) a `python -m service` process is
started (its own cores when the host has 8 or more: the load generator, benchmarks/loadgen.py, is
pinned to the last quarter), warmed up at the top concurrency, then loaded at each concurrency.
Mean batch comes from the server's /metrics, GPU utilisation from `nvidia-smi dmon` sampled during
the run, and the ratio divides the server's img/s at the top concurrency by the raw engine's best
(benchmarks/engines_raw.py's file, same configuration). The served precision is read from /info. Each
row's result (or error, or skip when `--budget-s` has no room left for it) is written as soon as it is known.

    python benchmarks/serve_engines.py --device cuda --raw results/raw.json --budget-s 260 --out results/serve.json
    python benchmarks/serve_engines.py --device cpu --models default --smoke --raw raw.json --out serve.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.engines_raw import (  # noqa: E402
    MODELS,
    Budget,
    ModelSource,
    Row,
    config_label,
    model_sources,
    parse_config,
    run_rows,
    status,
    versions,
)
from benchmarks.loadgen import client_cores, run_load  # noqa: E402
from benchmarks.serve import BOUNDARY, Server, multipart, sample_image  # noqa: E402

GPU_CONFIGS = "onnxruntime:fp16,torch:bf16"
CPU_CONFIGS = "onnxruntime:fp32,torch:fp32"
START_S = 30.0  # a row's guess at starting a server (engine open, self-check, warm-up) and stopping it


def log(message: str) -> None:
    print(f"serve_engines: {message}", file=sys.stderr, flush=True)


class GpuUtilisation:
    """`nvidia-smi dmon -s u` in the background: the mean SM utilisation (%) over the samples taken."""

    def __init__(self) -> None:
        self.proc = (subprocess.Popen(["nvidia-smi", "dmon", "-s", "u", "-d", "1"], stdout=subprocess.PIPE,
                                      stderr=subprocess.DEVNULL, text=True)
                     if shutil.which("nvidia-smi") else None)

    def stop(self) -> float | None:
        if self.proc is None:
            return None
        self.proc.terminate()
        out, _ = self.proc.communicate(timeout=10)
        samples = [float(line.split()[1]) for line in out.splitlines()
                   if line.strip() and not line.startswith("#") and line.split()[1].replace(".", "").isdigit()]
        return sum(samples) / len(samples) if samples else None


def served_precision(server: Server) -> dict[str, Any]:
    with urllib.request.urlopen(f"{server.url}/info", timeout=10) as r:
        runtime = json.loads(r.read())["runtime"]
    encoder = runtime["graphs"]["encoder"]
    return {"engine": runtime["engine"], "device": runtime["device"], "precision": encoder["precision"],
            "providers": encoder["providers"]}


def bench(source: ModelSource, config: dict[str, Any], args: argparse.Namespace, budget: Budget) -> dict[str, Any]:
    """One configuration on one model: a server started, warmed up and loaded at each concurrency."""
    model_dir = source.path(budget)
    body = multipart(sample_image(model_dir))
    raw = raw_row(args.raw, source.label, config)
    flags = ["--engine", config["engine"], "--precision", config["precision"], "--device", args.device,
             "--max-batch-size", str(args.max_batch_size), "--max-queue", str(4 * max(args.concurrency)),
             *(["--torch-compile"] if config["torch_compile"] else []), *args.server_flags.split()]
    cores = args.client_cores
    content_type = f"multipart/form-data; boundary={BOUNDARY}"
    server = Server(model_dir, *flags)
    try:
        info = served_precision(server)
        log(f"  serving {info}")
        run_load(server.url, "/embed", body, content_type, max(args.concurrency), args.warmup, cores)  # compiles, allocates
        server.drain()
        runs = []
        for c in args.concurrency:
            s0, n0, b0 = server.batch_stats()
            gpu = GpuUtilisation()
            run = run_load(server.url, "/embed", body, content_type, c, args.seconds, cores)
            run["gpu_util_pct"] = gpu.stop()
            server.drain()
            s1, n1, b1 = server.batch_stats()
            run["mean_batch"] = (s1 - s0) / max(n1 - n0, 1)
            # what the engine copied back per image for /embed (the pooled tokens only, where pooled on the device)
            run["output_bytes_per_image"] = None if b0 is None or b1 is None else (b1 - b0) / max(s1 - s0, 1)
            log(f"  c={c}: {run['img_per_s']:.1f} img/s, p50 {run['p50_ms']:.1f} ms, p99 {run['p99_ms']:.1f} ms, "
                f"mean batch {run['mean_batch']:.1f}, GPU {run['gpu_util_pct']}, errors {run['errors']}")
            runs.append(run)
    finally:
        server.stop()
    top = runs[-1]
    return {"served": info, "server_flags": flags, "client_cores": list(cores),
            "runs": runs, "raw_img_per_s": raw and raw["img_per_s"], "raw_best_batch": raw and raw["best_batch"],
            f"server_over_raw_c{top['concurrency']}": raw and top["img_per_s"] / raw["img_per_s"]}


def raw_row(raw_file: Path | None, label: str, config: dict[str, Any]) -> dict[str, Any] | None:
    if raw_file is None or not raw_file.exists():
        return None
    rows = json.loads(raw_file.read_text())["results"]
    return next((r for r in rows if r["model"] == label and "img_per_s" in r
                 and all(r[k] == config[k] for k in ("engine", "precision", "torch_compile"))), None)


def markdown(results: list[dict[str, Any]]) -> str:
    lines = ["| model | engine | precision (served) | c | img/s | p50 ms | p99 ms | mean batch | GPU util % | "
             "B out/img | server/raw | errors |", "|" + "---|" * 12]
    for r in results:
        if "runs" not in r:
            lines.append(f"| {r['model']} | {r['engine']}{' compiled' if r['torch_compile'] else ''} | "
                         f"{r['precision']} | {status(r)[:80]} |" + " |" * 8)
            continue
        ratio_key = next(k for k in r if k.startswith("server_over_raw"))
        for x in r["runs"]:
            top = x is r["runs"][-1]
            ratio = f"{r[ratio_key]:.2f} (raw {r['raw_img_per_s']:.0f})" if top and r[ratio_key] else ""
            gpu = "" if x["gpu_util_pct"] is None else f"{x['gpu_util_pct']:.0f}"
            copied = "" if x.get("output_bytes_per_image") is None else f"{x['output_bytes_per_image']:,.0f}"
            lines.append(f"| {r['model']} | {r['engine']}{' compiled' if r['torch_compile'] else ''} | "
                         f"{r['precision']} ({r['served']['precision']}) | {x['concurrency']} | {x['img_per_s']:.1f} | "
                         f"{x['p50_ms']:.1f} | {x['p99_ms']:.1f} | {x['mean_batch']:.1f} | {gpu} | {copied} | {ratio} | "
                         f"{x['errors']} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--models", default="default,vitb", type=model_sources, help=f"of {', '.join(MODELS)}")
    p.add_argument("--configs", default=None, help=f"engine:precision[:compile],... (cuda: {GPU_CONFIGS}; "
                   f"cpu: {CPU_CONFIGS})")
    p.add_argument("--concurrency", default="1,64,256", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--seconds", type=float, default=5.0, help="per concurrency")
    p.add_argument("--warmup", type=float, default=3.0, help="load at the top concurrency before measuring")
    p.add_argument("--max-batch-size", type=int, default=None, help="server's (cuda: 128; cpu: 32)")
    p.add_argument("--server-flags", default="", help="more mae-serve flags for every server")
    p.add_argument("--raw", type=Path, default=None, help="benchmarks/engines_raw.py's output, for the ratios")
    p.add_argument("--smoke", action="store_true", help="tiny counts (c=1,4; 1 s): checks the script runs")
    p.add_argument("--budget-s", type=float, default=None, help="seconds for all rows: a row that would not fit "
                   "in what is left is skipped")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    if args.smoke:
        args.concurrency, args.seconds, args.warmup = [1, 4], 1.0, 0.5
    args.max_batch_size = args.max_batch_size or (128 if args.device == "cuda" else 32)
    args.client_cores = () if args.smoke else client_cores()
    if args.client_cores:  # servers started from here inherit the other cores; the clients pin themselves
        os.sched_setaffinity(0, set(os.sched_getaffinity(0)) - set(args.client_cores))
    configs = [parse_config(c) for c in (args.configs or (GPU_CONFIGS if args.device == "cuda" else CPU_CONFIGS))
               .split(",")]
    budget = Budget(args.budget_s)
    row_s = args.warmup + len(args.concurrency) * args.seconds + START_S
    rows = [Row(f"{source.label} {config_label(config)}", {"model": source.label, **config}, row_s,
                lambda source=source, config=config: bench(source, config, args, budget))
            for source in args.models for config in configs]
    report = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "device": args.device, "cpu_count": os.cpu_count(),
              "smoke": args.smoke, "load_generator": "benchmarks/loadgen.py (asyncio keep-alive sockets, "
              "pre-encoded multipart body, one process per client core)", "seconds_per_run": args.seconds,
              "versions": versions()}
    results = run_rows(rows, report, args.out, budget, log)
    print(markdown(results))
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
