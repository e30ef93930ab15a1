"""Retrieval quality of a model directory's embeddings: the standard weighted kNN protocol (as in DINO).

Every Fashion-MNIST training image is the memory, every test image a query; both are embedded by the
directory's fp32 `encoder.onnx` on the full image (what `/embed` computes), pooled as `/embed` pools
(cls, mean of the patch tokens, both concatenated) and L2-normalized. A query's k = 20 nearest memory
images by cosine similarity vote for their class with weight exp(similarity / 0.07); the top vote is
the prediction (Wu et al. 2018; Caron et al. 2021). When the directory's classifier graph has a `features`
output (its pooled features, the input of its final Linear layer), the same protocol runs on them,
normalized: what `/embed` serves with `source=classifier`.

`fixture` is the figure the test suite checks through the server (tests/service/test_default_model.py):
the same vote, leave-one-out over the 200 fixture images (test images 0..199), from their PNG files.

    .venv/bin/python benchmarks/knn_retrieval.py [--model-dir service/default_model] [--record]

Writes docs/model_card/knn.json; `--record` also stores the figures in the directory's model.json
(`training.knn`), which `/info` reports.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from a source tree

from model_dir.schema import Knn, ModelDir, load_model_dir, write_model_json  # noqa: E402

K, TEMPERATURE, NUM_CLASSES = 20, 0.07, 10
FIXTURE = ROOT / "tests" / "fixtures" / "fmnist"
POOLINGS = ("cls", "mean", "cls+mean")


def weighted_knn(memory: np.ndarray, memory_labels: np.ndarray, queries: np.ndarray,
                 leave_one_out: bool = False, chunk: int = 1000) -> np.ndarray:
    """Predicted class per query: the k nearest (cosine) memory rows vote with weight exp(sim / T).

    Rows must be L2-normalized. With `leave_one_out`, queries are the memory itself and a row never votes
    for itself.
    """
    predictions = np.empty(len(queries), dtype=np.int64)
    for start in range(0, len(queries), chunk):
        sim = queries[start:start + chunk] @ memory.T  # [q, M]
        if leave_one_out:
            rows = np.arange(sim.shape[0])
            sim[rows, start + rows] = -np.inf
        top = np.argpartition(-sim, K, axis=1)[:, :K]  # [q, K] unordered: a vote does not need the order
        weights = np.exp(np.take_along_axis(sim, top, axis=1) / TEMPERATURE)
        votes = np.zeros((sim.shape[0], NUM_CLASSES))
        np.add.at(votes, (np.arange(sim.shape[0])[:, None], memory_labels[top]), weights)
        predictions[start:start + chunk] = votes.argmax(1)
    return predictions


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


class Features:
    """The directory's fp32 graphs on normalized pixels: /embed's poolings and the classifier's features."""

    def __init__(self, directory: ModelDir):
        spec = directory.spec
        self.mean = np.float32(spec.preprocessing.mean[0])
        self.std = np.float32(spec.preprocessing.std[0])
        self.num_patches = spec.architecture.num_patches
        options = ort.SessionOptions()
        self.encoder = ort.InferenceSession(str(directory.path("encoder")), options, providers=["CPUExecutionProvider"])
        self.classifier = None
        if spec.classifier_features_dim() is not None:
            self.classifier = ort.InferenceSession(str(directory.path("classifier")), options,
                                                   providers=["CPUExecutionProvider"])

    def __call__(self, images_u8: np.ndarray, batch: int = 500) -> dict[str, np.ndarray]:
        """images [N, 28, 28] uint8 -> {source: [N, D] unit-norm float32}."""
        out: dict[str, list[np.ndarray]] = {p: [] for p in (*POOLINGS, "classifier")}
        for start in range(0, len(images_u8), batch):
            pixels = ((images_u8[start:start + batch, None].astype(np.float32) / 255) - self.mean) / self.std
            ids_keep = np.tile(np.arange(self.num_patches, dtype=np.int64), (len(pixels), 1))
            latent = self.encoder.run(None, {"pixels": pixels, "ids_keep": ids_keep})[0]
            cls, mean = latent[:, 0], latent[:, 1:].mean(1)
            out["cls"].append(cls)
            out["mean"].append(mean)
            out["cls+mean"].append(np.concatenate([cls, mean], axis=1))
            if self.classifier is not None:
                out["classifier"].append(self.classifier.run(["features"], {"pixels": pixels})[0])
        return {source: unit(np.concatenate(rows)) for source, rows in out.items() if rows}


def load_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    from training.data import FASHION_MNIST_DIR, read_idx  # imported here, as it loads torch

    prefix = {"train": "train", "test": "t10k"}[split]
    images = read_idx(FASHION_MNIST_DIR / f"{prefix}-images-idx3-ubyte.gz")
    labels = read_idx(FASHION_MNIST_DIR / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)
    return images, labels


def load_fixture() -> tuple[np.ndarray, np.ndarray]:
    records = json.loads((FIXTURE / "labels.json").read_text())["images"]
    images = np.stack([np.asarray(Image.open(io.BytesIO((FIXTURE / r["file"]).read_bytes())).convert("L"))
                       for r in records])
    return images, np.array([r["class_id"] for r in records])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", type=Path, default=ROOT / "service" / "default_model")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "model_card" / "knn.json")
    p.add_argument("--record", action="store_true", help="store the figures in the directory's model.json")
    args = p.parse_args()
    directory = load_model_dir(args.model_dir)
    features = Features(directory)
    started = time.monotonic()
    (train, y_train), (test, y_test), (fixture, y_fixture) = load_split("train"), load_split("test"), load_fixture()
    f_train, f_test, f_fixture = features(train), features(test), features(fixture)
    print(f"features of {len(train) + len(test) + len(fixture)} images in {time.monotonic() - started:.0f} s")
    rows = {}
    for source in f_train:
        test_top1 = float(np.mean(weighted_knn(f_train[source], y_train, f_test[source]) == y_test)) * 100
        fixture_top1 = float(np.mean(weighted_knn(f_fixture[source], y_fixture, f_fixture[source],
                                                  leave_one_out=True) == y_fixture)) * 100
        rows[source] = {"test_top1": round(test_top1, 2), "fixture_top1": round(fixture_top1, 2)}
        print(f"{source:>10}: kNN top-1 {test_top1:.2f}% (test split, train memory), fixture {fixture_top1:.1f}%")
    record = {"protocol": {"k": K, "temperature": TEMPERATURE, "similarity": "cosine", "memory": "fashion-mnist train",
                           "queries": "fashion-mnist test", "fixture": "leave-one-out over tests/fixtures/fmnist"},
              "model": directory.spec.name, "top1": rows}
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    if args.record:
        spec = directory.spec
        knn = Knn.model_validate({"k": K, "temperature": TEMPERATURE, **rows})  # checked before it is written
        training = spec.training.model_copy(update={"knn": knn})
        write_model_json(directory.root, spec.model_copy(update={"training": training}))
    print(f"wrote {args.out}" + (f" and {args.model_dir / 'model.json'}" if args.record else ""))


if __name__ == "__main__":
    main()
