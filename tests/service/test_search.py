"""POST /search and its gallery over a real socket: results equal brute-force cosine over the gallery's /embed
vectors, the query itself found first, k and label bounds, not_available without a gallery, a gallery from another
model refused at startup, the Parquet file mae-embed writes, the bundled gallery, the pictures route, the client."""

from __future__ import annotations

import asyncio
import base64
import io
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from service_helpers import ROOT, SAMPLES, encode, gradient, live_server, metric, sample_png

from service.app import create_app
from service.bulk_embed import main as mae_embed
from service.client import AsyncClient, Client, InvalidOptionError, NotAvailableError
from service.search import GalleryError
from service.server import Server
from service.settings import BUNDLED_MODEL_DIR, Settings

NAMES = sorted(p.stem for p in SAMPLES.glob("*.png"))  # ankle-boot, bag, coat, ...


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def gallery_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled samples in an ImageFolder tree (a class folder each, named after the sample), and one unlabelled
    picture at the top."""
    root = tmp_path_factory.mktemp("gallery")
    for name in NAMES:
        (root / name).mkdir()
        shutil.copy(SAMPLES / f"{name}.png", root / name / f"{name}.png")
    (root / "gradient.png").write_bytes(encode(gradient((40, 30)), "PNG"))
    return root


@pytest.fixture(scope="module")
def live(tiny_model_dir: Path, gallery_folder: Path) -> Iterator[tuple[str, Server]]:
    app = create_app(Settings(model_dir=tiny_model_dir, gallery=str(gallery_folder)))
    with live_server(app) as (url, _):
        yield url, app.state.server


def search(url: str, images: list[bytes], **options: Any) -> httpx.Response:
    return httpx.post(f"{url}/search", json={"images": [_b64(i) for i in images], **options}, timeout=30)


def gallery_vectors(url: str, folder: Path, paths: list[str]) -> np.ndarray:
    """The gallery's items embedded through /embed (default pooling, normalized), in gallery order."""
    r = httpx.post(f"{url}/embed", json={"images": [_b64((folder / p).read_bytes()) for p in paths]}, timeout=30)
    assert r.status_code == 200, r.text
    return np.array([d["embedding"] for d in r.json()["data"]], np.float32)


def test_results_equal_brute_force_cosine_over_the_gallery(live: tuple[str, Server], gallery_folder: Path) -> None:
    url, server = live
    gallery = server.gallery
    assert gallery is not None and len(gallery) == len(NAMES) + 1
    memory = gallery_vectors(url, gallery_folder, [str(p) for p in gallery.paths])
    queries = [encode(gradient((33, 47), "L"), "PNG"), sample_png("coat"), encode(gradient((64, 64)), "JPEG")]
    batches = metric(httpx.get(f"{url}/metrics").text, "mae_batch_size_count", queue="encoder")
    r = search(url, queries, k=4)
    assert r.status_code == 200, r.text
    body = r.json()
    pooling = server.model_dir.spec.embedding.default_pooling
    assert (body["source"], body["pooling"], body["gallery_size"]) == ("encoder", pooling, len(gallery))
    assert metric(httpx.get(f"{url}/metrics").text, "mae_batch_size_count", queue="encoder") > batches  # /embed's queue
    r = httpx.post(f"{url}/embed", json={"images": [_b64(q) for q in queries]}, timeout=30)
    exact = np.array([d["embedding"] for d in r.json()["data"]], np.float32) @ memory.T  # [Q, N]
    for item, row in zip(body["data"], exact, strict=True):
        ids = [n["id"] for n in item["neighbors"]]
        assert ids == list(np.argsort(-row, kind="stable")[:4])
        np.testing.assert_allclose([n["score"] for n in item["neighbors"]], row[ids], atol=1e-5)
        assert [n["path"] for n in item["neighbors"]] == [gallery.paths[i] for i in ids]
        assert [n["label"] for n in item["neighbors"]] == [gallery.labels[i] for i in ids]


def test_the_query_image_itself_is_found_first(live: tuple[str, Server]) -> None:
    url, _ = live
    body = search(url, [sample_png(n) for n in NAMES], k=3).json()
    for name, item in zip(NAMES, body["data"], strict=True):
        first = item["neighbors"][0]
        assert (first["label"], first["path"]) == (name, f"{name}/{name}.png")
        assert first["score"] == pytest.approx(1.0, abs=1e-5)


