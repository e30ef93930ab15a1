"""The bundled model's quality figures as the server gives them: the test split through HTTP, per precision.

For each precision, `python -m service` serves the model directory on a free port and the Python client
(`service/client.py`) sends it Fashion-MNIST as PNG files:
- `/classify` on the 10k test images: top-1 of the served classifier, against model.json's `classifier.top1`;
- `/embed` (`cls+mean`, unnormalized, the probe's features) on the 60k training and 10k test images, then the
  probe's recipe on what came back (`training/probe.py`: BatchNorm + L-BFGS logistic regression, model.json's
  pooling and L2, seed 0, fit on all 60k): top-1 against model.json's `training.probe_top1`.
So a client fitting the model card's probe on served embeddings lands where the card says, or this says by how
much it does not. Writes benchmarks/results/served_quality.json.

    .venv/bin/python benchmarks/served_quality.py [--model-dir service/default_model] [--precisions fp32,int8]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.knn_retrieval import load_split  # noqa: E402
from benchmarks.serve import Server  # noqa: E402
from model_dir.schema import ModelJson, read_model_json  # noqa: E402
from service.client import Client  # noqa: E402
from training.probe import top1, train_head_lbfgs  # noqa: E402


def served(url: str, images: dict[str, np.ndarray], labels: dict[str, np.ndarray], spec: ModelJson) -> dict:
    """The classifier's and the probe's test top-1 from what the server at `url` answers."""
    probe = spec.training.model_extra or {}  # the probe checkpoint's metrics (training/model_json.py)
    pooling, l2 = probe["pooling"], probe["l2"]
    with Client(url, timeout=300) as client:
        started = time.monotonic()
        predicted = np.array([p[0].class_id for p in client.classify(list(images["test"]), top_k=1)])
        classify_s = time.monotonic() - started
        started = time.monotonic()
        x = {split: torch.from_numpy(client.embed(list(images[split]), pooling=pooling, normalize=False))
             for split in ("train", "test")}
        embed_s = time.monotonic() - started
    y = {split: torch.from_numpy(labels[split]) for split in labels}
    head = train_head_lbfgs(x["train"], y["train"], len(spec.labels), l2, seed=0)
    return {"classifier_top1": round(float(np.mean(predicted == labels["test"])) * 100, 2),
            "probe_top1": round(top1(head, x["test"], y["test"]), 2),
            "probe": {"pooling": pooling, "l2": l2, "train_images": len(x["train"])},
            "seconds": {"classify_10k": round(classify_s, 1), "embed_70k": round(embed_s, 1)}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", type=Path, default=ROOT / "service" / "default_model")
    p.add_argument("--precisions", default="fp32,int8")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "served_quality.json")
    args = p.parse_args()
    spec = read_model_json(args.model_dir)
    images, labels = {}, {}
    for split in ("train", "test"):
        images[split], labels[split] = load_split(split)
    if spec.classifier is None:
        raise SystemExit(f"{args.model_dir}: no classifier to measure")
    recorded = {"classifier_top1": spec.classifier.top1,
                "probe_top1": round((spec.training.model_extra or {})["probe_top1"], 2)}
    rows = {}
    for precision in args.precisions.split(","):
        server = Server(args.model_dir, "--precision", precision)
        try:
            rows[precision] = served(server.url, images, labels, spec)
        finally:
            server.stop()
        row = rows[precision]
        print(f"{precision}: classifier {row['classifier_top1']:.2f}% (model.json {recorded['classifier_top1']}), "
              f"probe on served embeddings {row['probe_top1']:.2f}% (model.json {recorded['probe_top1']})", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": spec.name, "version": spec.version, "model_json": recorded,
                                    "served": rows}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
