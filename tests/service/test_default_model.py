"""The bundled default model (trained here on Fashion-MNIST): it loads, serves, and is right on real test images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from service_helpers import ROOT, make_client

from benchmarks.knn_retrieval import weighted_knn
from model_dir.schema import MODEL_JSON, Knn, ModelDirError, load_model_dir
from service.settings import BUNDLED_MODEL_DIR

FIXTURE = ROOT / "tests" / "fixtures" / "fmnist"
IMAGES = json.loads((FIXTURE / "labels.json").read_text())["images"]


@pytest.fixture(scope="module")
def client():
    with make_client(BUNDLED_MODEL_DIR, max_images_per_request=32) as c:
        yield c


def post_all(client, route: str, **params) -> list[dict]:
    out = []
    for start in range(0, len(IMAGES), 25):
        chunk = IMAGES[start:start + 25]
        files = [("image", (r["file"], (FIXTURE / r["file"]).read_bytes(), "image/png")) for r in chunk]
        resp = client.post(route, files=files, params=params)
        assert resp.status_code == 200, resp.text
        out += resp.json()["data"]
    return out


def test_bundled_directory_passes_the_loader_checks():
    model_dir = load_model_dir(BUNDLED_MODEL_DIR)  # sha256 of every file against model.json
    spec = model_dir.spec
    assert spec.labels == json.loads((FIXTURE / "labels.json").read_text())["labels"]
    assert spec.architecture.img_size == 28 and spec.architecture.in_chans == 1
    assert model_dir.has("decoder") and model_dir.has("classifier")
    assert sum(f.stat().st_size for f in Path(BUNDLED_MODEL_DIR).iterdir()) <= 30_000_000


def test_its_knn_figures_load_typed_and_as_recorded():
    knn = load_model_dir(BUNDLED_MODEL_DIR).spec.training.knn
    assert isinstance(knn, Knn) and knn.k == 20 and knn.cls_mean is not None and knn.classifier is not None
    assert knn.model_dump() == json.loads((Path(BUNDLED_MODEL_DIR) / MODEL_JSON).read_text())["training"]["knn"]
    partial = Knn.model_validate({"k": 20, "temperature": 0.07, "cls": {"test_top1": 80, "fixture_top1": 60}})
    assert set(partial.model_dump()) == {"k", "temperature", "cls"}  # a source not measured is left out, not null


@pytest.mark.parametrize(("edit", "problem"), [
    (lambda knn: knn.update(k="twenty"), r"training\.knn\.k: Input should be a valid integer"),
    (lambda knn: knn["cls+mean"].pop("fixture_top1"), r"training\.knn\.cls\+mean\.fixture_top1: Field required"),
    (lambda knn: knn.update(cls_mean=knn["cls+mean"]), r"training\.knn\.cls_mean: Extra inputs"),
])
def test_a_malformed_knn_record_is_refused(tmp_path, edit, problem):
    raw = json.loads((Path(BUNDLED_MODEL_DIR) / MODEL_JSON).read_text())
    edit(raw["training"]["knn"])
    (tmp_path / MODEL_JSON).write_text(json.dumps(raw))
    with pytest.raises(ModelDirError, match=problem):
        load_model_dir(tmp_path)  # refused on model.json, before any file is looked for


def test_server_starts_on_it_and_reports_the_model(client):
    info = client.get("/info").json()
    assert info["model"]["name"] == "mae-vit-tiny-fmnist"


def test_classify_is_right_on_at_least_85_percent_of_the_fixture(client):
    data = post_all(client, "/classify", top_k=1)
    predicted = [d["predictions"][0]["class_id"] for d in data]
    accuracy = np.mean([p == r["class_id"] for p, r in zip(predicted, IMAGES, strict=True)])
    assert accuracy >= 0.85, accuracy


def test_embeddings_knn_matches_the_reported_figure(client):
    """Weighted kNN (k = 20, cosine, as benchmarks/knn_retrieval.py), leave-one-out over the fixture's /embed
    vectors: within a point of the figure that script recorded in model.json and /info reports."""
    reported = client.get("/info").json()["model"]["training"]["knn"]
    for pooling in ("cls+mean", "mean"):
        emb = np.array([d["embedding"] for d in post_all(client, "/embed", normalize=True, pooling=pooling)],
                       dtype=np.float32)
        labels = np.array([r["class_id"] for r in IMAGES])
        top1 = float(np.mean(weighted_knn(emb, labels, emb, leave_one_out=True) == labels)) * 100
        assert abs(top1 - reported[pooling]["fixture_top1"]) <= 1.0, (pooling, top1, reported[pooling])


def test_classifier_source_knn_matches_the_reported_figure(client):
    """The same vote on /embed?source=classifier (the fine-tuned classifier's pooled features, which cluster by
    class): within a point of the recorded figure, which /info reports with the source."""
    source = client.get("/info").json()["embedding_sources"]["classifier"]
    recorded = json.loads((Path(BUNDLED_MODEL_DIR) / "model.json").read_text())["training"]["knn"]["classifier"]
    assert source["dim"] == 128 and source["knn"]["fixture_top1"] == recorded["fixture_top1"]
    emb = np.array([d["embedding"] for d in post_all(client, "/embed", source="classifier")], dtype=np.float32)
    labels = np.array([r["class_id"] for r in IMAGES])
    top1 = float(np.mean(weighted_knn(emb, labels, emb, leave_one_out=True) == labels)) * 100
    assert abs(top1 - source["knn"]["fixture_top1"]) <= 1.0, top1
