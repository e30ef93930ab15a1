"""Helpers of the service tests: in-process clients, real server processes, metrics parsing, test images."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image

from service.app import create_app
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "service" / "samples"
ARTIFACTS = Path(os.environ.get("MAE_TEST_ARTIFACTS", ROOT / "tmp" / "artifacts"))


def wait_ready(client: TestClient, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while client.get("/health/ready").status_code != 200:
        assert time.monotonic() < deadline, "server never became ready"
        time.sleep(0.02)


@contextmanager
def make_client(model_dir: Path, **overrides: Any) -> Iterator[TestClient]:
    """An in-process app on `model_dir` with settings overrides, lifespan started and warmed up."""
    app = create_app(Settings(model_dir=model_dir, **overrides))
    with TestClient(app, raise_server_exceptions=False) as client:
        wait_ready(client)
        yield client


@contextmanager
def live_server(app: FastAPI) -> Iterator[tuple[str, asyncio.AbstractEventLoop]]:
    """uvicorn serving `app` on a real socket, in a thread of this process (so that a test can reach into the
    app's server state): yields (base URL, the server's event loop) once ready."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_until_complete, args=(server.serve(),), daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(url, lambda: thread.is_alive() or "the server thread stopped")
        yield url, loop
    finally:
        server.should_exit = True
        thread.join(30)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_ready(url: str, alive: Callable[[], bool | str] = lambda: True, timeout_s: float = 60) -> None:
    """Poll `url`/health/ready until it answers 200; `alive` returns True while the server runs (else why not)."""
    deadline = time.monotonic() + timeout_s
    while True:
        running = alive()
        assert running is True, running
        try:
            if httpx.get(f"{url}/health/ready", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"server not ready after {timeout_s:.0f} s"
        time.sleep(0.05)


@contextmanager
def server_process(model_dir: Path, *flags: str, env: dict[str, str] | None = None,
                   stop: bool = True) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """`python -m service` on a free port (a real socket); yields (base URL, process) once ready."""
    port = free_port()
    cmd = [sys.executable, "-m", "service", "--model-dir", str(model_dir), "--port", str(port), *flags]
    environment = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(url, lambda: proc.poll() is None or
                         f"server exited early:\n{proc.stdout.read() if proc.stdout else ''}")
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout:
            proc.stdout.close()


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in a Prometheus exposition (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        sample, _, label_text = key.partition("{")
        if sample == name and ",".join(sorted(label_text.rstrip("}").split(","))) == want:
            return float(value)
        if sample == name and not labels and not label_text:
            return float(value)
    return 0.0


def sample_png(name: str = "sneaker") -> bytes:
    return (SAMPLES / f"{name}.png").read_bytes()


def encode(im: Image.Image, fmt: str, **kwargs: Any) -> bytes:
    out = io.BytesIO()
    im.save(out, format=fmt, **kwargs)
    return out.getvalue()


def gradient(size: tuple[int, int] = (40, 30), mode: str = "RGB") -> Image.Image:
    """A deterministic test picture: distinct values per pixel, so orientation and crops are visible."""
    w, h = size
    x, y = np.meshgrid(np.linspace(0, 255, w), np.linspace(0, 255, h))
    rgb = np.stack([x, y, 255 - x], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb, "RGB").convert(mode)
