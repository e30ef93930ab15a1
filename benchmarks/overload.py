"""Goodput under overload: this checkout against an earlier commit, both measured in the same run.

Scenarios (the bundled model, POST /embed with a JSON base64 body, default settings unless said):
  - capacity: closed loop, 64 connections (the reference the target is a fraction of);
  - storm 256 / storm 512: closed loop, 256 or 512 connections, each sending again the moment it has an
    answer, refusals included (what load generators and clients without backoff do);
  - open 2x / open 5x: requests sent on a fixed schedule at 2x and 5x that version's capacity of this round,
    whether or not earlier ones were answered; a client gives up after --timeout seconds;
  - refusal floor: the same 256-connection storm against benchmarks/refusal_floor.py (uvicorn and a bare ASGI
    app that answers every request with the 503 envelope): what uvicorn alone costs per refusal;
  - refusal cost: MAE_MAX_QUEUE=16 (and, here, MAE_MAX_WAITING=0: refuse at once, no wait list) under a
    256-connection storm; the server CPU per refusal is estimated as (server CPU - 200s x the server CPU per
    200 of that version's capacity run) / refusals.
Goodput is 200s per second; p50/p99 are of the 200s (open loop: from the scheduled send). Server CPU covers
all its threads; the load generator (benchmarks/loadgen.py, uvloop) runs on the same cores when the machine
has fewer than 8 (its CPU is reported). Rounds interleave the two versions scenario by scenario; each figure
is the median over rounds. The earlier commit runs from a `git worktree` under runs/ (made if missing).
Writes benchmarks/results/overload.json and prints a markdown table.

    .venv/bin/python benchmarks/overload.py [--before d560d8c] [--rounds 2] [--seconds 8]
"""

from __future__ import annotations

import argparse
import base64
import json
import platform
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.loadgen import client_cores, run_load, run_open_loop  # noqa: E402
from benchmarks.serve import BUNDLED, Server, cpu_seconds, sample_image, worktree  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "overload.json"
STORMS = (256, 512)
OPEN_FACTORS = (2, 5)
REFUSAL_ENV = {"MAE_MAX_QUEUE": "16", "MAE_MAX_WAITING": "0"}  # an earlier commit ignores what it does not know


def log(message: str) -> None:
    print(f"overload: {message}", file=sys.stderr, flush=True)


def measured(server: Server, load: Any) -> dict[str, Any]:
    """One load run against `server` (a callable taking its URL), with the server's CPU share."""
    server.drain()
    pid = server.proc.pid
    cpu0, loop0 = cpu_seconds(pid), cpu_seconds(pid, thread=pid)
    run = load(server.url)
    run["server_cpu_s"] = cpu_seconds(pid) - cpu0
    run["server_cpu_pct"] = 100 * run["server_cpu_s"] / run["wall_s"]
    run["event_loop_cpu_pct"] = 100 * (cpu_seconds(pid, thread=pid) - loop0) / run["wall_s"]
    run["refusals_per_s"] = run["refusals"] / run["wall_s"]
    server.drain()
    return run


