"""Replicas of the CPU image behind nginx, under steady load, through faults: what a client sees.

Three containers of mae-serve:cpu (`make image`), hardened as in production, behind Debian's nginx running
docker/nginx.conf over their ports (its retries on a connect error, a timeout, a 502 or a 503). Load: the
closed-loop generator of benchmarks/loadgen.py, `--concurrency` keep-alive connections to nginx, /classify
with one 28x28 PNG. Phases:
  throughput  nginx over 1 replica vs over all of them, interleaved over `--rounds` rounds (medians);
  kill        one replica SIGKILLed mid-load (its in-flight requests counted from its /metrics just before),
              then started again (an orchestrator's restart) and back in rotation once ready;
  rolling     every replica in turn: SIGTERM (`podman stop`, drain), start, wait for readiness: a rolling update;
  stall       one replica SIGSTOPped for `--stall-seconds`, then SIGCONT (a hung process that still accepts
              connections), behind docker/nginx.conf and again behind an nginx whose proxy_read_timeout is
              `--short-read-timeout`.
For each fault: requests sent, answered 200, failed (any other status or a connection closed unanswered), and
p50/p99 of the 200s over the whole phase and inside the fault window. Writes --out as JSON, prints a table.

    .venv/bin/python benchmarks/scale_out.py [--replicas 3] [--concurrency 64] [--seconds 10] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import signal
import statistics
import sys
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.containers import Container, Nginx, podman_problem  # noqa: E402
from benchmarks.loadgen import run_load, summarize  # noqa: E402

IMAGE = "mae-serve:cpu"
BOUNDARY = "maescaleboundary"
SAMPLE = ROOT / "service" / "samples" / "sneaker.png"


def classify_body() -> tuple[bytes, str]:
    body = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"x.png\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode() + SAMPLE.read_bytes() + f"\r\n--{BOUNDARY}--\r\n".encode()
    return body, f"multipart/form-data; boundary={BOUNDARY}"


def in_flight(url: str) -> int:
    """Requests the replica is handling now, less the scrape itself."""
    text = httpx.get(f"{url}/metrics", timeout=5).text
    return int(float(re.search(r"^mae_requests_in_flight (\S+)$", text, re.M).group(1))) - 1


class Timeline:
    """Events of a fault (time.time() stamps), to cut the load's records into windows."""

    def __init__(self) -> None:
        self.events: list[tuple[float, str]] = []

    def mark(self, what: str) -> None:
        self.events.append((time.time(), what))

    def at(self, what: str) -> float:
        return next(t for t, w in self.events if w == what)


def under_load(url: str, concurrency: int, seconds: float, fault) -> tuple[dict[str, Any], Timeline]:
    """Run `fault(timeline)` in this thread while the load runs in another; the load's summary with records."""
    body, content_type = classify_body()
    result: dict[str, Any] = {}
    load = threading.Thread(target=lambda: result.update(
        run_load(url, "/classify", body, content_type, concurrency, seconds, timeline=True)))
    timeline = Timeline()
    timeline.mark("load")
    load.start()
    fault(timeline)
    timeline.mark("fault done")
    load.join()
    if timeline.at("fault done") > timeline.at("load") + seconds:
        raise RuntimeError(f"the fault outlasted the load ({seconds} s): give it more --fault-seconds")
    return result, timeline


def window(records: np.ndarray, start: float, end: float) -> dict[str, Any]:
    inside = records[(records[:, 0] >= start) & (records[:, 0] < end)]
    return {"from_s": start, "to_s": end, **summarize(inside, end - start)}


def report(result: dict[str, Any], timeline: Timeline, start: str, end: str, **extra: Any) -> dict[str, Any]:
    records = result.pop("records")
    t0 = timeline.at("load")
    fault = window(records, timeline.at(start), timeline.at(end))
    fault["from_s"] -= t0
    fault["to_s"] -= t0
    return {**{k: v for k, v in result.items() if k != "wall_s"}, "seconds": result["wall_s"],
            "events": [(round(t - t0, 3), w) for t, w in timeline.events], "fault_window": fault, **extra}


