"""The routes do not know which engine runs: /embed, /reconstruct and /classify over a real socket on each
engine (`--engine`), answered as the in-process ONNX Runtime app answers them, with the same metrics."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from service_helpers import metric, sample_png, server_process

pytest.importorskip("torch")

PARITY = 1e-4


@pytest.fixture(scope="module", params=["onnxruntime", "torch"])
def live(request: pytest.FixtureRequest, tiny_model_dir: Path) -> Iterator[tuple[str, httpx.Client]]:
    with server_process(tiny_model_dir, "--engine", request.param) as (url, _), \
            httpx.Client(base_url=url, timeout=30) as c:
        yield request.param, c


def files(*images: bytes) -> list:
    return [("image", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]


def test_info_names_the_engine(live: tuple[str, httpx.Client]) -> None:
    engine, c = live
    runtime = c.get("/info").json()["runtime"]
    assert runtime["engine"] == engine and runtime["device"] == "cpu"
    assert set(runtime["graphs"]) == {"encoder", "decoder", "classifier"}
    assert all(r["passed"] for r in runtime["self_check"]["results"])


def test_embed_is_the_same_on_either_engine(live: tuple[str, httpx.Client], client: TestClient) -> None:
    _, c = live
    images = files(sample_png("sneaker"), sample_png("bag"), sample_png("trouser"))
    for pooling in ("cls", "mean", "cls+mean"):
        got = c.post("/embed", files=images, data={"pooling": pooling, "normalize": "false"})
        want = client.post("/embed", files=images, data={"pooling": pooling, "normalize": "false"})
        assert got.status_code == 200, got.text
        body = got.json()
        assert {k: v for k, v in body.items() if k != "data"} == {k: v for k, v in want.json().items() if k != "data"}
        np.testing.assert_allclose([d["embedding"] for d in body["data"]],
                                   [d["embedding"] for d in want.json()["data"]], atol=PARITY)


def test_reconstruct_is_the_same_on_either_engine(live: tuple[str, httpx.Client], client: TestClient) -> None:
    _, c = live
    request = {"image": base64.b64encode(sample_png("coat")).decode(), "response_format": "json", "seed": 3,
               "mask_ratio": 0.6}
    got, want = c.post("/reconstruct", json=request), client.post("/reconstruct", json=request)
    assert got.status_code == 200, got.text
    mine, theirs = got.json(), want.json()
    assert mine["seed"] == theirs["seed"] == 3 and mine["grid"] == theirs["grid"]
    assert mine["data"][0]["mask"] == theirs["data"][0]["mask"]
    assert mine["data"][0]["mse_masked"] == pytest.approx(theirs["data"][0]["mse_masked"], rel=1e-3)
    png = c.post("/reconstruct", files=files(sample_png("coat")), data={"seed": "3"})
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"


def test_classify_is_the_same_on_either_engine(live: tuple[str, httpx.Client], client: TestClient) -> None:
    _, c = live
    images = files(sample_png("trouser"), sample_png("sandal"))
    got = c.post("/classify", files=images, data={"top_k": "10"})
    want = client.post("/classify", files=images, data={"top_k": "10"})
    assert got.status_code == 200, got.text
    for mine, theirs in zip(got.json()["data"], want.json()["data"], strict=True):
        scores = {p["class_id"]: p["score"] for p in theirs["predictions"]}
        assert [p["label"] for p in mine["predictions"]][:1] == [p["label"] for p in theirs["predictions"]][:1]
        for p in mine["predictions"]:
            assert p["score"] == pytest.approx(scores[p["class_id"]], abs=PARITY)


def test_errors_and_metrics_do_not_depend_on_the_engine(live: tuple[str, httpx.Client]) -> None:
    _, c = live
    bad = c.post("/embed", files=files(b"not an image"))
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_image"
    image = base64.b64encode(sample_png()).decode()
    assert c.post("/reconstruct", json={"image": image, "mask_ratio": 1.5}).json()["error"]["type"] == "invalid_option"
    assert c.post("/embed", files=files(sample_png())).status_code == 200  # still serving
    text = c.get("/metrics").text
    for graph in ("encoder", "decoder", "classifier"):
        assert metric(text, "mae_ort_runs_total", graph=graph) >= 1
    assert "mae_inference_duration_seconds_bucket" in text and "mae_batch_size_bucket" in text
