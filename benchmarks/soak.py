"""Memory under a long run: the server's resident memory over a long stream of mixed requests.

Every route and protocol, valid and invalid (native JSON and multipart, /v1/embeddings, the Open
Inference Protocol in JSON and binary, reconstructions as PNG and JSON, metadata, health, metrics;
undecodable images, malformed bodies, bad options, unsupported media types, unknown routes, bodies over
the limit, malformed X-Request-Timeout, and clients that send a request and leave without reading the
answer), in a fixed cycle, from `--connections` keep-alive connections (asyncio, raw sockets). The
server's RSS (/proc/<pid>/status VmRSS) is read every `--every` requests; growth is the largest RSS after
the warm-up (`--warmup` requests) less the RSS at its end, and the run passes when it is at most
`--limit-mb`. `--leak-bytes N` serves the same app with one more middleware that keeps N bytes per
request forever (benchmarks/soak_leaky_app.py), so that the check can be seen to fail (its test does that).
Writes benchmarks/results/soak.json (with --leak-bytes: soak_leaky.json) and prints the samples.

    .venv/bin/python benchmarks/soak.py [--requests 200000] [--every 10000] [--warmup 20000] [--limit-mb 20]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import itertools
import json
import platform
import struct
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.loadgen import http_request, read_response  # noqa: E402
from benchmarks.serve import BUNDLED, Server, sample_image  # noqa: E402
from model_dir.schema import read_model_json  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
MAX_BODY_BYTES = 200_000  # the soak server's body limit, so that an over-limit body is cheap to send
ABANDON = "abandon"  # a request whose client leaves once it is sent


def log(message: str) -> None:
    print(f"soak: {message}", file=sys.stderr, flush=True)


def requests_mix(url: str, model_name: str, image: bytes) -> list[tuple[str, bytes]]:
    """(kind, raw request) in the order they cycle; kinds name what each is in the summary."""
    b64 = base64.b64encode(image).decode()
    boundary = "soakboundary"

    def http(method: str, path: str, body: bytes = b"", content_type: str | None = None,
             headers: dict[str, str] | None = None) -> bytes:
        return http_request(url, path, body, content_type, method=method, headers=headers)

    def form(data: bytes, fields: dict[str, str] | None = None) -> tuple[bytes, str]:
        parts = [f"--{boundary}\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n{v}\r\n".encode()
                 for k, v in (fields or {}).items()]
        parts.append(f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"x.png\"\r\n"
                     "Content-Type: image/png\r\n\r\n".encode() + data + b"\r\n")
        return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"

    def as_json(value: Any) -> bytes:
        return json.dumps(value).encode()

    element = struct.pack("<I", len(image)) + image
    oip_head = as_json({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                    "parameters": {"binary_data_size": len(element)}}]})
    oip_json = as_json({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [b64]}]})
    infer = f"/v2/models/{model_name}-%s/infer"
    valid = [
        ("embed multipart", http("POST", "/embed", *form(image))),
        ("embed json", http("POST", "/embed", as_json({"images": [b64, b64]}), "application/json")),
        ("reconstruct png", http("POST", "/reconstruct", *form(image, {"mask_ratio": "0.75"}))),
        ("reconstruct json", http("POST", "/reconstruct", as_json({"image": b64, "response_format": "json"}),
                                  "application/json")),
        ("classify", http("POST", "/classify", *form(image, {"top_k": "3"}))),
        ("openai embeddings", http("POST", "/v1/embeddings", as_json({"model": model_name, "input": [b64]}),
                                   "application/json")),
        ("oip embed json", http("POST", infer % "embed", oip_json, "application/json")),
        ("oip embed binary", http("POST", infer % "embed", oip_head + element, "application/octet-stream",
                                  {"Inference-Header-Content-Length": str(len(oip_head))})),
        ("oip classify", http("POST", infer % "classify", oip_json, "application/json")),
        ("oip reconstruct", http("POST", infer % "reconstruct", oip_json, "application/json")),
        ("info", http("GET", "/info")), ("live", http("GET", "/health/live")), ("ready", http("GET", "/health/ready")),
        ("models", http("GET", "/v1/models")), ("oip metadata", http("GET", f"/v2/models/{model_name}-embed")),
    ]
    invalid = [
        ("bad image", http("POST", "/embed", *form(b"not an image at all"))),
        ("bad json", http("POST", "/embed", b"{nope", "application/json")),
        ("bad option", http("POST", "/embed", *form(image, {"pooling": "max"}))),
        ("text input", http("POST", "/v1/embeddings", as_json({"model": model_name, "input": "a photo of a cat"}),
                            "application/json")),
        ("unsupported media", http("POST", "/embed", image, "image/png")),
        ("bad tensor", http("POST", infer % "embed", b'{"inputs": []}', "application/json")),
        ("unknown route", http("GET", "/no/such/route")),
        ("bad timeout header", http("POST", "/embed", *form(image), headers={"X-Request-Timeout": "soon"})),
        ("over the body limit", http("POST", "/embed", *form(bytes(MAX_BODY_BYTES + 1)))),
        (ABANDON, http("POST", "/embed", *form(image))),
    ]
    # three valid requests for each invalid one, the metrics scrape now and then
    mix = [r for pair in itertools.zip_longest(valid * 2, invalid) for r in pair if r is not None]
    return [*mix, ("metrics", http("GET", "/metrics"))]


@dataclass
class Soak:
    url: str
    mix: list[tuple[str, bytes]]
    total: int
    every: int
    pid: int
    sent: int = 0
    samples: list[dict[str, Any]] = field(default_factory=list)
    statuses: dict[str, dict[str, int]] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)

    def take(self) -> tuple[str, bytes] | None:
        if self.sent >= self.total:
            return None
        kind, raw = self.mix[self.sent % len(self.mix)]
        self.sent += 1
        if self.sent % self.every == 0:
            self.samples.append({"requests": self.sent, "rss_mb": rss_mb(self.pid),
                                 "seconds": round(time.monotonic() - self.started, 1)})
            log(f"{self.sent} requests: RSS {self.samples[-1]['rss_mb']:.1f} MB")
        return kind, raw

    def count(self, kind: str, status: int | str) -> None:
        by_status = self.statuses.setdefault(kind, {})
        by_status[str(status)] = by_status.get(str(status), 0) + 1

    async def connection(self) -> None:
        host, port = self.url.removeprefix("http://").split(":")
        reader = writer = None
        while (job := self.take()) is not None:
            kind, raw = job
            if kind == ABANDON:  # on a connection of its own, closed as soon as the request is written
                _, w = await asyncio.open_connection(host, int(port))
                w.write(raw)
                await w.drain()
                w.close()
                self.count(kind, "left")
                continue
            if writer is None:
                reader, writer = await asyncio.open_connection(host, int(port))
            assert reader is not None
            writer.write(raw)
            try:
                status, keep = await asyncio.wait_for(read_response(reader), 60)
            except (asyncio.IncompleteReadError, ConnectionError, TimeoutError) as e:
                self.count(kind, type(e).__name__)
                keep = False
            else:
                self.count(kind, status)
            if not keep:
                writer.close()
                reader = writer = None
        if writer is not None:
            writer.close()


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def growth(samples: list[dict[str, Any]], warmup: int) -> tuple[float, float]:
    """(RSS at the end of the warm-up, largest RSS after it less that), in MB."""
    base = [s["rss_mb"] for s in samples if s["requests"] <= warmup]
    after = [s["rss_mb"] for s in samples if s["requests"] > warmup]
    if not base or not after:
        raise ValueError(f"need samples inside and after the warm-up of {warmup} requests")
    return base[-1], max(after) - base[-1]


def run(requests: int, every: int, warmup: int, connections: int, leak_bytes: int = 0,
        model_dir: Path = BUNDLED) -> dict[str, Any]:
    env = {"MAE_MAX_BODY_BYTES": str(MAX_BODY_BYTES)}
    if leak_bytes:
        env["SOAK_LEAK_BYTES"] = str(leak_bytes)
        server = Server(model_dir, env=env, factory="benchmarks.soak_leaky_app:create_app")
    else:
        server = Server(model_dir, env=env)
    try:
        name = read_model_json(model_dir).name
        soak = Soak(server.url, requests_mix(server.url, name, sample_image(model_dir)), requests, every, server.proc.pid)
        start_rss = rss_mb(server.proc.pid)

        async def main() -> None:
            await asyncio.gather(*(soak.connection() for _ in range(connections)))

        asyncio.run(main())
        elapsed = time.monotonic() - soak.started
        alive = server.proc.poll() is None
    finally:
        server.stop()
    base, grown = growth(soak.samples, warmup)
    return {"requests": requests, "connections": connections, "every": every, "warmup": warmup,
            "leak_bytes_per_request": leak_bytes, "seconds": round(elapsed, 1),
            "requests_per_s": round(requests / elapsed, 1), "rss_at_start_mb": round(start_rss, 1),
            "rss_after_warmup_mb": round(base, 1), "growth_after_warmup_mb": round(grown, 1),
            "server_alive_at_end": alive, "samples": soak.samples, "statuses": soak.statuses,
            "machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200_000)
    parser.add_argument("--every", type=int, default=10_000, help="requests between two RSS samples")
    parser.add_argument("--warmup", type=int, default=20_000, help="requests before growth is counted")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--limit-mb", type=float, default=20.0)
    parser.add_argument("--leak-bytes", type=int, default=0, help="serve the deliberately leaking app")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    result = run(args.requests, args.every, args.warmup, args.connections, args.leak_bytes)
    result["limit_mb"] = args.limit_mb
    result["passed"] = result["growth_after_warmup_mb"] <= args.limit_mb and result["server_alive_at_end"]
    out = args.out or RESULTS / ("soak_leaky.json" if args.leak_bytes else "soak.json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print("| requests | RSS MB | seconds |\n|---|---|---|")
    for s in result["samples"]:
        print(f"| {s['requests']} | {s['rss_mb']:.1f} | {s['seconds']} |")
    print(f"\n{result['requests_per_s']} requests/s; RSS {result['rss_at_start_mb']} MB at start, "
          f"{result['rss_after_warmup_mb']} MB after the warm-up, growth after it {result['growth_after_warmup_mb']} "
          f"MB (limit {args.limit_mb}): {'passed' if result['passed'] else 'FAILED'}; wrote {out}")
    sys.exit(0 if result["passed"] else 1)


if __name__ == "__main__":
    main()