def test_label_filter_k_bounds_and_errors(live: tuple[str, Server]) -> None:
    url, _ = live
    body = search(url, [sample_png("bag")], k=1, label="sandal").json()
    assert [n["label"] for n in body["data"][0]["neighbors"]] == ["sandal"]
    cases = [({"k": 0}, 422, "k:"), ({"k": 101}, 422, "k:"), ({"k": 12}, 422, "over the 11 gallery items"),
             ({"k": 2, "label": "bag"}, 422, "over the 1 gallery items labelled 'bag'"),
             ({"label": "boat"}, 422, "no gallery item has it"), ({"pooling": "mean"}, 422, "pooling")]
    for options, status, text in cases:
        r = search(url, [sample_png()], **options)
        assert (r.status_code, r.json()["error"]["type"]) == (status, "invalid_option"), (options, r.text)
        assert text in r.json()["error"]["message"], r.text
    r = httpx.post(f"{url}/search", json={"image": _b64(b"not an image")}, timeout=30)
    assert (r.status_code, r.json()["error"]["type"]) == (400, "invalid_image")
    r = httpx.post(f"{url}/search", files=[("image", ("a.png", sample_png(), "image/png"))] * 33, timeout=30)
    assert (r.status_code, r.json()["error"]["type"]) == (413, "payload_too_large")
    r = httpx.post(f"{url}/search", files={"image": ("a.png", sample_png(), "image/png")}, data={"k": "2"}, timeout=30)
    assert r.status_code == 200 and len(r.json()["data"][0]["neighbors"]) == 2


def test_gallery_pictures_are_served_by_id_only(live: tuple[str, Server]) -> None:
    url, server = live
    assert server.gallery is not None
    item = server.gallery.paths.index("sandal/sandal.png")
    r = httpx.get(f"{url}/gallery/{item}/image")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    expected = Image.open(SAMPLES / "sandal.png")  # 112 x 112: a thumbnail of at most 96 pixels a side
    expected.thumbnail((96, 96))
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(r.content)).convert("L")), np.asarray(expected.convert("L")))
    top = server.gallery.paths.index("gradient.png")
    assert Image.open(io.BytesIO(httpx.get(f"{url}/gallery/{top}/image").content)).size == (40, 30)
    for path, status, kind in (("11", 404, "not_found"), ("-1", 422, "invalid_option"),
                               ("..%2F..%2Fetc%2Fpasswd", 404, "not_found"), ("x", 422, "invalid_option")):
        r = httpx.get(f"{url}/gallery/{path}/image")
        assert (r.status_code, r.json()["error"]["type"]) == (status, kind), r.text
    info = httpx.get(f"{url}/info").json()
    assert info["routes"]["search"] is True and "POST /search" in info["protocols"]["native"]
    assert info["gallery"] == {"origin": f"folder: {server.gallery.root}", "size": 11, "index": "exact",
                               "source": "encoder", "ready": True,
                               "pooling": server.model_dir.spec.embedding.default_pooling,
                               "labels": {name: 1 for name in NAMES}, "images": True}


def test_not_available_without_a_gallery(tiny_model_dir: Path) -> None:
    with live_server(create_app(Settings(model_dir=tiny_model_dir))) as (url, _):
        r = search(url, [sample_png()])
        assert (r.status_code, r.json()["error"]["type"]) == (404, "not_available")
        assert "MAE_GALLERY" in r.json()["error"]["message"]
        r = httpx.get(f"{url}/gallery/0/image")
        assert (r.status_code, r.json()["error"]["type"]) == (404, "not_available")
        info = httpx.get(f"{url}/info").json()
        assert info["gallery"] is None and info["routes"]["search"] is False
        with Client(url) as mae, pytest.raises(NotAvailableError):
            mae.search(sample_png())


