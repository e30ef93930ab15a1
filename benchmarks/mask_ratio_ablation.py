"""Why does a high masking ratio work? The mask-ratio curve: two seeds per ratio at an equal budget per run.

Per (ratio, seed), the default model's recipe at a shorter schedule: `mae-train` (configs/pretrain_fmnist.toml,
all 60k training images, `--epochs`, warmup a tenth of them), then on the result
- the linear probe: `mae-probe`, L-BFGS logistic regression on cls+mean features of the first 20k training
  images, top-1 on the 10k test split;
- a short fine-tune: label_efficiency.py's MAE-pretrained recipe on its 10% subset (600 images per class,
  4 epochs = 372 steps of 64), top-1 on the 10k test split;
- the reconstruction MSE on the masked patches of 1,000 test images (norm-pix target space), at the run's
  own ratio and at a common 0.75, and the final training loss.
The seed sets the pretraining (init, masks, crops) and the fine-tune subset. Runs are resumable and shared by
workers through claim files (benchmarks/run_plan.py); `collect` writes the JSON, the plots and a table.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/mask_ratio_ablation.py run --worker 0 &
    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/mask_ratio_ablation.py run --worker 1 &
    python benchmarks/mask_ratio_ablation.py collect
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from model import Checkpoint, load_checkpoint
from training import pretrain, probe
from training.data import build_dataset
from training.figures import line_plot

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.label_efficiency import finetune_run  # noqa: E402
from benchmarks.run_plan import results, work  # noqa: E402

OUT = Path("runs/mask_ratio")
RESULTS = Path("docs/model_card")
RATIOS = [0.25, 0.5, 0.75, 0.9]
EXTRA_RATIOS = [0.6]  # last in the plan: run if time allows
SEEDS = [0, 1]
PROBE_IMAGES = 20000
MEASURES = {"probe_top1": "linear probe top-1 (%)", "finetune_top1": "fine-tune top-1, 10% labels (%)",
            "mse_own_ratio": "masked MSE at own ratio", "mse_at_0.75": "masked MSE at 0.75"}


@torch.no_grad()
def masked_mse(model, imgs: torch.Tensor, ratio: float, seed: int = 0) -> float:
    noise = torch.rand(imgs.shape[0], model.config.num_patches, generator=torch.Generator().manual_seed(seed))
    loss, _, _ = model(imgs, mask_ratio=ratio, noise=noise)
    return loss.item()


def ratio_run(run: Path, ratio: float, seed: int, epochs: int) -> dict:
    """Pretrain at `ratio`, then probe, fine-tune and measure reconstruction; every step resumes or is redone."""
    pretrain_argv = ["--config", "configs/pretrain_fmnist.toml", "--mask-ratio", str(ratio), "--seed", str(seed),
                     "--epochs", str(epochs), "--warmup-epochs", f"{epochs / 10:g}", "--output-dir",
                     str(run / "pretrain"), "--save-every", "1", "--resume", "auto", "--no-preview", "--quiet"]
    t0 = time.perf_counter()
    pretrain.cli(pretrain_argv)
    pretrain_s = time.perf_counter() - t0
    checkpoint = run / "pretrain" / "checkpoint-final.pth"
    probe_argv = ["--checkpoint", str(checkpoint), "--output", str(run / "probe.pth"), "--optimizer", "lbfgs",
                  "--pooling", "cls+mean", "--l2", "1e-5", "--limit", str(PROBE_IMAGES), "--quiet"]
    probe.cli(probe_argv)
    tuned = finetune_run(run / "finetune", arm="pretrained", size="10%", seed=seed, blr=1e-3, checkpoint=checkpoint)
    model = load_checkpoint(checkpoint)
    test = build_dataset("fashion-mnist", "test", 28, 1, train=False, limit=1000)
    imgs = torch.stack([test[i][0] for i in range(len(test))])
    log = [json.loads(line) for line in (run / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    return {"mask_ratio": ratio, "seed": seed, "epochs": epochs,
            "probe_top1": Checkpoint.load(run / "probe.pth").classifier.metrics["probe_top1"],
            "finetune_top1": tuned["top1"], "finetune_steps": tuned["steps"],
            "mse_own_ratio": masked_mse(model, imgs, ratio), "mse_at_0.75": masked_mse(model, imgs, 0.75),
            "final_train_loss": [r["train_loss"] for r in log if "train_loss" in r][-1],
            "pretrain_epoch_seconds": sum(r["epoch_seconds"] for r in log if "epoch_seconds" in r),
            "pretrain_seconds_this_session": round(pretrain_s),
            "commands": ["mae-train " + " ".join(pretrain_argv), "mae-probe " + " ".join(probe_argv),
                         tuned["command"]]}


def plan(epochs: int) -> list:
    """Both seeds of the four ratios (slowest first, so two workers finish together), then the extra ratio."""
    return [(f"ratio-{ratio:g}-seed{seed}", lambda run, ratio=ratio, seed=seed: ratio_run(run, ratio, seed, epochs))
            for ratio in RATIOS + EXTRA_RATIOS for seed in SEEDS]


def collect(epochs: int) -> dict:
    """docs/model_card/mask_ratio_ablation.json (every run, mean ± std per ratio), two plots, a markdown table."""
    runs = sorted(results(OUT), key=lambda r: (r["mask_ratio"], r["seed"]))
    summary = []
    for ratio in sorted({r["mask_ratio"] for r in runs}):
        rows = [r for r in runs if r["mask_ratio"] == ratio]
        entry = {"mask_ratio": ratio, "n": len(rows)}
        for key in [*MEASURES, "final_train_loss", "pretrain_epoch_seconds"]:
            values = [r[key] for r in rows]
            entry[key] = {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else None}
        summary.append(entry)
    # Seeds share their effect across ratios (same init and crops): the paired difference is the sharper test.
    by_key = {(r["mask_ratio"], r["seed"]): r["probe_top1"] for r in runs}
    for entry in summary:
        entry["probe_top1_minus_0.75_by_seed"] = {
            seed: by_key[entry["mask_ratio"], seed] - by_key[0.75, seed] for seed in SEEDS
            if (entry["mask_ratio"], seed) in by_key and (0.75, seed) in by_key}
    out = {"model": "mae_vit_tiny_fmnist", "train_images": 60000, "epochs": epochs, "probe_images": PROBE_IMAGES,
           "seeds": SEEDS, "summary": summary, "runs": runs}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "mask_ratio_ablation.json").write_text(json.dumps(out, indent=1))
    for keys, name, ylabel in [(["probe_top1"], "mask_ratio_probe.png", "top-1 % (mean ± std)"),
                               (["finetune_top1"], "mask_ratio_finetune.png", "top-1 % (mean ± std)"),
                               (["mse_own_ratio", "mse_at_0.75"], "mask_ratio_mse.png", "MSE (mean ± std)")]:
        line_plot({MEASURES[k]: [(s["mask_ratio"], s[k]["mean"]) for s in summary] for k in keys},
                  RESULTS / name, f"Mask ratio, {len(SEEDS)} seeds, {epochs} epochs each", "mask ratio", ylabel,
                  errors={MEASURES[k]: [s[k]["std"] or 0.0 for s in summary] for k in keys})
    print("| mask ratio | seeds | probe top-1 | fine-tune top-1 (10%) | MSE own ratio | MSE at 0.75 | final loss |"
          " pretraining s |\n|---|---|---|---|---|---|---|---|")
    for s in summary:
        cells = [f"{s[k]['mean']:.2f} ± {s[k]['std'] or 0:.2f}" for k in ("probe_top1", "finetune_top1")]
        cells += [f"{s[k]['mean']:.4f} ± {s[k]['std'] or 0:.4f}" for k in ("mse_own_ratio", "mse_at_0.75",
                                                                            "final_train_loss")]
        print(f"| {s['mask_ratio']} | {s['n']} | " + " | ".join(cells) + f" | {s['pretrain_epoch_seconds']['mean']:.0f} |")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("stage", choices=["run", "collect"])
    p.add_argument("--epochs", type=int, default=3, help="pretraining epochs per run (all 60k images)")
    p.add_argument("--worker", default="0", help="this worker's name in the log")
    args = p.parse_args()
    if args.stage == "run":
        torch.set_num_threads(1)
        work(plan(args.epochs), OUT, f"worker {args.worker}")
    else:
        collect(args.epochs)


if __name__ == "__main__":
    main()
