"""Why does a high masking ratio work? A mask-ratio ablation at a short, equal budget per run.

For each ratio: `mae-train` (same config, images, epochs and seed), `mae-probe` (the default model's
probe recipe: L-BFGS on cls+mean features), and the reconstruction MSE on masked patches of test
images, at the run's own ratio and at a common 0.75. Writes a table (JSON + markdown) and a plot.

    python benchmarks/mask_ratio_ablation.py [--ratios 0.25 0.5 0.75 0.9] [--limit 20000] [--epochs 2]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from model import Checkpoint, load_checkpoint
from training import pretrain, probe
from training.data import build_dataset
from training.figures import line_plot


@torch.no_grad()
def masked_mse(model, imgs: torch.Tensor, ratio: float, seed: int = 0) -> float:
    noise = torch.rand(imgs.shape[0], model.config.num_patches, generator=torch.Generator().manual_seed(seed))
    loss, _, _ = model(imgs, mask_ratio=ratio, noise=noise)
    return loss.item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5, 0.75, 0.9])
    p.add_argument("--model", default="mae_vit_tiny_fmnist")
    p.add_argument("--limit", type=int, default=20000, help="training images per run")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("runs/ablation"))
    p.add_argument("--results", type=Path, default=Path("docs/model_card"))
    args = p.parse_args()
    test = build_dataset("fashion-mnist", "test", 28, 1, train=False, limit=1000)
    imgs = torch.stack([test[i][0] for i in range(len(test))])
    rows = []
    for ratio in args.ratios:
        run = args.out / f"ratio-{ratio:g}"
        t0 = time.perf_counter()
        pretrain.cli(["--model", args.model, "--mask-ratio", str(ratio), "--limit", str(args.limit),
                      "--epochs", str(args.epochs), "--warmup-epochs", "0.5", "--blr", "1.5e-3",
                      "--output-dir", str(run), "--no-preview", "--quiet", "--resume", "auto"])
        train_s = time.perf_counter() - t0
        probe.cli(["--checkpoint", str(run / "checkpoint-final.pth"), "--output", str(run / "probe.pth"),
                   "--optimizer", "lbfgs", "--pooling", "cls+mean", "--l2", "1e-5", "--limit", str(args.limit),
                   "--quiet"])
        model = load_checkpoint(run / "checkpoint-final.pth")
        rows.append({
            "mask_ratio": ratio,
            "probe_top1": Checkpoint.load(run / "probe.pth").classifier.metrics["probe_top1"],
            "mse_own_ratio": masked_mse(model, imgs, ratio),
            "mse_at_0.75": masked_mse(model, imgs, 0.75),
            "train_seconds": round(train_s),
        })
        print(json.dumps(rows[-1]), flush=True)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "mask_ratio_ablation.json").write_text(json.dumps(
        {"model": args.model, "train_images": args.limit, "epochs": args.epochs, "rows": rows}, indent=2))
    line_plot({"linear probe top-1 (%)": [(r["mask_ratio"], r["probe_top1"]) for r in rows]},
              args.results / "mask_ratio_probe.png", "Mask-ratio ablation: linear probe", "mask ratio", "top-1 %")
    line_plot({"own ratio": [(r["mask_ratio"], r["mse_own_ratio"]) for r in rows],
               "at 0.75": [(r["mask_ratio"], r["mse_at_0.75"]) for r in rows]},
              args.results / "mask_ratio_mse.png", "Mask-ratio ablation: masked-patch MSE (norm-pix)",
              "mask ratio", "MSE")
    print("| mask ratio | probe top-1 | MSE (own ratio) | MSE (at 0.75) | train s |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mask_ratio']} | {r['probe_top1']:.2f} | {r['mse_own_ratio']:.4f} | {r['mse_at_0.75']:.4f} "
              f"| {r['train_seconds']} |")


if __name__ == "__main__":
    main()
