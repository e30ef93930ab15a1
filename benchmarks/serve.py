"""`make bench`: /embed over HTTP against the raw ONNX Runtime encoder, batched and naive, on this machine.

For each model (the default model's shape, a ViT-B/16 shape in fp32 and int8; random weights
unless the bundled model exists) it measures
  - raw: the encoder session in process at batch 1..128, the best kept, of one session on all cores
    (ORT defaults) and, on a CPU, as many single-threaded runs at once as there are cores;
  - the server (`python -m service`, its own process) with batching on (max batch 32; 8 for ViT-B
    on a CPU) and off (`--max-batch-size 1`, one ORT run per request), at concurrency 1, 8 and 64,
with `wrk` (C, one thread, a pre-encoded multipart body from a Lua script) as the load
generator, so that the client takes little of the CPU the server needs; its CPU time is reported,
next to the server's (all its threads, and its event loop alone).
Raw, batched and naive are interleaved over `--rounds` rounds (both servers up throughout), and
each ratio is taken within a round; the medians are reported, as this machine's load drifts.
`--plain` adds, for scale, the /embed endpoint one writes by hand (benchmarks/plain_server.py).
Writes benchmarks/results/serve.json and prints a markdown table.

    .venv/bin/python benchmarks/serve.py [--models default,vitb] [--rounds 3] [--server-flags '...'] [--plain]
    .venv/bin/python benchmarks/serve.py --protocols --concurrency 64 [--rounds 5] [--seconds 8]
`--protocols` measures instead what the OpenAI-style layer costs: /v1/embeddings against /embed
(JSON base64, the same image bytes; and multipart) on one server, rounds interleaved.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from a source tree that pip has not installed

from model_dir.schema import read_model_json  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "serve.json"
PROTOCOL_RESULTS = ROOT / "benchmarks" / "results" / "serve_protocols.json"
CACHE = ROOT / "runs" / "bench-models"
BUNDLED = ROOT / "service" / "default_model"
WORKTREES = ROOT / "runs" / "worktrees"
BOUNDARY = "maebenchboundary"
WRK_SCRIPT = """
local f = assert(io.open(os.getenv("BENCH_BODY"), "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = os.getenv("BENCH_CONTENT_TYPE")
function done(summary, latency, requests)
  io.write(string.format('BENCH {"requests": %d, "duration_us": %d, "errors": %d, "non2xx": %d, '
    .. '"p50_us": %d, "p95_us": %d, "p99_us": %d}\\n', summary.requests, summary.duration,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    summary.errors.status, latency:percentile(50), latency:percentile(95), latency:percentile(99)))
end
"""


def log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


# -- models ------------------------------------------------------------------------------------------------


def random_model_dir(config_name: str, precisions: tuple[str, ...]) -> Path:
    """A random-weight MAE of a named config exported by mae-export (cached under runs/bench-models)."""
    out = CACHE / f"{config_name}-{'-'.join(precisions)}"
    if (out / "model.json").exists():
        return out
    import torch

    from model import Checkpoint, MaskedAutoencoderViT, get_config
    from training.export import export_model_dir

    log(f"exporting a random {config_name} ({', '.join(precisions)}) to {out} (once; cached)")
    torch.manual_seed(0)
    config = get_config(config_name)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / "random.pth"
        Checkpoint(model=MaskedAutoencoderViT(config).state_dict(), config=config, kind="mae", epoch=0,
                   args={"model": config_name}).save(checkpoint)
        export_model_dir(checkpoint, out, precisions=precisions, name=f"{config_name}-random", log=log)
    return out


def sample_image(model_dir: Path) -> bytes:
    """A request image at the model's input size: a Fashion-MNIST test PNG, or a 224x224 JPEG photo-like noise."""
    pre = read_model_json(model_dir).preprocessing
    size, channels = pre.crop, pre.channels
    fixture = ROOT / "tests" / "fixtures" / "fmnist" / "test_00000.png"
    if size == 28 and channels == "L" and fixture.exists():
        return fixture.read_bytes()
    rng = np.random.default_rng(0)
    pixels = (rng.random((size // 8, size // 8, 3)) * 255).astype(np.uint8)
    im = Image.fromarray(pixels).resize((size, size), Image.Resampling.BICUBIC)
    out = io.BytesIO()
    im.save(out, "JPEG", quality=90)
    return out.getvalue()


def multipart(image: bytes) -> bytes:
    return (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"x\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + image + f"\r\n--{BOUNDARY}--\r\n".encode()


# -- raw ONNX Runtime ---------------------------------------------------------------------------------------


class RawEncoder:
    """The encoder session alone, in process (full-image ids_keep): one session per threading mode,
    opened once and reused by the sweep and by every round."""

    def __init__(self, model_dir: Path, precision: str, device: str):
        spec = read_model_json(model_dir)
        self.arch = spec.architecture
        self.path = str(model_dir / spec.files["encoder"][precision].path)
        self.providers = (["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda"
                          else ["CPUExecutionProvider"])
        cores = len(os.sched_getaffinity(0))
        # parallel runs -> mode name: one session on every core (ORT defaults) and, on a CPU, one
        # single-threaded run per core at once
        self.modes = {1: "one_session_all_cores"}
        if device == "cpu" and cores > 1:
            self.modes[cores] = f"{cores}_parallel_single_thread_runs"
        self._sessions: dict[int, ort.InferenceSession] = {}

    def session(self, parallel: int) -> ort.InferenceSession:
        if parallel not in self._sessions:
            options = ort.SessionOptions()
            if parallel > 1:
                options.intra_op_num_threads = 1
            self._sessions[parallel] = ort.InferenceSession(self.path, options, providers=self.providers)
        return self._sessions[parallel]

    def limit(self, batches: list[int], seconds: float) -> dict[str, Any]:
        """The best images per second over the modes and batch sizes, with each mode's sweep."""
        results = {name: self.by_batch(batches, seconds, parallel) for parallel, name in self.modes.items()}
        best = max(results.values(), key=lambda r: r["img_per_s"])
        return {**best, "mode": next(k for k, v in results.items() if v is best), "modes": results}

    def by_batch(self, batches: list[int], seconds: float, parallel: int) -> dict[str, Any]:
        """Per batch size: `parallel` threads each calling the session in a loop (ORT releases the GIL)."""
        from concurrent.futures import ThreadPoolExecutor

        a, session = self.arch, self.session(parallel)
        by_batch: dict[int, float] = {}
        for batch in batches:
            feeds = {"pixels": np.random.default_rng(0).standard_normal(
                         (batch, a.in_chans, a.img_size, a.img_size)).astype(np.float32),
                     "ids_keep": np.tile(np.arange(a.num_patches, dtype=np.int64), (batch, 1))}
            session.run(None, feeds)
            start = time.perf_counter()
            with ThreadPoolExecutor(parallel) as pool:
                jobs = [pool.submit(_run_until, session, feeds, start + seconds) for _ in range(parallel)]
                runs = sum(job.result() for job in jobs)
            elapsed = time.perf_counter() - start
            by_batch[batch] = runs * batch / elapsed
            if elapsed * parallel / runs > seconds / 2:  # larger batches of a slow model would only cost minutes
                break
        best = max(by_batch, key=by_batch.get)
        return {"img_per_s": by_batch[best], "best_batch": best, "by_batch": by_batch, "parallel": parallel,
                "providers": session.get_providers()}


def _run_until(session: ort.InferenceSession, feeds: dict[str, np.ndarray], end: float) -> int:
    """Run the session until `end` (perf_counter), at least twice; the number of runs."""
    runs = 0
    while time.perf_counter() < end or runs < 2:
        session.run(None, feeds)
        runs += 1
    return runs


# -- the server and the load generator ---------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int, thread: int | None = None) -> float:
    """User + system CPU seconds of a process and its live children (uvicorn's workers), or of one
    of its threads (`thread`: the thread id; the process id itself is the main thread, the event loop)."""
    stat = Path(f"/proc/{pid}/task/{thread}/stat" if thread else f"/proc/{pid}/stat")
    try:
        fields = stat.read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    total = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    if thread:
        return total
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        total += sum(cpu_seconds(int(child)) for child in children.read_text().split())
    return total


def worktree(commit: str) -> Path:
    """A checkout of `commit` under runs/worktrees (the bundled model is tracked, so it is there too)."""
    sha = subprocess.run(["git", "rev-parse", "--short", commit], cwd=ROOT, check=True, capture_output=True,
                         text=True).stdout.strip()
    path = WORKTREES / sha
    if not path.is_dir():
        WORKTREES.mkdir(parents=True, exist_ok=True)
        subprocess.run(["git", "worktree", "add", "--detach", str(path), sha], cwd=ROOT, check=True,
                       capture_output=True)
    return path


class Server:
    """`python -m service` in its own process on a free port, or (`plain`) benchmarks/plain_server.py."""

    def __init__(self, model_dir: Path, *flags: str, plain: bool = False, root: Path = ROOT,
                 env: dict[str, str] | None = None, factory: str | None = None):
        """`root`: the checkout whose code runs (another commit's `git worktree`, for a before/after); `env`: more
        environment (MAE_* settings); `factory`: instead of `python -m service`, uvicorn on this app factory
        (`module:function`, settings from the environment)."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.plain = plain  # no /metrics: nothing to drain or to count batches in
        env = {**os.environ, "PYTHONPATH": str(root), **(env or {})}
        if plain:
            cmd = [sys.executable, "-m", "uvicorn", "benchmarks.plain_server:app", "--port", str(self.port),
                   "--log-level", "warning"]
            env["MAE_MODEL_DIR"] = str(model_dir)
        elif factory:
            cmd = [sys.executable, "-m", "uvicorn", "--factory", factory, "--port", str(self.port),
                   "--log-level", "warning", *flags]
            env["MAE_MODEL_DIR"] = str(model_dir)
        else:
            cmd = [sys.executable, "-m", "service", "--model-dir", str(model_dir), "--port", str(self.port),
                   "--log-level", "warning", *flags]
        self.proc = subprocess.Popen(cmd, cwd=root, env=env)
        deadline = time.monotonic() + 300
        while not self._ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start: {' '.join(cmd)}")
            time.sleep(0.2)

    def _ready(self) -> bool:
        import urllib.request
        try:
            with urllib.request.urlopen(f"{self.url}/health/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def batch_stats(self) -> tuple[float, float, float | None]:
        """(sum, count) of the encoder queue's batch-size histogram (one image per call on the plain server), and
        the bytes the engine returned for the encoder graph (None where the server has no such metric)."""
        import urllib.request
        if self.plain:
            return 0.0, 0.0, None
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=10) as r:
            text = r.read().decode()
        found = {m.group(1): float(m.group(2)) for m in
                 re.finditer(r'^mae_batch_size_(sum|count)\{queue="encoder"\} (\S+)$', text, re.MULTILINE)}
        copied = re.search(r'^mae_engine_output_bytes_total\{graph="encoder"\} (\S+)$', text, re.MULTILINE)
        return found.get("sum", 0.0), found.get("count", 0.0), float(copied.group(1)) if copied else None

    def drain(self, timeout: float = 300.0) -> None:
        """Wait until requests left over by a finished load run (closed connections) have been computed."""
        import urllib.request
        if self.plain:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with urllib.request.urlopen(f"{self.url}/metrics", timeout=10) as r:
                found = re.search(r"^mae_requests_in_flight (\S+)$", r.read().decode(), re.MULTILINE)
            if found and float(found.group(1)) <= 1:  # this request itself
                return
            time.sleep(0.1)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@dataclass(frozen=True)
class Body:
    """A request wrk sends over and over: the route, the body file and its content type."""

    path: str
    file: Path
    content_type: str = f"multipart/form-data; boundary={BOUNDARY}"


def wrk(url: str, body: Body, script: Path, concurrency: int, seconds: float) -> dict[str, Any]:
    """One closed-loop run of `wrk` (one thread); latency percentiles, throughput and the client's CPU time."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(["wrk", "-t1", f"-c{concurrency}", f"-d{max(1, round(seconds))}s", "--timeout", "60s", "-s", str(script),
                           f"{url}{body.path}"], capture_output=True, text=True,
                          env={**os.environ, "BENCH_BODY": str(body.file), "BENCH_CONTENT_TYPE": body.content_type},
                          check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    line = next(x for x in done.stdout.splitlines() if x.startswith("BENCH "))
    r = json.loads(line[len("BENCH "):])
    client_cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"concurrency": concurrency, "wall_s": r["duration_us"] / 1e6, "requests": r["requests"],
            "errors": r["errors"] + r["non2xx"],
            "img_per_s": r["requests"] / (r["duration_us"] / 1e6),
            "p50_ms": r["p50_us"] / 1000, "p95_ms": r["p95_us"] / 1000, "p99_ms": r["p99_us"] / 1000,
            "client_cpu_pct": 100 * client_cpu / (r["duration_us"] / 1e6)}


def measure(server: Server, body: Body, script: Path, concurrency: int, seconds: float) -> dict[str, Any]:
    """One wrk run against a server, with its CPU share (all its processes) and the mean batch size it ran
    (from /metrics, which adds up every worker's when there are several)."""
    server.drain()
    s0, n0, b0 = server.batch_stats()
    pid = server.proc.pid
    cpu0, loop0 = cpu_seconds(pid), cpu_seconds(pid, thread=pid)
    run = wrk(server.url, body, script, concurrency, seconds)
    run["server_cpu_pct"] = 100 * (cpu_seconds(pid) - cpu0) / run["wall_s"]
    run["event_loop_cpu_pct"] = 100 * (cpu_seconds(pid, thread=pid) - loop0) / run["wall_s"]
    server.drain()  # requests still queued when wrk stopped belong to this run's batches
    s1, n1, b1 = server.batch_stats()
    run["mean_batch"] = (s1 - s0) / max(n1 - n0, 1) if not server.plain else 1.0
    # bytes the engine handed back per image computed (the latent, or on a GPU the pooled tokens)
    run["engine_output_bytes_per_image"] = (b1 - b0) / max(s1 - s0, 1) if b0 is not None and b1 is not None else None
    return run


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The per-field median of repeated runs at one concurrency (requests and errors summed)."""
    out: dict[str, Any] = {"concurrency": runs[0]["concurrency"], "rounds": len(runs),
                           "requests": sum(r["requests"] for r in runs), "errors": sum(r["errors"] for r in runs)}
    for key in ("img_per_s", "p50_ms", "p95_ms", "p99_ms", "server_cpu_pct", "event_loop_cpu_pct", "client_cpu_pct",
                "mean_batch", "engine_output_bytes_per_image"):
        values = [r[key] for r in runs if r.get(key) is not None]
        out[key] = statistics.median(values) if values else None
    return out


# -- report --------------------------------------------------------------------------------------------------


def bench_model(label: str, model_dir: Path, precision: str, device: str, args: argparse.Namespace,
                work: Path, max_batch_size: int) -> dict[str, Any]:
    """Raw, batched and naive, interleaved: each round measures the raw session again, then every
    concurrency on both servers (both running throughout, order alternating per round); ratios are
    taken within a round and their median reported, so drifts in machine load hit both sides alike."""
    log(f"{label} ({precision}) from {model_dir}")
    body_file = Body("/embed", work / f"{label}.body")
    body_file.file.write_bytes(multipart(sample_image(model_dir)))
    script = work / "post.lua"
    script.write_text(WRK_SCRIPT)
    encoder = RawEncoder(model_dir, precision, device)
    raw = encoder.limit(args.raw_batches, args.raw_seconds)
    log(f"  raw: {raw['img_per_s']:.1f} img/s at batch {raw['best_batch']} ({raw['mode']}); "
        + ", ".join(f"{k}: {v['img_per_s']:.1f}" for k, v in raw["modes"].items()))
    # A run must span several full batches and several turns of every client, or the closed loop's
    # start-up (all c requests at once) dominates slow models: at c=64 and 5 img/s one turn is 13 s.
    def seconds_for(c: int) -> float:
        return max(args.seconds, min(45.0, 3 * max(2 * max_batch_size, c) / raw["img_per_s"]))
    extra = args.server_flags.split()
    flags = {"batched": ["--max-batch-size", str(max_batch_size), *extra], "naive": ["--max-batch-size", "1", *extra]}
    servers: dict[str, Server] = {}
    rounds = []
    try:
        for kind, f in flags.items():
            servers[kind] = Server(model_dir, "--precision", precision, "--device", device, *f)
            log(f"  {kind} server: mae-serve {' '.join(f)}")
        if args.before:
            servers["before"] = Server(model_dir, "--precision", precision, "--device", device, *flags["batched"],
                                       root=worktree(args.before))
            log(f"  before server: mae-serve {' '.join(flags['batched'])} at {args.before}")
        if args.plain and precision == "fp32" and device == "cpu":
            servers["plain"] = Server(model_dir, plain=True)
            log("  plain server: benchmarks/plain_server.py (a hand-written FastAPI endpoint, for scale)")
        for server in servers.values():
            wrk(server.url, body_file, script, 8, 2)  # warm-up: allocations for the batch sizes to come
        for server in servers.values():  # before the first raw measurement: a slow model's warm-up backlog
            server.drain()               # would otherwise still be running beside it
        for i in range(args.rounds):
            order = list(servers) if i % 2 == 0 else list(reversed(servers))
            raw_now = encoder.by_batch([raw["best_batch"]], args.raw_seconds, raw["parallel"])["img_per_s"]
            runs: dict[str, dict[int, dict[str, Any]]] = {kind: {} for kind in servers}
            for c in args.concurrency:
                for kind in order:
                    run = runs[kind][c] = measure(servers[kind], body_file, script, c, seconds_for(c))
                    log(f"  round {i + 1} {kind} c={c}: {run['img_per_s']:.1f} img/s, p50 {run['p50_ms']:.2f} ms, "
                        f"mean batch {run['mean_batch']:.1f}, errors {run['errors']}")
            rounds.append({"raw_img_per_s": raw_now, "runs": runs})
            log(f"  round {i + 1} raw: {raw_now:.1f} img/s")
    finally:
        for server in servers.values():
            server.stop()
    top = max(args.concurrency)
    per_round = {
        f"server_over_raw_c{top}": [r["runs"]["batched"][top]["img_per_s"] / r["raw_img_per_s"] for r in rounds],
        f"batched_over_naive_c{top}": [r["runs"]["batched"][top]["img_per_s"] / r["runs"]["naive"][top]["img_per_s"]
                                       for r in rounds],
    }
    if "before" in servers:
        per_round[f"before_server_over_raw_c{top}"] = [r["runs"]["before"][top]["img_per_s"] / r["raw_img_per_s"]
                                                       for r in rounds]
        per_round[f"batched_over_before_c{top}"] = [
            r["runs"]["batched"][top]["img_per_s"] / r["runs"]["before"][top]["img_per_s"] for r in rounds]
    if "plain" in servers:
        per_round[f"batched_over_plain_c{top}"] = [
            r["runs"]["batched"][top]["img_per_s"] / r["runs"]["plain"][top]["img_per_s"] for r in rounds]
    if 1 in args.concurrency:
        per_round["p50_c1_batched_over_naive"] = [r["runs"]["batched"][1]["p50_ms"] / r["runs"]["naive"][1]["p50_ms"]
                                                  for r in rounds]
        if "plain" in servers:
            per_round["p50_c1_batched_over_plain"] = [
                r["runs"]["batched"][1]["p50_ms"] / r["runs"]["plain"][1]["p50_ms"] for r in rounds]
    raw["img_per_s_rounds"] = [r["raw_img_per_s"] for r in rounds]
    raw["img_per_s_median"] = statistics.median(raw["img_per_s_rounds"])
    return {"model": label, "model_dir": str(model_dir), "precision": precision, "device": device,
            "request_bytes": body_file.file.stat().st_size, "server_flags": flags, "rounds": args.rounds,
            "seconds_per_run": {c: seconds_for(c) for c in args.concurrency}, "raw": raw,
            **{kind: [median_run([r["runs"][kind][c] for r in rounds]) for c in args.concurrency] for kind in servers},
            "rounds_detail": rounds,
            "ratios": {name: statistics.median(values) for name, values in per_round.items()},
            "ratios_per_round": per_round}


def bench_protocols(model_dir: Path, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """/v1/embeddings against /embed on one batched server, the same image in every request, rounds
    interleaved (order alternating): the cost of the OpenAI-style layer. /embed is sent as JSON base64
    (the same bytes to decode as /v1/embeddings') and, for reference, as multipart."""
    image = sample_image(model_dir)
    name = read_model_json(model_dir).name
    encoded = base64.b64encode(image).decode()
    bodies = {"embed_multipart": Body("/embed", work / "embed.multipart"),
              "embed_json": Body("/embed", work / "embed.json", "application/json"),
              "v1_embeddings": Body("/v1/embeddings", work / "v1.json", "application/json")}
    bodies["embed_multipart"].file.write_bytes(multipart(image))
    bodies["embed_json"].file.write_text(json.dumps({"images": [encoded], "encoding_format": "float"}))
    bodies["v1_embeddings"].file.write_text(json.dumps({"model": name, "input": [f"data:image/png;base64,{encoded}"],
                                                        "encoding_format": "float"}))
    script = work / "post.lua"
    script.write_text(WRK_SCRIPT)
    flags = ["--max-batch-size", "32", *args.server_flags.split()]
    server = Server(model_dir, *flags)
    c = max(args.concurrency)
    rounds: list[dict[str, dict[str, Any]]] = []
    try:
        for body in bodies.values():
            wrk(server.url, body, script, 8, 2)  # warm-up
        for i in range(args.rounds):
            order = list(bodies) if i % 2 == 0 else list(reversed(bodies))
            runs = {kind: measure(server, bodies[kind], script, c, args.seconds) for kind in order}
            for kind, run in runs.items():
                log(f"  round {i + 1} {kind} c={c}: {run['img_per_s']:.1f} img/s, p50 {run['p50_ms']:.2f} ms, "
                    f"mean batch {run['mean_batch']:.1f}, errors {run['errors']}")
            rounds.append(runs)
    finally:
        server.stop()
    per_round = {f"v1_embeddings_over_embed_json_c{c}": [r["v1_embeddings"]["img_per_s"] / r["embed_json"]["img_per_s"]
                                                         for r in rounds],
                 f"v1_embeddings_over_embed_multipart_c{c}": [
                     r["v1_embeddings"]["img_per_s"] / r["embed_multipart"]["img_per_s"] for r in rounds]}
    return {"model": name, "model_dir": str(model_dir), "server_flags": flags, "concurrency": c,
            "seconds_per_run": args.seconds, "rounds": args.rounds,
            "request_bytes": {k: b.file.stat().st_size for k, b in bodies.items()},
            **{kind: median_run([r[kind] for r in rounds]) for kind in bodies},
            "ratios": {k: statistics.median(v) for k, v in per_round.items()}, "ratios_per_round": per_round}


def markdown(results: list[dict[str, Any]]) -> str:
    lines = ["| model | precision | server | concurrency | img/s | p50 ms | p95 ms | p99 ms | mean batch | "
             "server CPU % (event loop) | client CPU % | errors |", "|" + "---|" * 12]
    for r in results:
        lines.append(f"| {r['model']} | {r['precision']} | raw ORT (batch {r['raw']['best_batch']}, {r['raw']['mode']}) | | "
                     f"{r['raw']['img_per_s_median']:.1f} | | | | {r['raw']['best_batch']} | | | |")
        for kind in ("batched", "before", "naive", "plain"):
            for x in r.get(kind, []):
                lines.append(f"| {r['model']} | {r['precision']} | {kind} | {x['concurrency']} | {x['img_per_s']:.1f} | "
                             f"{x['p50_ms']:.2f} | {x['p95_ms']:.2f} | {x['p99_ms']:.2f} | "
                             f"{'' if x['mean_batch'] is None else round(x['mean_batch'], 1)} | "
                             f"{x['server_cpu_pct']:.0f} ({x['event_loop_cpu_pct']:.0f}) | {x['client_cpu_pct']:.0f} | "
                             f"{x['errors']} |")
    lines += ["", "| model | precision | ratio | value |", "|---|---|---|---|"]
    for r in results:
        for name, value in r["ratios"].items():
            lines.append(f"| {r['model']} | {r['precision']} | {name} | {'' if value is None else f'{value:.2f}'} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="default,vitb", help="default (the default model's shape), vitb")
    p.add_argument("--precisions", default="fp32,int8", help="for vitb: fp32, fp16 (GPU), int8 (CPU)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--concurrency", default="1,8,64", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--seconds", type=float, default=5.0, help="per wrk run (longer for slow models)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported")
    p.add_argument("--raw-seconds", type=float, default=2.0, help="per raw batch size")
    p.add_argument("--raw-batches", default="1,4,8,16,32,64,128", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--vitb-batch", type=int, default=8,
                   help="server max batch size for ViT-B (CPU throughput is flat past ~8; 32 on a GPU)")
    p.add_argument("--server-flags", default="", help="more mae-serve flags, the same for the batched and the naive "
                   "server (e.g. '--inference-threads 1 --intra-op-threads 0')")
    p.add_argument("--before", help="also the batched server of an earlier commit (a git worktree under runs/), "
                   "in the same rounds: before/after ratios")
    p.add_argument("--plain", action="store_true", help="also a hand-written FastAPI endpoint, one ORT call per "
                   "request (benchmarks/plain_server.py; fp32 on a CPU), for scale")
    p.add_argument("--protocols", action="store_true", help="instead: /v1/embeddings against /embed on the "
                   "default model at the top concurrency, interleaved rounds (writes serve_protocols.json)")
    p.add_argument("--out", type=Path, default=None, help=f"default {RESULTS} ({PROTOCOL_RESULTS} with --protocols)")
    args = p.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("bench: wrk is not installed (apt-get install wrk)")
    if args.protocols:
        main_protocols(args)
        return
    args.out = args.out or RESULTS
    precisions = tuple(args.precisions.split(","))
    started = time.time()
    load_before = os.getloadavg()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            if name == "default":
                if BUNDLED.is_dir():
                    results.append(bench_model("default (bundled)", BUNDLED, "fp32", args.device, args, Path(tmp), 32))
                else:
                    model_dir = random_model_dir("mae_vit_tiny_fmnist", ("fp32",))
                    results.append(bench_model("mae_vit_tiny_fmnist (random)", model_dir, "fp32", args.device, args,
                                               Path(tmp), 32))
            elif name == "vitb":
                model_dir = random_model_dir("mae_vit_base_patch16", tuple(sorted(set(("fp32",) + precisions))))
                for precision in precisions:
                    results.append(bench_model("vit_b16 (random)", model_dir, precision, args.device, args, Path(tmp),
                                               args.vitb_batch))
            else:
                sys.exit(f"bench: unknown model {name!r} (default, vitb)")
    for r in results:  # reduced precision against fp32 of the same model, batched server at the top concurrency
        fp32 = next((x for x in results if x["model"] == r["model"] and x["precision"] == "fp32"), None)
        if fp32 is not None and r is not fp32:
            top = max(args.concurrency)
            served = {x["precision"]: next(c for c in x["batched"] if c["concurrency"] == top)["img_per_s"]
                      for x in (r, fp32)}
            r["ratios"][f"server_{r['precision']}_over_fp32_c{top}"] = served[r["precision"]] / served["fp32"]
            r["ratios"][f"raw_{r['precision']}_over_fp32"] = r["raw"]["img_per_s_median"] / fp32["raw"]["img_per_s_median"]
    report = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "cpu_count": os.cpu_count(), "machine": platform.machine(),
              "onnxruntime": ort.__version__, "load_average_before": load_before, "load_average_after": os.getloadavg(),
              "wall_s": time.time() - started, "load_generator": "wrk -t1, pre-encoded multipart body (Lua)",
              "min_seconds_per_run": args.seconds, "rounds": args.rounds, "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(markdown(results))
    print(f"\nbench: {len(results)} models in {report['wall_s']:.0f} s; load average before {load_before[0]:.2f}, "
          f"after {report['load_average_after'][0]:.2f}; wrote {args.out}")


def main_protocols(args: argparse.Namespace) -> None:
    model_dir = BUNDLED if BUNDLED.is_dir() else random_model_dir("mae_vit_tiny_fmnist", ("fp32",))
    load_before, started = os.getloadavg(), time.time()
    with tempfile.TemporaryDirectory() as tmp:
        result = bench_protocols(model_dir, args, Path(tmp))
    report = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "cpu_count": os.cpu_count(), "machine": platform.machine(),
              "onnxruntime": ort.__version__, "load_average_before": load_before, "load_average_after": os.getloadavg(),
              "wall_s": time.time() - started, "load_generator": "wrk -t1, pre-encoded bodies (Lua)", "result": result}
    out = args.out or PROTOCOL_RESULTS
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    lines = ["| request | img/s | p50 ms | p99 ms | mean batch | server CPU % | errors |", "|" + "---|" * 7]
    for kind in ("embed_multipart", "embed_json", "v1_embeddings"):
        x = result[kind]
        lines.append(f"| {kind} | {x['img_per_s']:.1f} | {x['p50_ms']:.2f} | {x['p99_ms']:.2f} | "
                     f"{x['mean_batch']:.1f} | {x['server_cpu_pct']:.0f} | {x['errors']} |")
    lines += [f"| ratio {k} | {v:.3f} (per round: {', '.join(f'{r:.3f}' for r in result['ratios_per_round'][k])}) |"
              for k, v in result["ratios"].items()]
    print("\n".join(lines))
    print(f"\nbench: {report['wall_s']:.0f} s; load average before {load_before[0]:.2f}, "
          f"after {report['load_average_after'][0]:.2f}; wrote {out}")


if __name__ == "__main__":
    main()
