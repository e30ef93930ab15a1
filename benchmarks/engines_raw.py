"""Raw engine throughput: the encoder on full images through each engine's own call, no HTTP and no batcher.

Each row (a model and a configuration `engine:precision[:compile]`) opens the engine exactly as the server
opens it (`open_engine`, the same settings, self-check included, so a bf16 that falls back to fp32 is
reported as fp32) and calls it in a loop at each batch size for `--seconds`; the inputs go from numpy to the
device and the latent back each call, as in the server. Writes a JSON file that benchmarks/serve_engines.py
reads for its server/raw ratios.

This module also holds what the GPU check's three steps (benchmarks/gpu.sh) share: the models a row runs on
(the ViT-B/16 export made lazily, by the first row that needs it), the budget a step's rows must fit in, and
the row loop that records each row's result, error or skip and rewrites the JSON file after every row.

    python benchmarks/engines_raw.py --device cuda --models default,vitb --budget-s 190 --out results/raw.json
    python benchmarks/engines_raw.py --device cpu --models default --smoke --out raw.json   # tiny counts, anywhere
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.serve import BUNDLED  # noqa: E402
from model_dir.schema import ModelDir, load_model_dir  # noqa: E402
from service.server import open_engine  # noqa: E402
from service.settings import Settings  # noqa: E402

GPU_CONFIGS = "onnxruntime:fp32,onnxruntime:fp16,torch:fp32,torch:bf16,torch:bf16:compile"
CPU_CONFIGS = "onnxruntime:fp32,torch:fp32,torch:bf16"
# --models names: the row label, and for a random-weight model the mae-export config and precisions
MODELS: dict[str, tuple[str, tuple[str, tuple[str, ...]] | None]] = {
    "default": ("bundled", None),
    "vitb": ("vit_b16_random", ("mae_vit_base_patch16", ("fp16", "fp32"))),
}
OPEN_S = 15.0  # a row's guess at opening an engine (self-check included) and closing it, on top of its measuring
COMPILE_S = 60.0  # and at torch.compile's first compilations


def log(message: str) -> None:
    print(f"engines_raw: {message}", file=sys.stderr, flush=True)


class Budget:
    """The seconds a step may take (gpu.sh passes what its time limit leaves after a margin), so that a row that
    would not finish in what is left is skipped rather than killed half-way; None: no limit."""

    def __init__(self, seconds: float | None):
        self.end = None if seconds is None else time.monotonic() + seconds

    def left(self) -> float:
        return math.inf if self.end is None else self.end - time.monotonic()

    def allows(self, seconds: float) -> bool:
        return self.left() >= seconds

    def timeout(self) -> float | None:
        """For a child process started now: the seconds left (at least 1), or None without a limit."""
        return None if self.end is None else max(self.left(), 1.0)


class ModelSource:
    """A model named on --models, made the first time a row asks for it: the bundled directory, or a random-weight
    export (`benchmarks.serve.random_model_dir`, cached in runs/bench-models) in a child process bounded by the
    budget. A failed export is remembered: every row of that model records it, and the export is not tried again."""

    def __init__(self, name: str):
        self.label, self.random = MODELS[name]
        self._path: Path | None = BUNDLED if self.random is None else None
        self._directory: ModelDir | None = None
        self._error: str | None = None

    def path(self, budget: Budget) -> Path:
        if self._error is not None:
            raise RuntimeError(self._error)
        if self._path is None:
            try:
                self._path = export_random(*self.random, budget)
            except Exception as e:
                self._error = f"the {self.label} export failed: {type(e).__name__}: {e}"
                raise RuntimeError(self._error) from e
        return self._path

    def directory(self, budget: Budget) -> ModelDir:
        """The model directory, read and its hashes checked once."""
        if self._directory is None:
            self._directory = load_model_dir(self.path(budget))
        return self._directory


def export_random(config_name: str, precisions: tuple[str, ...], budget: Budget) -> Path:
    """`random_model_dir` in a child process, interrupted when the budget runs out (SIGINT: the export removes its
    staging directory and publishes atomically, so nothing half-written is left in the cache). Its log is passed
    on when it ends."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from benchmarks.serve import random_model_dir; "
            "print(random_model_dir(sys.argv[2], tuple(sys.argv[3:])))")
    child = subprocess.Popen([sys.executable, "-c", code, str(ROOT), config_name, *precisions], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = child.communicate(timeout=budget.timeout())
    except subprocess.TimeoutExpired as e:
        child.send_signal(signal.SIGINT)
        try:
            child.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            child.kill()
            child.communicate()
        raise TimeoutError(f"stopped after {e.timeout:.0f} s, the step's budget") from None
    sys.stderr.write(stderr)
    if child.returncode != 0:
        raise RuntimeError(f"exit {child.returncode}: {' | '.join(stderr.strip().splitlines()[-3:])}")
    return Path(stdout.strip().splitlines()[-1])


def model_sources(names: str) -> list[ModelSource]:
    """--models: comma-separated names from MODELS."""
    unknown = [n for n in names.split(",") if n not in MODELS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown model(s) {', '.join(unknown)} (known: {', '.join(MODELS)})")
    return [ModelSource(n) for n in names.split(",")]


@dataclass(frozen=True)
class Row:
    """One row of a step: what it is (`key`, copied into its result; `label`, for the logs and the summary), the
    seconds it needs at most as far as can be told beforehand, and the call that measures it."""

    label: str
    key: dict[str, Any]
    seconds: float
    measure: Callable[[], dict[str, Any]]


def write_json(path: Path, report: dict[str, Any]) -> None:
    """Write `report` atomically (a temporary file, then os.replace): a step killed mid-write leaves the last one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    os.replace(tmp, path)


def run_rows(rows: Iterable[Row], report: dict[str, Any], out: Path, budget: Budget,
             log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Run each row in turn into `report["results"]`: its measurements, or the error it raised (and the next row
    runs), or `skipped` when the budget has no room left for it. `out` is rewritten after every row, with
    `complete` false until the last, so that a step stopped from outside keeps the rows it finished."""
    results: list[dict[str, Any]] = []
    report.update(complete=False, results=results)
    write_json(out, report)
    for row in rows:
        result: dict[str, Any] = {"row": row.label, **row.key}
        if not budget.allows(row.seconds):
            result["skipped"] = f"budget: {max(budget.left(), 0):.0f} s left, the row needs up to {row.seconds:.0f} s"
        else:
            log(row.label)
            start = time.monotonic()
            try:
                result.update(row.measure())
            except Exception as e:  # a row this host cannot run (no CUDA provider, no fp16 variant, export error)
                result["error"] = f"{type(e).__name__}: {e}"
            result["row_s"] = round(time.monotonic() - start, 1)
        log(f"  {status(result)}")
        results.append(result)
        write_json(out, report)
    report["complete"] = True
    write_json(out, report)
    return results


def status(result: dict[str, Any]) -> str:
    """One result's line in the logs and the summary: ran (in how long), failed and why, or skipped and why."""
    if "error" in result:
        return f"failed: {' '.join(result['error'].split())[:300]}"
    if "skipped" in result:
        return f"skipped: {result['skipped']}"
    return f"ran in {result['row_s']:.0f} s"


def summary(paths: Iterable[Path]) -> str:
    """Which rows of each step's file ran, failed or were skipped, and which steps stopped before their last row."""
    lines = []
    for path in paths:
        if not path.exists():
            lines.append(f"{path.name}: missing (the step wrote nothing)")
            continue
        report = json.loads(path.read_text())
        results = report.get("results", [])
        counts = {s: sum(status(r).startswith(s) for r in results) for s in ("ran", "failed", "skipped")}
        stopped = "" if report.get("complete") else "; STOPPED before its last row (time limit or crash)"
        lines.append(f"{path.name}: {', '.join(f'{n} {s}' for s, n in counts.items())}{stopped}")
        lines += [f"  {r['row']}: {status(r)}" for r in results]
    return "\n".join(lines)


def parse_config(config: str) -> dict[str, Any]:
    engine, precision, *rest = config.split(":")
    return {"engine": engine, "precision": precision, "torch_compile": rest == ["compile"]}


def config_label(config: dict[str, Any]) -> str:
    return f"{config['engine']}:{config['precision']}{':compile' if config['torch_compile'] else ''}"


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


def raw_row(source: ModelSource, config: dict[str, Any], device: str, batches: list[int], seconds: float,
            budget: Budget) -> dict[str, Any]:
    """One configuration on one model: opened as the server opens it, then measured."""
    directory = source.directory(budget)
    start = time.perf_counter()
    engine = open_engine(directory, Settings(model_dir=directory.root, device=device, **config))
    load_s = time.perf_counter() - start
    encoder = engine.describe()["graphs"]["encoder"]
    row = {"served_precision": engine.precision("encoder"), "providers": encoder["providers"], "load_s": load_s,
           **measure(engine, batches, seconds)}
    log(f"  best {row['img_per_s']:.1f} img/s at batch {row['best_batch']} (load {load_s:.1f} s)")
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--models", default="default,vitb", type=model_sources, help=f"of {', '.join(MODELS)}")
    p.add_argument("--configs", default=None, help=f"engine:precision[:compile],... (cuda: {GPU_CONFIGS}; "
                   f"cpu: {CPU_CONFIGS})")
    p.add_argument("--batches", default=None, help="batch sizes (cuda: 1,32,128,256; cpu: 1,8,32)")
    p.add_argument("--seconds", type=float, default=2.0, help="per batch size")
    p.add_argument("--smoke", action="store_true", help="tiny counts (batches 1,4; 0.2 s): checks the script runs")
    p.add_argument("--budget-s", type=float, default=None, help="seconds for all rows: a row that would not fit "
                   "in what is left is skipped")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    configs = [parse_config(c) for c in (args.configs or (GPU_CONFIGS if args.device == "cuda" else CPU_CONFIGS))
               .split(",")]
    batches = [int(b) for b in (args.batches or ("1,4" if args.smoke else "1,32,128,256" if args.device == "cuda"
                                                 else "1,8,32")).split(",")]
    seconds = 0.2 if args.smoke else args.seconds
    budget = Budget(args.budget_s)
    rows = [Row(f"{source.label} {config_label(config)}", {"model": source.label, **config},
                len(batches) * seconds + OPEN_S + (COMPILE_S if config["torch_compile"] else 0.0),
                lambda source=source, config=config: raw_row(source, config, args.device, batches, seconds, budget))
            for source in args.models for config in configs]
    report = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "device": args.device, "machine": platform.machine(),
              "cpu_count": os.cpu_count(), "smoke": args.smoke, "seconds_per_batch": seconds, "batches": batches,
              "versions": versions()}
    results = run_rows(rows, report, args.out, budget, log)
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
        if "img_per_s" not in r:
            lines.append(f"| {r['model']} | {r['engine']} | {r['precision']} | {r['torch_compile']} | "
                         f"{status(r)[:80]} | | |")
            continue
        by = ", ".join(f"{b}: {v:.0f}" for b, v in r["by_batch"].items())
        lines.append(f"| {r['model']} | {r['engine']} | {r['precision']} ({r['served_precision']}) | "
                     f"{r['torch_compile']} | {r['img_per_s']:.1f} | {r['best_batch']} | {by} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