def kill_one(replicas: list[Container], lead_s: float):
    def fault(timeline: Timeline) -> None:
        victim = replicas[len(replicas) // 2]
        time.sleep(lead_s)
        inside = in_flight(victim.url)
        timeline.mark("kill")
        victim.kill()
        fault.in_flight_at_kill = inside  # type: ignore[attr-defined]
        victim.start()
        timeline.mark("started")
        fault.ready_s = victim.wait_ready()  # type: ignore[attr-defined]
        timeline.mark("ready")
    return fault


def stall_one(replicas: list[Container], lead_s: float, stall_s: float):
    """SIGSTOP one replica for `stall_s`, then SIGCONT: a process that hangs without dying (its sockets still
    accept connections: the kernel completes the handshakes)."""
    def fault(timeline: Timeline) -> None:
        victim = replicas[0]
        time.sleep(lead_s)
        fault.in_flight_at_stall = in_flight(victim.url)  # type: ignore[attr-defined]
        timeline.mark("stall")
        victim.kill(signal.SIGSTOP)
        time.sleep(stall_s)
        victim.kill(signal.SIGCONT)
        timeline.mark("resumed")
    return fault


def rolling(replicas: list[Container], lead_s: float, grace_s: int):
    def fault(timeline: Timeline) -> None:
        time.sleep(lead_s)
        timeline.mark("rolling")
        fault.steps = []  # type: ignore[attr-defined]
        for replica in replicas:
            stop_s = replica.stop(grace_s)
            replica.start()
            ready_s = replica.wait_ready()
            fault.steps.append({"replica": replica.name, "stop_s": round(stop_s, 2), "ready_s": round(ready_s, 2),
                                "exit_code": replica.exit_code()})  # type: ignore[attr-defined]
        timeline.mark("rolled")
    return fault


def run(args: argparse.Namespace) -> dict[str, Any]:
    with ExitStack() as stack:
        replicas = [stack.enter_context(Container(args.image, f"mae-replica-{i}")) for i in range(args.replicas)]
        for replica in replicas:
            replica.wait_ready()
        one = stack.enter_context(Nginx([f"127.0.0.1:{replicas[0].port}"]))
        many = stack.enter_context(Nginx([f"127.0.0.1:{r.port}" for r in replicas]))
        body, content_type = classify_body()
        run_load(many.url, "/classify", body, content_type, args.concurrency, 2.0)  # warm every replica
        rounds = []
        for i in range(args.rounds):
            order = [("1", one), (str(args.replicas), many)][:: 1 if i % 2 == 0 else -1]
            rounds.append({n: run_load(lb.url, "/classify", body, content_type, args.concurrency, args.seconds)
                           for n, lb in order})
            print(f"round {i + 1}: " + ", ".join(f"{n} replica(s) {r['img_per_s']:.0f}/s" for n, r in rounds[-1].items()),
                  file=sys.stderr)
        throughput = {n: {"img_per_s_median": statistics.median(r[n]["img_per_s"] for r in rounds),
                          "p99_ms_median": statistics.median(r[n]["p99_ms"] for r in rounds),
                          "errors": sum(r[n]["errors"] for r in rounds)} for n in rounds[0]}
        ratio = statistics.median(r[str(args.replicas)]["img_per_s"] / r["1"]["img_per_s"] for r in rounds)

        fault = kill_one(replicas, args.lead_seconds)
        result, timeline = under_load(many.url, args.concurrency, args.fault_seconds, fault)
        kill = report(result, timeline, "kill", "ready", in_flight_at_kill=fault.in_flight_at_kill,
                      restart_ready_s=fault.ready_s)
        print(f"kill: {kill['requests']} sent, {kill['ok']} answered 200, {kill['errors']} failed", file=sys.stderr)

        fault = rolling(replicas, args.lead_seconds, args.grace_seconds)
        result, timeline = under_load(many.url, args.concurrency, args.fault_seconds, fault)
        roll = report(result, timeline, "rolling", "rolled", steps=fault.steps)
        print(f"rolling: {roll['requests']} sent, {roll['ok']} answered 200, {roll['errors']} failed", file=sys.stderr)

        fault = stall_one(replicas, args.lead_seconds, args.stall_seconds)
        result, timeline = under_load(many.url, args.concurrency, args.fault_seconds, fault)
        stall = report(result, timeline, "stall", "resumed", in_flight_at_stall=fault.in_flight_at_stall)
        print(f"stall: {stall['requests']} sent, {stall['ok']} answered 200, {stall['errors']} failed", file=sys.stderr)

        # the same stall behind an nginx that gives up on a silent replica sooner (proxy_read_timeout)
        short = stack.enter_context(Nginx([f"127.0.0.1:{r.port}" for r in replicas],
                                          read_timeout_s=args.short_read_timeout))
        fault = stall_one(replicas, args.lead_seconds, args.stall_seconds)
        result, timeline = under_load(short.url, args.concurrency, args.fault_seconds, fault)
        stall_short = report(result, timeline, "stall", "resumed", in_flight_at_stall=fault.in_flight_at_stall,
                             proxy_read_timeout_s=args.short_read_timeout)
        print(f"stall, proxy_read_timeout {args.short_read_timeout} s: {stall_short['requests']} sent, "
              f"{stall_short['ok']} answered 200, {stall_short['errors']} failed", file=sys.stderr)
        nginx_errors = many.error_log()
    return {"replicas": args.replicas, "concurrency": args.concurrency, "image": args.image,
            "throughput": throughput, "throughput_ratio_n_over_1": ratio, "rounds": rounds, "kill": kill,
            "rolling": roll, "stall": stall, "stall_short_read_timeout": stall_short, "nginx_error_log_lines": len(nginx_errors.splitlines()),
            "machine": {"cpu": cpu_model(), "cores": len(__import__("os").sched_getaffinity(0)),
                        "python": platform.python_version()}}


def cpu_model() -> str:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    match = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    return match.group(1) if match else platform.processor()


def table(r: dict[str, Any]) -> str:
    lines = ["| phase | sent | 200 | failed | p50 ms | p99 ms | max ms | fault window | p99 ms in window |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name in ("kill", "rolling", "stall", "stall_short_read_timeout"):
        x, w = r[name], r[name]["fault_window"]
        lines.append(f"| {name} | {x['requests']} | {x['ok']} | {x['errors']} | {x['p50_ms']:.1f} | {x['p99_ms']:.1f} | {x['max_ms']:.0f} | "
                     f"{w['from_s']:.1f}-{w['to_s']:.1f} s ({w['requests']} sent, {w['errors']} failed) | "
                     f"{w['p99_ms']:.1f} |")
    t = r["throughput"]
    lines.append("")
    lines.append(f"throughput (median of {len(r['rounds'])} rounds): 1 replica {t['1']['img_per_s_median']:.0f} img/s, "
                 f"{r['replicas']} replicas {t[str(r['replicas'])]['img_per_s_median']:.0f} img/s, "
                 f"ratio {r['throughput_ratio_n_over_1']:.2f}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", default=IMAGE)
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=10.0, help="each throughput measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--fault-seconds", type=float, default=60.0, help="load duration of each fault phase")
    parser.add_argument("--lead-seconds", type=float, default=5.0, help="steady load before the fault")
    parser.add_argument("--grace-seconds", type=int, default=40, help="podman stop's grace before SIGKILL")
    parser.add_argument("--stall-seconds", type=float, default=20.0, help="how long the stalled replica is stopped")
    parser.add_argument("--short-read-timeout", type=int, default=5,
                        help="proxy_read_timeout (s) of the second stall phase (docker/nginx.conf: 60)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "scale_out.json")
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    problem = podman_problem()
    if problem:
        sys.exit(f"scale_out: {problem}")
    result = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(table(result))


if __name__ == "__main__":
    main()
