"""Figures and figures-of-merit for the model card, from a run directory and the exported model.

    python -m training.model_card --run runs/default --model-dir service/default_model --out docs/model_card

Writes `loss_curve.png` (pretraining loss per epoch, fine-tuning test top-1 per epoch),
`reconstructions.png` (test images at mask ratios 0.5 / 0.75 / 0.9) and `summary.json`, which
also holds nearest-centroid accuracies of the probe's features (train-set centroids, the 10k test
images as queries) when the probe kept its feature cache.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from model import Checkpoint
from model_dir.schema import read_model_json
from training.data import build_dataset
from training.figures import line_plot, reconstruction_grid


def epoch_records(metrics: Path) -> dict[int, dict]:
    """The per-epoch records of a JSONL log (the last one wins when a resumed run repeated an epoch)."""
    records = {}
    for line in metrics.read_text().splitlines():
        r = json.loads(line)
        if "step" not in r and "epoch" in r:
            records.setdefault(r["epoch"], {}).update(r)
    return dict(sorted(records.items()))


def nearest_centroid(features: Path) -> dict[str, float]:
    """Top-1 of a nearest-centroid classifier (Euclidean) on the probe's cached features, four ways:
    as served, L2-normalized, standardized per dimension, and whitened (training-set covariance)."""
    x_train, y_train, x_test, y_test = (t.double() for t in torch.load(features, weights_only=True))
    mean, std = x_train.mean(0), x_train.std(0)
    eigval, eigvec = torch.linalg.eigh(torch.cov((x_train - mean).T))
    whiten = eigvec / eigval.clamp_min(1e-12).sqrt()
    unit = torch.nn.functional.normalize
    views = {"raw": (x_train, x_test), "l2_normalized": (unit(x_train), unit(x_test)),
             "standardized": ((x_train - mean) / std, (x_test - mean) / std),
             "whitened": ((x_train - mean) @ whiten, (x_test - mean) @ whiten)}
    out = {}
    for name, (a, b) in views.items():
        centroids = torch.stack([a[y_train == c].mean(0) for c in range(int(y_train.max()) + 1)])
        out[name] = 100 * (torch.cdist(b, centroids).argmin(1) == y_test).double().mean().item()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, default=Path("runs/default"))
    p.add_argument("--model-dir", type=Path, default=Path("service/default_model"))
    p.add_argument("--out", type=Path, default=Path("docs/model_card"))
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    probe_ckpt = Checkpoint.load(args.run / "probe" / "checkpoint-probe.pth")
    # a continued pretraining (init_from) logs its own epochs only; the ones before it shift the epoch axis
    prior = probe_ckpt.metrics["epochs"] - probe_ckpt.metrics.get("epochs_this_run", probe_ckpt.metrics["epochs"])
    pre = epoch_records(args.run / "pretrain" / "metrics.jsonl")
    fine = epoch_records(args.run / "finetune" / "metrics.jsonl")
    line_plot({"pretraining loss (norm-pix MSE, masked patches)": [(prior + e + 1, r["train_loss"])
                                                                  for e, r in pre.items()]},
              args.out / "loss_curve.png", "MAE pretraining on Fashion-MNIST" + (f", continued from epoch {prior}"
                                                                                 if prior else ""), "epoch", "loss")
    if fine:
        line_plot({"fine-tuning test top-1 (%)": [(e + 1, r["test_top1"]) for e, r in fine.items() if "test_top1" in r]},
                  args.out / "finetune_top1.png", "Fine-tuning", "epoch", "top-1 %")

    mae = probe_ckpt.autoencoder()
    data = probe_ckpt.data
    test = build_dataset(data["dataset"], "test", mae.config.img_size, mae.config.in_chans, train=False)
    imgs = torch.stack([test[i][0] for i in range(8)])
    reconstruction_grid(mae, imgs, data["mean"], data["std"], (0.5, 0.75, 0.9), args.out / "reconstructions.png")

    classifier = read_model_json(args.model_dir).classifier
    summary = {
        "pretrain_epochs": prior + len(pre),
        "pretrain_prior_epochs": prior,
        "pretrain_seconds": round(sum(r.get("epoch_seconds", 0) for r in pre.values())),
        "pretrain_final_loss": list(pre.values())[-1]["train_loss"],
        "finetune_epochs": len(fine),
        "finetune_seconds": round(sum(r.get("epoch_seconds", 0) for r in fine.values())),
        "probe": probe_ckpt.classifier.metrics,
        "finetune_top1": list(fine.values())[-1].get("test_top1") if fine else None,
        "classifier": classifier and classifier.model_dump(mode="json"),
        "model_dir_bytes": sum(f.stat().st_size for f in args.model_dir.iterdir()),
    }
    cache = probe_ckpt.args.get("feature_cache")
    if cache and Path(cache).is_file():
        summary["nearest_centroid_top1"] = nearest_centroid(Path(cache))
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
