"""A closed-loop HTTP load generator that leaves the server its cores: pre-encoded requests on raw keep-alive
sockets (asyncio, no HTTP library per request), spread over a few processes pinned to cores of their own.

`run_load(url, path, body, content_type, concurrency, seconds)` -> img/s, p50/p95/p99, errors, client CPU.
Each connection sends its request, reads the whole response (Content-Length) and sends again, so
`concurrency` requests are in flight at any time. Used by benchmarks/serve_engines.py; runs wherever
Python does (no `wrk` needed on the GPU host).
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import resource
import time
from dataclasses import dataclass
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


def http_request(url: str, path: str, body: bytes, content_type: str) -> bytes:
    parts = urlsplit(url)
    head = (f"POST {path} HTTP/1.1\r\nHost: {parts.hostname}:{parts.port}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n")
    return head.encode() + body


async def _read_response(reader: asyncio.StreamReader) -> int:
    """Read one response; its status code."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    length = next((int(line.split(":", 1)[1]) for line in lines[1:] if line.lower().startswith("content-length:")), 0)
    await reader.readexactly(length)
    return status


async def _connection(load: Load, end: float, latencies: list[float], errors: list[int]) -> None:
    reader, writer = await asyncio.open_connection(load.host, load.port)
    try:
        while time.time() < end:
            sent = time.perf_counter()
            writer.write(load.request)
            status = await _read_response(reader)
            latencies.append(time.perf_counter() - sent)
            if status != 200:
                errors.append(status)
    finally:
        writer.close()


async def _process_main(load: Load) -> tuple[list[float], list[int], float]:
    """(latencies, error statuses, wall seconds until the last in-flight response came back)."""
    latencies: list[float] = []
    errors: list[int] = []
    await asyncio.sleep(max(0.0, load.start - time.time()))
    end = load.start + load.seconds
    await asyncio.gather(*(_connection(load, end, latencies, errors) for _ in range(load.connections)))
    return latencies, errors, time.time() - load.start


def _process(load: Load) -> tuple[list[float], list[int], float, float]:
    if load.cores:
        os.sched_setaffinity(0, load.cores)
    before = resource.getrusage(resource.RUSAGE_SELF)
    latencies, errors, wall = asyncio.run(_process_main(load))
    after = resource.getrusage(resource.RUSAGE_SELF)
    return latencies, errors, wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def client_cores(total: int | None = None) -> tuple[int, ...]:
    """Cores for the load generator: the last quarter (at most 4) on a host with 8 or more, else none (share)."""
    cores = sorted(os.sched_getaffinity(0))
    total = min(4, len(cores) // 4) if total is None else total
    return tuple(cores[-total:]) if total and len(cores) >= 8 else ()


def run_load(url: str, path: str, body: bytes, content_type: str, concurrency: int, seconds: float,
             cores: tuple[int, ...] = ()) -> dict[str, float | int]:
    """`concurrency` connections for `seconds` over one process per core in `cores` (one process when empty)."""
    parts = urlsplit(url)
    processes = max(1, min(len(cores), concurrency)) if cores else 1
    start = time.time() + 0.5
    loads = [Load(parts.hostname or "127.0.0.1", parts.port or 80, http_request(url, path, body, content_type),
                  concurrency // processes + (1 if i < concurrency % processes else 0), start, seconds,
                  (cores[i],) if cores else ())
             for i in range(processes)]
    with mp.get_context("spawn").Pool(processes) as pool:
        results = pool.map(_process, loads)
    latencies = np.asarray([x for r in results for x in r[0]])
    errors = sum(len(r[1]) for r in results)
    wall = max(r[2] for r in results)
    p50, p95, p99 = (float(np.percentile(latencies, q)) * 1000 if len(latencies) else float("nan") for q in (50, 95, 99))
    return {"concurrency": concurrency, "wall_s": wall, "requests": len(latencies), "errors": errors,
            "img_per_s": len(latencies) / wall, "p50_ms": p50, "p95_ms": p95, "p99_ms": p99,
            "client_processes": processes, "client_cpu_pct": 100 * sum(r[3] for r in results) / wall}
