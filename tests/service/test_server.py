"""End to end over real sockets: `python -m service` processes started by the tests; batching; graceful shutdown."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image, PngImagePlugin
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from service_helpers import ROOT, metric, sample_png, server_process

from service.metrics import MULTIPROC_DIR_ENV, Metrics
from service.server import INLINE_DECODE_MAX_BYTES

FMNIST = ROOT / "tests" / "fixtures" / "fmnist"


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path) -> Iterator[str]:
    # One inference thread: a second, idle one would take lone requests at once (see _padded_png).
    with server_process(tiny_model_dir, "--max-batch-delay-ms", "20", "--inference-threads", "1") as (url, _):
        yield url


def files(data: bytes) -> list:
    return [("image", ("x.png", data, "image/png"))]


def test_every_route_over_a_real_socket(server: str) -> None:
    with httpx.Client(base_url=server, timeout=30) as c:
        assert c.get("/health/live").status_code == 200 and c.get("/health/ready").status_code == 200
        embed = c.post("/embed", files=files(sample_png()))
        assert embed.status_code == 200 and embed.json()["dim"] == 32
        assert float(embed.headers["x-inference-time-ms"]) > 0
        png = c.post("/reconstruct", files=files(sample_png()), data={"seed": "9", "mask_ratio": "0.5"})
        assert png.headers["content-type"] == "image/png" and Image.open(io.BytesIO(png.content)).width > 500
        as_json = c.post("/reconstruct", json={"image": base64.b64encode(sample_png()).decode(),
                                               "response_format": "json", "seed": 9, "mask_ratio": 0.5})
        assert as_json.json()["grid"]["num_visible"] == 24
        classify = c.post("/classify?top_k=2", files=files(sample_png()))
        assert len(classify.json()["data"][0]["predictions"]) == 2
        assert c.get("/info").json()["runtime"]["graphs"]["encoder"]["providers"] == ["CPUExecutionProvider"]
        bad = c.post("/embed", content=b"x", headers={"content-type": "text/plain"})
        assert bad.status_code == 415 and bad.json()["error"]["type"] == "unsupported_media_type"
        assert "mae_requests_total" in c.get("/metrics").text
        assert "<html" in c.get("/").text


def _padded_png(path: Path) -> bytes:
    """The same pixels with a 20 KB text chunk: over INLINE_DECODE_MAX_BYTES, so decoded in the pool.

    A 28x28 PNG decodes on the event loop in the same step as its request queues, and this test's
    micro model runs in ~0.1 ms, so two idle inference threads can keep up with 32 requests one by
    one. Pool decoding keeps the requests' reservations open while they decode, which is what lets
    a batch wait for its company (the mechanism under test); a loaded server batches small images
    by queueing instead (mean batch 20 at c=64 in benchmarks/results/serve_default.json).
    """
    info = PngImagePlugin.PngInfo()
    info.add_text("padding", "x" * 20_000)
    out = io.BytesIO()
    Image.open(path).save(out, "PNG", pnginfo=info)
    assert len(out.getvalue()) > INLINE_DECODE_MAX_BYTES
    return out.getvalue()


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(server: str) -> None:
    images = [_padded_png(FMNIST / f"test_{i:05d}.png") for i in range(32)]

    async def scenario() -> None:
        limits = httpx.Limits(max_connections=32)
        async with httpx.AsyncClient(base_url=server, timeout=30, limits=limits) as c:
            alone = [(await c.post("/embed", files=files(img))).json()["data"][0]["embedding"] for img in images]
            before = metric((await c.get("/metrics")).text, "mae_ort_runs_total", graph="encoder")
            together = await asyncio.gather(*(c.post("/embed", files=files(img)) for img in images))
            after = metric((await c.get("/metrics")).text, "mae_ort_runs_total", graph="encoder")
        assert all(r.status_code == 200 for r in together)
        assert after - before < len(images), f"{after - before} ONNX Runtime runs for {len(images)} requests"
        for mine, reference in zip(together, alone, strict=True):
            np.testing.assert_allclose(mine.json()["data"][0]["embedding"], reference, atol=1e-5)
        assert len({tuple(r.json()["data"][0]["embedding"]) for r in together}) == len(images)

    asyncio.run(scenario())


def test_several_workers_serve_and_metrics_add_up_over_them(tiny_model_dir: Path, tmp_path: Path) -> None:
    """With --workers 2 both processes serve, and every scrape counts every worker's requests."""
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    (metrics_dir / "counter_999999.db").write_bytes(b"stale")  # a previous run's file: removed at start
    with server_process(tiny_model_dir, "--workers", "2", env={"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}) as (
            url, _):
        async def scenario() -> list[int]:
            async with httpx.AsyncClient(base_url=url, timeout=30,
                                         limits=httpx.Limits(max_keepalive_connections=0)) as c:
                responses = await asyncio.gather(*(c.post("/embed", files=files(sample_png())) for _ in range(48)))
            return [r.status_code for r in responses]

        assert asyncio.run(scenario()) == [200] * 48
        counted = [metric(httpx.get(f"{url}/metrics", timeout=10).text, "mae_requests_total", route="/embed",
                          status="200") for _ in range(6)]
        served_by = {p.stem.rsplit("_", 1)[1] for p in metrics_dir.glob("counter_*.db")}
        assert len(list(metrics_dir.glob("gauge_livesum_*.db"))) >= 2  # requests in flight, per worker
    assert counted == [48.0] * 6
    assert len(served_by) == 2, served_by  # both workers counted requests (and the stale file is gone)
    assert not list(metrics_dir.glob("gauge_live*_*.db"))  # stopped workers leave the live sums


def test_a_worker_that_died_leaves_the_live_sums_when_the_next_one_starts(tmp_path: Path, monkeypatch) -> None:
    """A killed worker cannot remove its in-flight gauge; the next worker to start (uvicorn's replacement)
    removes the files of processes that no longer exist."""
    subprocess.run([sys.executable, "-c", "from prometheus_client import Gauge; "
                           "Gauge('mae_requests_in_flight', 'x', multiprocess_mode='livesum').inc(3)"],
                          env={**os.environ, MULTIPROC_DIR_ENV: str(tmp_path)}, check=True, timeout=60)
    assert list(tmp_path.glob("gauge_livesum_*.db"))
    monkeypatch.setenv(MULTIPROC_DIR_ENV, str(tmp_path))
    assert "mae_requests_in_flight 3.0" in _multiprocess_exposition()
    Metrics()
    assert "mae_requests_in_flight 3.0" not in _multiprocess_exposition()
    assert not list(tmp_path.glob("gauge_livesum_*.db"))


def _multiprocess_exposition() -> str:
    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    return generate_latest(registry).decode()


def test_malformed_bodies_are_client_errors_not_server_warnings(tiny_model_dir: Path) -> None:
    with server_process(tiny_model_dir, "--log-level", "warning") as (url, proc):
        for _ in range(3):
            r = httpx.post(f"{url}/embed", content=b"\x89PNG, not a form", timeout=30,
                           headers={"Content-Type": "multipart/form-data; boundary=x"})
            assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_body", r.text
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=30)
    assert "WARNING" not in output, output


