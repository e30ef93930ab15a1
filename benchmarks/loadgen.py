"""HTTP load generators that leave the server its cores: pre-encoded requests on raw keep-alive sockets
(asyncio, uvloop where installed, no HTTP library per request), spread over a few processes pinned to cores of
their own.

Closed loop, `run_load(url, path, body, content_type, concurrency, seconds)` -> img/s, p50/p95/p99, errors,
client CPU. Each connection sends its request, reads the whole response (Content-Length) and sends again, so
`concurrency` requests are in flight at any time; a connection the server closes or refuses is opened again,
and each attempt's outcome is kept (`timeline=True` returns them; benchmarks/scale_out.py cuts them by fault).
A refused request is sent again at once: what a storm of naive clients does.

Open loop, `run_open_loop(url, path, body, content_type, rate, seconds, timeout_s=...)`: request i is sent at
start + i / rate whether or not earlier ones were answered (on an idle keep-alive connection, else a new one),
its latency counted from that scheduled time (a late send is the client's delay, not hidden); a client that
has waited `timeout_s` gives up and closes its connection (TIMEOUT).
Used by benchmarks/serve_engines.py, benchmarks/scale_out.py and benchmarks/overload.py; runs wherever Python
does (no `wrk` needed on the GPU host).
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import resource
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import numpy as np


@dataclass(frozen=True)
class Load:
    host: str
    port: int
    request: bytes  # the whole HTTP/1.1 request, headers and body
    connections: int
    start: float  # time.time() at which every process begins (they start together)
    seconds: float
    cores: tuple[int, ...]  # this process's CPU affinity (empty: leave it)
    rate: float = 0.0  # open loop: requests per second from this process (0: closed loop over `connections`)
    timeout_s: float = 60.0  # open loop: how long a client waits for its answer


def http_request(url: str, path: str, body: bytes = b"", content_type: str | None = None, *, method: str = "POST",
                 headers: dict[str, str] | None = None) -> bytes:
    """One raw HTTP/1.1 keep-alive request (a body and its length on POST)."""
    parts = urlsplit(url)
    head = {"Host": f"{parts.hostname}:{parts.port}", **({"Content-Type": content_type} if content_type else {}),
            **({"Content-Length": str(len(body))} if method == "POST" else {}), "Connection": "keep-alive",
            **(headers or {})}
    return (f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in head.items())
            + "\r\n").encode() + body


# outcomes without an HTTP status: no connection, the connection closed unanswered, the client gave up waiting
REFUSED, RESET, TIMEOUT = -1, -2, -3


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """Read one response: (its status code, whether the server keeps the connection open)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = dict(line.lower().split(":", 1) for line in lines[1:] if ":" in line)
    await reader.readexactly(int(headers.get("content-length", "0")))
    return status, headers.get("connection", "").strip() != "close"


async def _connection(load: Load, end: float, records: list[tuple[float, float, int]]) -> None:
    """Send, read, send again until `end`, reconnecting when the server closes or refuses (after 10 ms): a
    record (sent at, seconds, status | REFUSED | RESET) per attempt, so that a server that restarts under the
    load is measured, not fatal."""
    writer: asyncio.StreamWriter | None = None
    while time.time() < end:
        if writer is None:
            try:
                reader, writer = await asyncio.open_connection(load.host, load.port)
            except OSError:
                records.append((time.time(), 0.0, REFUSED))
                await asyncio.sleep(0.01)
                continue
        at, sent = time.time(), time.perf_counter()
        try:
            writer.write(load.request)
            status, keep_alive = await read_response(reader)
        except (OSError, asyncio.IncompleteReadError):
            status, keep_alive = RESET, False
        records.append((at, time.perf_counter() - sent, status))
        if not keep_alive:
            writer.close()
            writer = None
    if writer is not None:
        writer.close()


async def _process_main(load: Load) -> tuple[list[tuple[float, float, int]], float]:
    """(records, wall seconds until the last in-flight response came back)."""
    records: list[tuple[float, float, int]] = []
    await asyncio.sleep(max(0.0, load.start - time.time()))
    end = load.start + load.seconds
    await asyncio.gather(*(_connection(load, end, records) for _ in range(load.connections)))
    return records, time.time() - load.start


async def _open_loop_main(load: Load) -> tuple[list[tuple[float, float, int]], float]:
    """Send on schedule (`load.rate` per second) for `load.seconds`; (records, wall seconds until the last
    answer or timeout)."""
    records: list[tuple[float, float, int]] = []
    idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    pending: set[asyncio.Task[None]] = set()

    async def one(scheduled: float) -> None:
        if idle:
            reader, writer = idle.pop()
        else:
            try:
                reader, writer = await asyncio.open_connection(load.host, load.port)
            except OSError:
                records.append((scheduled, time.time() - scheduled, REFUSED))
                return
        try:
            writer.write(load.request)
            status, keep_alive = await asyncio.wait_for(read_response(reader),
                                                        scheduled + load.timeout_s - time.time())
        except TimeoutError:
            status, keep_alive = TIMEOUT, False
        except (OSError, asyncio.IncompleteReadError):
            status, keep_alive = RESET, False
        records.append((scheduled, time.time() - scheduled, status))
        if keep_alive:
            idle.append((reader, writer))
        else:
            writer.close()

    await asyncio.sleep(max(0.0, load.start - time.time()))
    for i in range(int(load.rate * load.seconds)):
        scheduled = load.start + i / load.rate
        if (delay := scheduled - time.time()) > 0:
            await asyncio.sleep(delay)
        task = asyncio.get_running_loop().create_task(one(scheduled))
        pending.add(task)
        task.add_done_callback(pending.discard)
    await asyncio.gather(*pending)
    for _, writer in idle:
        writer.close()
    return records, time.time() - load.start