def median(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"rounds": len(runs)}
    for key in runs[0]:
        values = [r[key] for r in runs if isinstance(r.get(key), int | float)]
        if values:
            out[key] = statistics.median(values)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", default="d560d8c", help="the earlier commit to compare with")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=8.0, help="each load run")
    parser.add_argument("--timeout", type=float, default=10.0, help="open loop: a client's patience, seconds")
    args = parser.parse_args()

    roots = {"before": worktree(args.before), "after": ROOT}
    image = sample_image(BUNDLED)
    body = json.dumps({"image": base64.b64encode(image).decode()}).encode()
    cores = client_cores()

    def closed(c: int) -> Any:
        return lambda url: run_load(url, "/embed", body, "application/json", c, args.seconds, cores)

    def opened(rate: float) -> Any:
        return lambda url: run_open_loop(url, "/embed", body, "application/json", rate, args.seconds, cores,
                                         timeout_s=args.timeout)

    runs: dict[str, dict[str, list[dict[str, Any]]]] = {v: {} for v in roots}
    servers = {v: Server(root / "service" / "default_model", root=root) for v, root in roots.items()}
    try:
        for server in servers.values():  # warm: sessions, allocator, the first batches
            run_load(server.url, "/embed", body, "application/json", 64, 2.0, cores)
        for r in range(args.rounds):
            capacity = {}
            for v, server in servers.items():
                run = measured(server, closed(64))
                capacity[v] = run["img_per_s"]
                runs[v].setdefault("capacity c=64", []).append(run)
                log(f"round {r + 1} {v} capacity {run['img_per_s']:.0f} img/s")
            for c in STORMS:
                for v, server in servers.items():
                    run = measured(server, closed(c))
                    runs[v].setdefault(f"storm c={c}", []).append(run)
                    log(f"round {r + 1} {v} storm {c}: {run['img_per_s']:.0f} img/s, "
                        f"{run['refusals_per_s']:.0f} refusals/s")
            for f in OPEN_FACTORS:
                for v, server in servers.items():
                    run = measured(server, opened(f * capacity[v]))
                    runs[v].setdefault(f"open {f}x", []).append(run)
                    log(f"round {r + 1} {v} open {f}x ({f * capacity[v]:.0f}/s): {run['img_per_s']:.0f} img/s, "
                        f"{run['refusals_per_s']:.0f} refusals/s, {run['timeouts']} timeouts")
    finally:
        for server in servers.values():
            server.stop()

    for v, root in roots.items():  # the refusal's cost: a small queue, no wait list
        server = Server(root / "service" / "default_model", root=root, env=REFUSAL_ENV)
        try:
            run_load(server.url, "/embed", body, "application/json", 64, 2.0, cores)
            for _ in range(args.rounds):
                run = measured(server, closed(256))
                per_ok = statistics.median(x["server_cpu_s"] / max(x["ok"], 1) for x in runs[v]["capacity c=64"])
                run["server_cpu_ms_per_refusal"] = (1000 * (run["server_cpu_s"] - run["ok"] * per_ok)
                                                    / max(run["refusals"], 1))
                runs[v].setdefault("refusal cost", []).append(run)
                log(f"{v} refusal cost: {run['server_cpu_ms_per_refusal']:.3f} ms per refusal")
        finally:
            server.stop()

    floor_runs = []  # the same storm against a bare ASGI app under uvicorn that refuses every request
    server = Server(BUNDLED, factory="benchmarks.refusal_floor:create_app")
    try:
        for _ in range(args.rounds):
            run = measured(server, closed(256))
            run["server_cpu_ms_per_refusal"] = 1000 * run["server_cpu_s"] / max(run["refusals"], 1)
            floor_runs.append(run)
            log(f"uvicorn floor: {run['server_cpu_ms_per_refusal']:.3f} ms per refusal")
    finally:
        server.stop()

    results = {"machine": {"cpu": platform.processor() or platform.machine(), "client_cores": list(cores)},
               "before": args.before, "after": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                                               capture_output=True, text=True).stdout.strip(),
               "seconds": args.seconds, "timeout_s": args.timeout,
               "scenarios": {v: {name: median(rs) for name, rs in by.items()} for v, by in runs.items()},
               "refusal_floor": median(floor_runs)}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(markdown(results))


def markdown(results: dict[str, Any]) -> str:
    s = results["scenarios"]
    lines = ["| scenario | before: 200s/s | refusals/s | p50 / p99 ms | after: 200s/s | refusals/s | p50 / p99 ms "
             "| after / capacity | server CPU % before / after | client CPU % |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    cap = s["after"]["capacity c=64"]["img_per_s"]
    for name in s["after"]:
        b, a = s["before"][name], s["after"][name]
        if name == "refusal cost":
            lines.append(f"| {name} (server CPU ms per refusal) | | {b['server_cpu_ms_per_refusal']:.3f} ms | | | "
                         f"{a['server_cpu_ms_per_refusal']:.3f} ms | | | {b['server_cpu_pct']:.0f} / "
                         f"{a['server_cpu_pct']:.0f} | {a['client_cpu_pct']:.0f} |")
            continue
        lines.append(f"| {name} | {b['img_per_s']:.0f} | {b['refusals_per_s']:.0f} | {b['p50_ms']:.1f} / "
                     f"{b['p99_ms']:.1f} | {a['img_per_s']:.0f} | {a['refusals_per_s']:.0f} | {a['p50_ms']:.1f} / "
                     f"{a['p99_ms']:.1f} | {a['img_per_s'] / cap:.2f} | {b['server_cpu_pct']:.0f} / "
                     f"{a['server_cpu_pct']:.0f} | {a['client_cpu_pct']:.0f} |")
    if floor := results.get("refusal_floor"):
        lines.append(f"| refusal floor: uvicorn and a bare ASGI app refusing all (server CPU ms per refusal) | | | | | "
                     f"{floor['server_cpu_ms_per_refusal']:.3f} ms | | | {floor['server_cpu_pct']:.0f} | "
                     f"{floor['client_cpu_pct']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