def test_cli_refuses_a_missing_model_directory(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "service", "--model-dir", str(tmp_path / "nope")], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "nope: no such model directory" in done.stderr


def _slowish_png() -> bytes:
    out = io.BytesIO()
    Image.fromarray((np.indices((3000, 3000)).sum(0) % 256).astype(np.uint8)).save(out, "PNG", compress_level=1)
    return out.getvalue()


def test_sigterm_finishes_every_accepted_request(tiny_model_dir: Path) -> None:
    """Six requests whose decoding takes ~1 s in all are in flight when SIGTERM arrives: all six get a 200."""
    slow = _slowish_png()
    with server_process(tiny_model_dir, "--decode-threads", "1") as (url, proc):
        async def scenario() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=url, timeout=30) as c:
                tasks = [asyncio.create_task(c.post("/embed", files=files(slow))) for _ in range(6)]
                async with httpx.AsyncClient(base_url=url, timeout=5) as probe:
                    while metric((await probe.get("/metrics")).text, "mae_requests_in_flight") < 7:
                        await asyncio.sleep(0.01)  # the six plus this probe
                proc.send_signal(signal.SIGTERM)
                return await asyncio.gather(*tasks)

        started = time.monotonic()
        responses = asyncio.run(scenario())
        assert [r.status_code for r in responses] == [200] * 6
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once drained
        assert time.monotonic() - started < 30
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{url}/health/live", timeout=2)