def _process(load: Load) -> tuple[list[tuple[float, float, int]], float, float]:
    if load.cores:
        os.sched_setaffinity(0, load.cores)
    before = resource.getrusage(resource.RUSAGE_SELF)
    main = _open_loop_main(load) if load.rate else _process_main(load)
    try:
        import uvloop
        records, wall = uvloop.run(main)
    except ImportError:
        records, wall = asyncio.run(main)
    after = resource.getrusage(resource.RUSAGE_SELF)
    return records, wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def summarize(records: np.ndarray, wall: float) -> dict[str, float | int]:
    """Counts and latency percentiles of records [(sent at, seconds, status)] over `wall` seconds."""
    status = records[:, 2].astype(int) if len(records) else np.zeros(0, int)
    ok = records[status == 200, 1] if len(records) else np.zeros(0)
    p50, p95, p99 = (float(np.percentile(ok, q)) * 1000 if len(ok) else float("nan") for q in (50, 95, 99))
    sent = int((status != REFUSED).sum())
    return {"wall_s": wall, "requests": sent, "ok": int(len(ok)), "errors": sent - int(len(ok)),
            "refusals": int(((status == 429) | (status == 503)).sum()), "timeouts": int((status == TIMEOUT).sum()),
            "reset": int((status == RESET).sum()), "refused_connects": int((status == REFUSED).sum()),
            "img_per_s": len(ok) / wall if wall else float("nan"), "p50_ms": p50, "p95_ms": p95, "p99_ms": p99,
            "max_ms": float(ok.max()) * 1000 if len(ok) else float("nan")}


def client_cores(total: int | None = None) -> tuple[int, ...]:
    """Cores for the load generator: the last quarter (at most 4) on a host with 8 or more, else none (share)."""
    cores = sorted(os.sched_getaffinity(0))
    total = min(4, len(cores) // 4) if total is None else total
    return tuple(cores[-total:]) if total and len(cores) >= 8 else ()


def run_load(url: str, path: str, body: bytes, content_type: str, concurrency: int, seconds: float,
             cores: tuple[int, ...] = (), *, timeline: bool = False) -> dict[str, Any]:
    """`concurrency` connections for `seconds` over one process per core in `cores` (one process when empty).

    img/s and the percentiles count the 200s; `errors` every request sent that got no 200. `timeline`: also
    every record, sorted by send time (`records`: an array of rows (sent at, seconds, status | REFUSED | RESET)).
    """
    records, summary = _run(url, path, body, content_type, seconds, cores, concurrency=concurrency)
    if timeline:
        summary["records"] = records[np.argsort(records[:, 0])]
    return summary


def run_open_loop(url: str, path: str, body: bytes, content_type: str, rate: float, seconds: float,
                  cores: tuple[int, ...] = (), *, timeout_s: float = 10.0) -> dict[str, Any]:
    """`rate` requests per second for `seconds`, sent on schedule over one process per core in `cores` (one
    process when empty); img/s and the percentiles count the 200s (latency from the scheduled send)."""
    return _run(url, path, body, content_type, seconds, cores, rate=rate, timeout_s=timeout_s)[1]


def _run(url: str, path: str, body: bytes, content_type: str, seconds: float, cores: tuple[int, ...], *,
         concurrency: int = 0, rate: float = 0.0, timeout_s: float = 60.0) -> tuple[np.ndarray, dict[str, Any]]:
    parts = urlsplit(url)
    processes = max(1, min(len(cores), concurrency or len(cores))) if cores else 1
    start = time.time() + 0.5
    loads = [Load(parts.hostname or "127.0.0.1", parts.port or 80, http_request(url, path, body, content_type),
                  concurrency // processes + (1 if i < concurrency % processes else 0), start, seconds,
                  (cores[i],) if cores else (), rate / processes, timeout_s)
             for i in range(processes)]
    with mp.get_context("spawn").Pool(processes) as pool:
        results = pool.map(_process, loads)
    records = np.asarray([r for result in results for r in result[0]], dtype=float).reshape(-1, 3)
    wall = max(r[1] for r in results)
    summary: dict[str, Any] = {**summarize(records, wall), "client_processes": processes,
                               "client_cpu_pct": 100 * sum(r[2] for r in results) / wall}
    if rate:
        summary["offered_per_s"] = rate
    else:
        summary["concurrency"] = concurrency
    return records, summary
