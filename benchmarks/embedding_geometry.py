"""Is there an encoder feature whose Euclidean geometry suits nearest-centroid search? A sweep over depth.

For every block of a pretrained encoder (and the final LayerNorm, the served features), with cls,
mean-of-patches and cls+mean pooling, as is and standardized per dimension (training statistics), all
L2-normalized as `/embed?normalize=true` returns them, it reports the top-1 of a nearest-centroid
classifier three ways:
  - `full`: centroids from all 60k training images, the 10k test images as queries;
  - `fixture`: the test the issue sets (tests/service/test_default_model.py): test images 0..199,
    the first 10 of each class as centroids, the other 100 as queries;
  - `ten_shot`: the same protocol on 200 random draws from the test split (10 centroid images and
    10 queries per class): the mean and the share of draws above 0.75.
Writes benchmarks/results/embedding_geometry.json and prints the rows sorted by `ten_shot`.

    .venv/bin/python benchmarks/embedding_geometry.py [--checkpoint runs/default/pretrain/checkpoint-final.pth]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from a source tree

from model import Checkpoint  # noqa: E402
from training.data import build_dataset  # noqa: E402

POOLINGS = ("cls", "mean", "cls+mean")


@torch.no_grad()
def depth_features(encoder, dataset, batch_size: int = 1000) -> torch.Tensor:
    """[N, blocks + 1, 2, D]: (cls, mean of patches) after every block, then after the final norm."""
    out = []
    for start in range(0, len(dataset), batch_size):
        imgs = torch.stack([dataset[i][0] for i in range(start, min(start + batch_size, len(dataset)))])
        x = encoder.patch_embed(imgs) + encoder.pos_embed[:, 1:, :]
        cls = (encoder.cls_token + encoder.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        per_depth = []
        for block in encoder.blocks:
            x = block(x)
            per_depth.append(torch.stack([x[:, 0], x[:, 1:].mean(1)], dim=1))
        x = encoder.norm(x)
        per_depth.append(torch.stack([x[:, 0], x[:, 1:].mean(1)], dim=1))
        out.append(torch.stack(per_depth, dim=1))
    return torch.cat(out)


def centroid_top1(refs: torch.Tensor, ref_labels: torch.Tensor, queries: torch.Tensor, labels: torch.Tensor) -> float:
    centroids = torch.stack([refs[ref_labels == c].mean(0) for c in range(10)])
    return (torch.cdist(queries, centroids).argmin(1) == labels).double().mean().item()


def protocols(train: torch.Tensor, y_train: torch.Tensor, test: torch.Tensor, y_test: torch.Tensor,
              draws: int) -> dict[str, float]:
    out = {"full": centroid_top1(train, y_train, test, y_test)}
    y, e = y_test[:200], test[:200]
    is_ref = torch.zeros(200, dtype=torch.bool)
    for c in range(10):
        is_ref[(y == c).nonzero()[:10, 0]] = True
    out["fixture"] = centroid_top1(e[is_ref], y[is_ref], e[~is_ref], y[~is_ref])
    g = torch.Generator().manual_seed(0)
    scores = []
    for _ in range(draws):
        picks = [idx[torch.randperm(len(idx), generator=g)[:20]] for idx in
                 ((y_test == c).nonzero()[:, 0] for c in range(10))]
        ref, query = torch.cat([p[:10] for p in picks]), torch.cat([p[10:] for p in picks])
        scores.append(centroid_top1(test[ref], y_test[ref], test[query], y_test[query]))
    scores_t = torch.tensor(scores)
    out["ten_shot_mean"], out["ten_shot_share_above_0.75"] = scores_t.mean().item(), (scores_t > 0.75).double().mean().item()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, default=Path("runs/default/pretrain/checkpoint-final.pth"))
    p.add_argument("--draws", type=int, default=200)
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks/results/embedding_geometry.json")
    args = p.parse_args()
    ckpt = Checkpoint.load(args.checkpoint)
    encoder, config = ckpt.autoencoder(str(args.checkpoint)).eval(), ckpt.config
    data = {split: build_dataset("fashion-mnist", split, config.img_size, config.in_chans, train=False)
            for split in ("train", "test")}
    feats = {split: depth_features(encoder, ds) for split, ds in data.items()}
    y_train, y_test = (torch.tensor(data[s].targets) for s in ("train", "test"))
    rows = []
    depths = feats["train"].shape[1]
    for depth in range(depths):
        for pooling in POOLINGS:
            pick = {"cls": slice(0, 1), "mean": slice(1, 2), "cls+mean": slice(0, 2)}[pooling]
            train, test = (feats[s][:, depth, pick].flatten(1).double() for s in ("train", "test"))
            for standardized in (False, True):
                a, b = train, test
                if standardized:
                    mean, std = a.mean(0), a.std(0) + 1e-6
                    a, b = (a - mean) / std, (b - mean) / std
                row = {"depth": "final_norm" if depth == depths - 1 else f"block_{depth + 1}", "pooling": pooling,
                       "standardized": standardized,
                       **protocols(F.normalize(a, dim=1), y_train, F.normalize(b, dim=1), y_test, args.draws)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    record = {"checkpoint": str(args.checkpoint), "draws": args.draws, "rows": rows}
    args.results.write_text(json.dumps(record, indent=1) + "\n")
    print("\n| depth | pooling | standardized | full | fixture | 10-shot mean | 10-shot > 0.75 |\n|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: -r["ten_shot_mean"])[:8]:
        print(f"| {r['depth']} | {r['pooling']} | {r['standardized']} | {r['full']:.3f} | {r['fixture']:.3f} | "
              f"{r['ten_shot_mean']:.3f} | {r['ten_shot_share_above_0.75']:.3f} |")


if __name__ == "__main__":
    main()
