"""service.client against a live server (uvicorn on a real socket, in a thread of this process, so that a
test can hold its queue full): every method, sync and async, image kinds, batching within the limits,
retries on 503 + Retry-After, the API key, typed errors; and the client imports without the server's stack."""

from __future__ import annotations

import asyncio
import base64
import io
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from service_helpers import ROOT, live_server, metric, sample_png

from service.app import create_app
from service.client import (
    AsyncClient,
    Client,
    InvalidImageError,
    InvalidOptionError,
    MAEError,
    OverloadedError,
    UnauthorizedError,
    png_from_array,
)
from service.server import Server
from service.settings import Settings

KEY = "client-test-key"
NAMES = ("sneaker", "bag", "dress", "coat", "sandal")


@dataclass
class Live:
    url: str
    server: Server
    loop: asyncio.AbstractEventLoop

    def native(self, route: str, names: tuple[str, ...] = NAMES, **options: Any) -> dict[str, Any]:
        """The native route's answer for the images, one request each (the server takes 2 per request)."""
        answers = []
        for name in names:
            r = httpx.post(f"{self.url}{route}", json={"image": base64.b64encode(sample_png(name)).decode(), **options},
                           headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
            assert r.status_code == 200, r.text
            answers.append(r.json())
        return {**answers[0], "data": [d for a in answers for d in a["data"]]}

    def hold_full(self, seconds: float) -> None:
        """Reserve the whole encoder queue for `seconds` (what callers still decoding their images hold)."""
        held = threading.Event()

        async def hold() -> None:
            task = self.server.tasks.embed
            queue = self.server.queue(task.key, task.run_batch)
            with queue.reserve(self.server.settings.max_queue):
                held.set()
                await asyncio.sleep(seconds)

        asyncio.run_coroutine_threadsafe(hold(), self.loop)
        assert held.wait(10)

    def metric(self, name: str, **labels: str) -> float:
        return metric(httpx.get(f"{self.url}/metrics").text, name, **labels)


@pytest.fixture(scope="module")
def live(tiny_model_dir: Path) -> Iterator[Live]:
    """max 2 images per request (so that 5 images take 3 requests) and a queue of 2."""
    app = create_app(Settings(model_dir=tiny_model_dir, api_keys=[KEY], max_images_per_request=2, max_queue=2))
    with live_server(app) as (url, loop):
        yield Live(url, app.state.server, loop)


def test_every_method_with_every_image_kind(live: Live, tmp_path: Path) -> None:
    paths = []
    for name in NAMES:
        paths.append(tmp_path / f"{name}.png")
        paths[-1].write_bytes(sample_png(name))
    pil = Image.open(paths[2])
    kinds = [paths[0], sample_png(NAMES[1]), pil.copy(), np.asarray(Image.open(paths[3])), str(paths[4])]
    expected = np.array([d["embedding"] for d in live.native("/embed")["data"]], dtype=np.float32)
    with Client(live.url, api_key=KEY) as mae:
        requests_before = live.metric("mae_requests_total", route="/embed", status="200")
        vectors = mae.embed(kinds)
        assert live.metric("mae_requests_total", route="/embed", status="200") - requests_before == 3  # 2 + 2 + 1
        np.testing.assert_allclose(vectors, expected, atol=1e-5, rtol=0)
        assert mae.embed(paths[0]).shape == (1, expected.shape[1])
        features = np.array([d["embedding"] for d in live.native("/embed", source="classifier")["data"]], np.float32)
        np.testing.assert_allclose(mae.embed(kinds, source="classifier"), features, atol=1e-5, rtol=0)
        with pytest.raises(InvalidOptionError, match="applies to source=encoder only"):
            mae.embed(paths[0], source="classifier", pooling="cls")
        info = mae.info()
        assert info["limits"]["max_images_per_request"] == 2 and "open_inference_v2" in info["protocols"]
        labels = mae.classify(paths[:3], top_k=2)
        native = live.native("/classify", NAMES[:3], top_k=2)["data"]
        assert [[(p.label, p.class_id) for p in row] for row in labels] == \
               [[(p["label"], p["class_id"]) for p in item["predictions"]] for item in native]
        assert abs(labels[0][0].score - native[0]["predictions"][0]["score"]) < 1e-6
        r = mae.reconstruct(paths[0], mask_ratio=0.5, seed=5)
        again = mae.reconstruct(sample_png(NAMES[0]), mask_ratio=0.5, seed=5)
        native_r = live.native("/reconstruct", NAMES[:1], seed=5, mask_ratio=0.5, response_format="json")
        assert r.seed == 5 and r.images == again.images
        assert r.images["reconstruction"] == base64.b64decode(native_r["data"][0]["images"]["reconstruction"])
        assert r.mask.tolist() == native_r["data"][0]["mask"] and r.mask.sum() > 0


def test_async_client_twin(live: Live) -> None:
    async def scenario() -> None:
        async with AsyncClient(live.url, api_key=KEY) as mae:
            vectors = await mae.embed([sample_png(n) for n in NAMES])
            expected = np.array([d["embedding"] for d in live.native("/embed")["data"]], dtype=np.float32)
            np.testing.assert_allclose(vectors, expected, atol=1e-5, rtol=0)
            features = await mae.embed([sample_png(n) for n in NAMES], source="classifier", normalize=False)
            raw = live.native("/embed", source="classifier", normalize=False)["data"]
            np.testing.assert_allclose(features, [d["embedding"] for d in raw], atol=1e-5, rtol=0)
            assert (await mae.info())["model"]["name"]
            assert len(await mae.classify([sample_png()], top_k=3)) == 1
            assert (await mae.reconstruct(sample_png(), seed=1)).seed == 1
            with pytest.raises(InvalidImageError):
                await mae.embed(b"not an image")

    asyncio.run(scenario())


def test_held_full_server_answers_503_and_the_client_retries(live: Live) -> None:
    refused_before = live.metric("mae_rejections_total", reason="overloaded")
    live.hold_full(1.5)
    r = httpx.post(f"{live.url}/embed", files=[("image", ("x.png", sample_png(), "image/png"))],
                   headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
    with Client(live.url, api_key=KEY, max_retries=5) as mae:
        assert mae.embed(sample_png()).shape[0] == 1  # waited Retry-After, retried until the hold ended
    assert live.metric("mae_rejections_total", reason="overloaded") - refused_before >= 2  # ours and the client's

    async def scenario() -> None:
        live.hold_full(1.5)
        async with AsyncClient(live.url, api_key=KEY) as mae:
            assert (await mae.embed(sample_png())).shape[0] == 1

    before = live.metric("mae_rejections_total", reason="overloaded")
    asyncio.run(scenario())
    assert live.metric("mae_rejections_total", reason="overloaded") > before
    live.hold_full(3)
    with Client(live.url, api_key=KEY, max_retries=1, max_retry_wait_s=0.1) as mae, \
            pytest.raises(OverloadedError) as e:
        mae.embed(sample_png())
    assert e.value.status == 503 and e.value.type == "overloaded"


def test_typed_errors_and_the_api_key(live: Live) -> None:
    with Client(live.url, api_key=KEY) as mae:
        with pytest.raises(InvalidImageError) as e:
            mae.embed([sample_png(), b"definitely not an image"])
        assert e.value.status == 400 and e.value.type == "invalid_image" and e.value.request_id
        with pytest.raises(InvalidOptionError):
            mae.classify(sample_png(), top_k=10_000)
        with pytest.raises(TypeError):
            mae.embed(42)
    with Client(live.url, api_key="wrong") as mae, pytest.raises(UnauthorizedError) as e:
        mae.info()
    assert isinstance(e.value, MAEError) and e.value.status == 401
    with Client(live.url) as mae, pytest.raises(UnauthorizedError):
        mae.embed(sample_png())


def test_png_from_array_round_trips() -> None:
    rng = np.random.default_rng(0)
    for shape in [(5, 7), (5, 7, 1), (5, 7, 3), (5, 7, 4)]:
        a = rng.integers(0, 256, shape, dtype=np.uint8)
        decoded = np.asarray(Image.open(io.BytesIO(png_from_array(a))))
        np.testing.assert_array_equal(decoded, a.reshape(decoded.shape))
    gray = np.asarray(Image.open(io.BytesIO(png_from_array(np.full((2, 2), 0.5)))))
    assert (gray == 128).all()
    with pytest.raises(ValueError):
        png_from_array(np.zeros((2, 2, 2)))


def test_client_imports_with_httpx_and_numpy_only() -> None:
    """The client module, run with the server's stack, PIL, torch and onnxruntime made unimportable."""
    blocked = ["torch", "onnxruntime", "PIL", "fastapi", "starlette", "pydantic", "orjson", "model", "training"]
    code = (
        "import sys\n"
        f"BLOCKED = {blocked!r}\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in BLOCKED: raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from service.client import Client, AsyncClient, png_from_array\n"
        "import numpy as np; assert png_from_array(np.zeros((2, 2), np.uint8)).startswith(b'\\x89PNG')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in BLOCKED))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_example_script_runs(live: Live, tmp_path: Path) -> None:
    out = tmp_path / "r.png"
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "client.py"), "--url", live.url, "--api-key", KEY,
                           "--out", str(out)], capture_output=True, text=True, cwd=ROOT,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("nearest") == len(list((ROOT / "service" / "samples").glob("*.png")))
    assert Image.open(out).size[0] > 0
