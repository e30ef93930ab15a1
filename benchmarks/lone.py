"""A lone request: p50 at concurrency 1 of the service against the bare endpoint (benchmarks/plain_server.py).

At c=1 a figure is a sum of fixed costs (HTTP, decoding, hand-overs, one ORT call of ~1.2 ms) and this
machine's speed drifts by a third within minutes, so a long run per server (benchmarks/serve.py) compares
different machines. Here every server (the plain endpoint, this checkout with its default settings, the
variants given with --variant, and with --before an earlier commit run from a `git worktree`) is up at
once, and they take turns in short chunks (--chunk sequential requests each, on one keep-alive
connection per server, a raw-socket client: the model's input-size PNG as multipart, as serve.py
sends it); each chunk's p50 is divided by the plain endpoint's chunk beside it, and the medians of those
ratios (and of the p50s) over --chunks turns are reported. Writes benchmarks/results/lone.json.

    .venv/bin/python benchmarks/lone.py [--chunks 30] [--chunk 300] [--before 8cdb352]
        [--variant 'inline=--lone-batch-inline-ms 5']
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.serve import BOUNDARY, BUNDLED, Server, multipart, sample_image, worktree  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "lone.json"


def log(message: str) -> None:
    print(f"lone: {message}", file=sys.stderr, flush=True)


class Connection:
    """One keep-alive connection that sends the same POST /embed and reads each answer whole."""

    def __init__(self, url: str, request: bytes):
        host, port = url.removeprefix("http://").split(":")
        self.sock = socket.create_connection((host, int(port)))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.request = request

    def one(self) -> float:
        """Milliseconds from the first byte sent to the last byte of a 200 read."""
        start = time.perf_counter()
        self.sock.sendall(self.request)
        data = b""
        while b"\r\n\r\n" not in data:
            data += self.sock.recv(65536)
        head, body = data.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        if lines[0].split()[1] != "200":
            raise RuntimeError(f"not a 200: {lines[0]}")
        length = next(int(v) for k, v in (line.split(":", 1) for line in lines[1:]) if k.lower() == "content-length")
        while len(body) < length:
            body += self.sock.recv(65536)
        return (time.perf_counter() - start) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=30)
    parser.add_argument("--chunk", type=int, default=300, help="sequential requests per server per turn")
    parser.add_argument("--before", help="also an earlier commit, from a git worktree under runs/")
    parser.add_argument("--variant", action="append", default=[], help="NAME=mae-serve flags (more servers)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    image = sample_image(BUNDLED)
    body = multipart(image)
    request = (f"POST /embed HTTP/1.1\r\nHost: lone\r\nContent-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    servers = {"plain": Server(BUNDLED, plain=True), "service": Server(BUNDLED)}
    for variant in args.variant:
        name, flags = variant.split("=", 1)
        servers[name] = Server(BUNDLED, *shlex.split(flags))
    if args.before:
        servers[f"before ({args.before})"] = Server(BUNDLED, root=worktree(args.before))
    try:
        connections = {name: Connection(s.url, request) for name, s in servers.items()}
        for c in connections.values():  # warm-up: sessions, allocations, the batcher's averages
            for _ in range(200):
                c.one()
        p50s: dict[str, list[float]] = {name: [] for name in servers}
        for turn in range(args.chunks):
            for name, c in connections.items():
                p50s[name].append(statistics.median(c.one() for _ in range(args.chunk)))
            log(f"turn {turn + 1}: " + ", ".join(f"{n} {v[-1]:.3f} ms" for n, v in p50s.items()))
    finally:
        for s in servers.values():
            s.stop()
    ratios = {name: [a / b for a, b in zip(v, p50s["plain"], strict=True)] for name, v in p50s.items()}
    result: dict[str, Any] = {
        "chunks": args.chunks, "chunk": args.chunk, "image_bytes": len(image),
        "p50_ms": {n: round(statistics.median(v), 3) for n, v in p50s.items()},
        "p50_over_plain": {n: round(statistics.median(v), 3) for n, v in ratios.items()},
        "p50_over_plain_quartiles": {n: [round(q, 3) for q in statistics.quantiles(v, n=4)] for n, v in ratios.items()},
        "per_chunk_p50_ms": p50s, "variants": args.variant,
        "machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version()},
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print("| server | p50 ms | p50 / plain (median of chunk ratios) | quartiles |\n|---|---|---|---|")
    for name in servers:
        print(f"| {name} | {result['p50_ms'][name]} | {result['p50_over_plain'][name]} | "
              f"{' / '.join(map(str, result['p50_over_plain_quartiles'][name]))} |")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
