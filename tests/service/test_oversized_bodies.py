"""Oversized bodies get the 413 envelope on every client, over a real socket, with flat server memory.

urllib and httpx write the whole body before reading the response; the server must read and discard
the rest of the body before answering, or their kernel sees a reset instead of the 413.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from service_helpers import server_process

MiB = 1024 * 1024
LIMIT = 1 * MiB


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path) -> Iterator[tuple[str, int]]:
    with server_process(tiny_model_dir, "--max-body-bytes", str(LIMIT)) as (url, proc):
        yield url, proc.pid


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def zeros(total: int, chunk: int = MiB) -> Iterator[bytes]:
    block = b"\0" * chunk
    for start in range(0, total, chunk):
        yield block[: min(chunk, total - start)]


class ZeroFile:
    """A file-like body of `size` zero bytes that urllib streams without holding it in memory."""

    def __init__(self, size: int):
        self.left = size

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        self.left -= n
        return b"\0" * n


def assert_413_envelope(status: int, body: bytes) -> None:
    assert status == 413
    assert json.loads(body)["error"]["type"] == "payload_too_large"


@pytest.mark.parametrize("size", [64 * MiB, 1024 * MiB], ids=["64MiB", "1GiB"])
def test_urllib_reads_the_413(server, size: int) -> None:
    url, pid = server
    before = rss_bytes(pid)
    request = urllib.request.Request(f"{url}/embed", data=ZeroFile(size), method="POST",
                                     headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(request, timeout=120)
    assert_413_envelope(e.value.code, e.value.read())
    assert rss_bytes(pid) - before < 32 * MiB  # the body was discarded chunk by chunk, never held


@pytest.mark.parametrize("size", [64 * MiB, 1024 * MiB], ids=["64MiB", "1GiB"])
def test_httpx_reads_the_413(server, size: int) -> None:
    url, pid = server
    before = rss_bytes(pid)
    r = httpx.post(f"{url}/embed", content=zeros(size), timeout=120,
                   headers={"Content-Type": "multipart/form-data; boundary=x", "Content-Length": str(size)})
    assert_413_envelope(r.status_code, r.content)
    assert rss_bytes(pid) - before < 32 * MiB


def test_a_chunked_body_over_the_limit_gets_the_413(server) -> None:
    url, _ = server
    r = httpx.post(f"{url}/embed", content=zeros(64 * MiB), timeout=120, headers={"Content-Type": "application/json"})
    assert r.request.headers.get("transfer-encoding") == "chunked"
    assert_413_envelope(r.status_code, r.content)


def test_the_server_keeps_serving_after_oversized_bodies(server) -> None:
    url, _ = server
    from service_helpers import sample_png

    assert httpx.post(f"{url}/embed", files={"image": sample_png()}, timeout=30).status_code == 200