def test_a_parquet_gallery_from_mae_embed_loads(live: tuple[str, Server], tiny_model_dir: Path, gallery_folder: Path,
                                                tmp_path: Path) -> None:
    """mae-embed's file of an ImageFolder tree, with a pooling other than the model's: its vectors, labels and
    paths as /embed gives them, queries embedded with the pooling it names (a query finds itself at 1.0), its
    pictures served where they lie under its folder."""
    folder_url, _ = live
    tree = tmp_path / "images"
    shutil.copytree(gallery_folder, tree, ignore=shutil.ignore_patterns("gradient.png"))
    out = tmp_path / "gallery.parquet"
    assert mae_embed([str(tree), "--out", str(out), "--model-dir", str(tiny_model_dir), "--quiet",
                      "--pooling", "mean"]) == 0
    app = create_app(Settings(model_dir=tiny_model_dir, gallery=str(out)))
    with live_server(app) as (url, _):
        gallery = app.state.server.gallery
        assert gallery.paths == [str(tree / n / f"{n}.png") for n in NAMES] and gallery.labels == NAMES
        r = httpx.post(f"{folder_url}/embed", json={"images": [_b64(Path(p).read_bytes()) for p in gallery.paths],
                                                    "pooling": "mean"}, timeout=30)
        np.testing.assert_allclose(gallery.vectors, [d["embedding"] for d in r.json()["data"]], atol=1e-6)
        body = search(url, [sample_png("dress")], k=3).json()
        assert (body["pooling"], body["gallery_size"]) == ("mean", len(NAMES))
        first = body["data"][0]["neighbors"][0]
        assert (first["label"], first["path"]) == ("dress", str(tree / "dress" / "dress.png"))
        assert first["score"] == pytest.approx(1.0, abs=1e-5)
        assert httpx.get(f"{url}/gallery/{first['id']}/image").status_code == 200
        assert httpx.get(f"{url}/info").json()["gallery"]["origin"] == f"parquet: {out.resolve()}"


def test_a_gallery_from_another_model_is_refused_at_startup(tiny_model_dir: Path, gallery_folder: Path,
                                                            tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    out = tmp_path / "gallery.parquet"
    assert mae_embed([str(gallery_folder / "bag"), "--out", str(out), "--model-dir", str(tiny_model_dir),
                      "--quiet"]) == 0
    table = pq.read_table(out)
    meta = {**table.schema.metadata, b"mae.model": b"another-model", b"mae.model_version": b"1"}
    other = tmp_path / "other.parquet"
    pq.write_table(table.replace_schema_metadata(meta), other)
    with pytest.raises(GalleryError, match="embedded by model another-model 1, not the served mae-test"):
        create_app(Settings(model_dir=tiny_model_dir, gallery=str(other)))
    with pytest.raises(GalleryError, match="no such file or folder"):
        create_app(Settings(model_dir=tiny_model_dir, gallery=str(tmp_path / "missing.parquet")))
    cli = subprocess.run([sys.executable, "-m", "service", "--model-dir", str(tiny_model_dir), "--gallery", str(other)],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert cli.returncode != 0 and "mae-serve: error: gallery" in cli.stderr and "another-model" in cli.stderr


def test_the_bundled_gallery_with_the_bundled_model() -> None:
    """MAE_GALLERY=auto with the bundled model: its 1000 Fashion-MNIST test images, embedded before ready; a
    gallery image finds itself, and its neighbours are mostly of its class."""
    app = create_app(Settings(model_dir=BUNDLED_MODEL_DIR, max_batch_size=64))
    with live_server(app) as (url, _):
        gallery = app.state.server.gallery
        assert gallery is not None and len(gallery) == 1000 and gallery.ready
        picks = [0, 1, 2, 3, 4, 5, 6, 7]
        pngs = [httpx.get(f"{url}/gallery/{i}/image").content for i in picks]
        body = search(url, pngs, k=10).json()
        assert [d["neighbors"][0]["id"] for d in body["data"]] == picks
        same = np.mean([[n["label"] == gallery.labels[i] for n in d["neighbors"][1:]]
                        for i, d in zip(picks, body["data"], strict=True)])
        assert same >= 0.6, same  # kNN top-1 of this model's embeddings is 85 % on the test split (model.json)
        assert httpx.get(f"{url}/info").json()["gallery"]["origin"] == "bundled: 1000 Fashion-MNIST test images"


def test_client_search_sync_and_async(live: tuple[str, Server]) -> None:
    url, _ = live
    with Client(url) as mae:
        found = mae.search([sample_png("bag"), sample_png("coat")], k=2)
        assert [[n.label for n in row][0] for row in found] == ["bag", "coat"]
        assert found[0][0].path == "bag/bag.png" and found[0][0].score == pytest.approx(1.0, abs=1e-5)
        with pytest.raises(InvalidOptionError):
            mae.search(sample_png(), k=50)

    async def run() -> Any:
        async with AsyncClient(url) as mae:
            return await mae.search(SAMPLES / "trouser.png", k=1, label="trouser")

    (row,) = asyncio.run(run())
    assert [(n.label, n.path) for n in row] == [("trouser", "trouser/trouser.png")]
