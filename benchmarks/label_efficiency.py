"""Label efficiency: the default architecture fine-tuned from scratch vs from the MAE-pretrained encoder,
and the linear probe on frozen MAE vs frozen random-init features, on class-balanced subsets of the
Fashion-MNIST training split (top-1 on the full 10k test split).

Every fine-tune is a `mae-finetune` call (flags `--init`, `--subset-per-class`, `--subset-seed`,
`--val-size`), with the same recipe, augmentation and step budget for both arms at each size; the
probes use `training/probe.py`'s L-BFGS logistic regression on features extracted once per encoder.
Runs are resumable (`--resume auto`; a finished run leaves `result.json` and is skipped), and
several `run` processes share the plan by claim files (a claim of a dead process is taken over); the
scratch arm's lr sweep (on images held out of the training split) runs first and its finals wait for it.

    python benchmarks/label_efficiency.py prepare   # the 25-epoch MAE's weights as a checkpoint, checked
    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/label_efficiency.py run --worker 0 --extra-seed --long-10pct 1000 &
    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/label_efficiency.py run --worker 1 --extra-seed --long-10pct 1000 &
    python benchmarks/label_efficiency.py collect   # JSON and plot in docs/model_card/

`--full` adds the 100% arms last (one seed; ~25 min per arm on one thread). In a new checkout whose runs/ is
gone, `restore` first writes the recorded results back, so `run` does only what is missing.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from model import Checkpoint, MaskedAutoencoderViT, get_config
from model.stats import FASHION_MNIST_MEAN, FASHION_MNIST_STD
from model_dir.schema import load_model_dir
from training import finetune, probe
from training.data import FASHION_MNIST_LABELS, build_dataset, keep_class_balanced
from training.figures import line_plot
from training.weights import recover_weights

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.run_plan import results, work  # noqa: E402

OUT = Path("runs/label_efficiency")
RESULTS = Path("docs/model_card")
MODEL = "mae_vit_tiny_fmnist"
PER_CLASS = {"1%": 60, "10%": 600, "100%": 6000}
PROBE_SIZES = ["1%", "10%"]
BATCH = 64
# the same for both arms at each size; sized for one 2-core session (~0.5-1 s per step on one thread): 1% is
# 44 epochs of 9 steps, 10% 4 epochs of 93 steps, 100% 3 epochs of 937 steps (run last, `run --full`)
BUDGET_STEPS = {"1%": 400, "10%": 400, "100%": 2811}
SEEDS = {"1%": [0, 1, 2], "10%": [0, 1], "100%": [0]}  # and 10% seed 2 with `run --extra-seed`
# the recipe of configs/finetune_fmnist.toml; the scratch arm gets layer decay 1.0 (nothing pretrained to keep)
RECIPE = ["--batch-size", str(BATCH), "--drop-path", "0.1", "--label-smoothing", "0.1", "--crop-scale-min", "0.8",
          "--weight-decay", "0.05", "--min-lr", "1e-6"]
ARMS = {"pretrained": {"init": "pretrained", "layer_decay": 0.75, "blr": 1e-3},
        "scratch": {"init": "scratch", "layer_decay": 1.0, "blr": None}}  # scratch blr: chosen by `tune`
TUNE_BLRS = [5e-4, 1.5e-3, 4e-3, 1e-2]
WARMUP_FRACTION = 0.1  # of the step budget
PROBE_L2 = [1e-4, 1e-3, 1e-2, 1e-1]
PROBE_VAL_FRACTION = 0.2  # of the subset, held out to choose pooling and L2
PLOT_NAMES = {"pretrained": "fine-tuned, MAE-pretrained", "scratch": "fine-tuned, from scratch",
              "probe-mae": "linear probe, frozen MAE encoder", "probe-random": "linear probe, frozen random init"}
VAL_SIZE = 5000
# the recorded runs started from the 25-epoch model bundled until the 45-epoch one replaced it (issue 13)
SOURCE_EPOCHS = 25
SOURCE_COMMIT = "9065975"


def pretrained_checkpoint(model_dir: Path, out: Path) -> Path:
    """The 25-epoch MAE (encoder + decoder) of `model_dir` as a `Checkpoint`, its weights read back from the
    fp32 graphs; checked against encoder.onnx's latent on 16 test images."""
    directory = load_model_dir(model_dir)
    if directory.spec.training.epochs != SOURCE_EPOCHS:
        raise SystemExit(
            f"{model_dir} was pretrained {directory.spec.training.epochs} epochs; the recorded runs started from "
            f"the {SOURCE_EPOCHS}-epoch model of commit {SOURCE_COMMIT}: git archive {SOURCE_COMMIT} "
            f"service/default_model | tar -x -C /tmp/m{SOURCE_EPOCHS}, then prepare --model-dir "
            f"/tmp/m{SOURCE_EPOCHS}/service/default_model")
    model = MaskedAutoencoderViT(get_config(MODEL))
    model.load_state_dict(recover_weights(directory, {"autoencoder": model})["autoencoder"], strict=True)
    model.eval()
    test = build_dataset("fashion-mnist", "test", 28, 1, train=False, limit=16)
    imgs = torch.stack([test[i][0] for i in range(len(test))])
    noise = torch.rand(len(test), model.config.num_patches, generator=torch.Generator().manual_seed(0))
    ids_keep, _, _ = model.random_masking(len(test), 0.75, noise=noise)
    session = ort.InferenceSession(str(directory.path("encoder")), providers=["CPUExecutionProvider"])
    ref = session.run(None, {"pixels": imgs.numpy(), "ids_keep": ids_keep.numpy()})[0]
    with torch.no_grad():
        diff = float(np.abs(model.forward_encoder(imgs, ids_keep).numpy() - ref).max())
    if diff > 1e-4:
        raise SystemExit(f"recovered weights differ from encoder.onnx: max |latent diff| {diff:.2e}")
    _save(model, out, {"source": str(model_dir), "epochs": directory.spec.training.epochs,
                       "latent_max_abs_diff_vs_onnx": diff})
    print(f"{out}: recovered from {model_dir}, max |latent - encoder.onnx| = {diff:.2e}")
    return out


def _save(model: MaskedAutoencoderViT, out: Path, metrics: dict) -> None:
    data = {"dataset": "fashion-mnist", "mean": list(FASHION_MNIST_MEAN), "std": list(FASHION_MNIST_STD),
            "labels": FASHION_MNIST_LABELS}
    Checkpoint(model=model.state_dict(), config=model.config, kind="mae", data=data, metrics=metrics).save(out)


def epochs_for(budget: int, per_class: int) -> int:
    """Whole epochs closest to a step budget (the loader drops the last partial batch)."""
    steps_per_epoch = per_class * len(FASHION_MNIST_LABELS) // BATCH
    return max(1, round(budget / steps_per_epoch))


def finetune_run(run: Path, *, arm: str, size: str, seed: int, blr: float, val: bool = False,
                 budget: int | None = None, checkpoint: Path = OUT / "pretrained-mae.pth") -> dict:
    """One `mae-finetune` run from `checkpoint` (resumed when interrupted); its figures.
    `budget` overrides the size's step budget (a longer-budget check, reported apart)."""
    per_class = PER_CLASS[size]
    epochs = epochs_for(budget or BUDGET_STEPS[size], per_class)
    spec = ARMS[arm]
    argv = ["--checkpoint", str(checkpoint), "--init", spec["init"], *RECIPE,
            "--layer-decay", str(spec["layer_decay"]), "--blr", str(blr), "--epochs", str(epochs),
            "--warmup-epochs", f"{WARMUP_FRACTION * epochs:g}", "--subset-per-class", str(per_class),
            "--subset-seed", str(seed), "--seed", str(seed), "--eval-every", str(epochs),
            "--save-every", str(max(1, epochs // 10)), "--output-dir", str(run), "--resume", "auto", "--quiet"]
    if val:
        argv += ["--val-size", str(VAL_SIZE)]
    t0 = time.perf_counter()
    finetune.cli(argv)
    metrics = Checkpoint.load(run / "checkpoint-last.pth").metrics
    result = {"kind": "finetune", "arm": arm if budget is None else f"{arm}-long", "size": size,
              "per_class": per_class, "seed": seed, "blr": blr,
              "layer_decay": spec["layer_decay"], "epochs": epochs, "steps": metrics["steps"],
              "batch_size": BATCH, "top1": metrics["finetune_top1"], "eval_split": metrics["eval_split"],
              "seconds_this_session": round(time.perf_counter() - t0), "command": "mae-finetune " + " ".join(argv)}
    return result


def probe_runs(encoder_kind: str) -> list[dict]:
    """The linear probe (probe.py's L-BFGS logistic regression; pooling and L2 chosen on a fifth of the subset
    held out) on frozen features, every size and seed: `mae` = the pretrained encoder, `random` = a random
    init (seeded by the subset's seed)."""
    test = build_dataset("fashion-mnist", "test", 28, 1, train=False)
    y_test = test.targets.clone()
    results = []
    for seed in sorted({seed for size in PROBE_SIZES for seed in SEEDS[size]}):
        torch.manual_seed(seed)
        if encoder_kind == "random" or not results:
            encoder = (Checkpoint.load(OUT / "pretrained-mae.pth").autoencoder() if encoder_kind == "mae"
                       else MaskedAutoencoderViT(get_config(MODEL))).eval()
            x_test = probe.extract_latents(encoder, test, quiet=True)
        for size in PROBE_SIZES:
            per_class = PER_CLASS[size]
            train = build_dataset("fashion-mnist", "train", 28, 1, train=False)
            keep_class_balanced(train, per_class, seed)
            x, y = probe.extract_latents(encoder, train, quiet=True), train.targets.clone()
            args = argparse.Namespace(pooling="best", l2=PROBE_L2, val_size=int(PROBE_VAL_FRACTION * len(y)),
                                      optimizer="lbfgs", seed=seed, quiet=True)
            pooling, l2, _ = probe.select_on_validation(x, y, len(FASHION_MNIST_LABELS), args)
            head = probe.train_head(probe.pooled(x, pooling), y, len(FASHION_MNIST_LABELS), args, l2)
            results.append({"kind": "probe", "arm": f"probe-{encoder_kind}", "size": size, "per_class": per_class,
                            "seed": seed, "pooling": pooling, "l2": l2, "eval_split": "test",
                            "top1": probe.top1(head, probe.pooled(x_test, pooling), y_test)})
            print(f"probe {encoder_kind} {size} seed {seed}: {results[-1]['top1']:.2f}% ({pooling}, l2 {l2:g})",
                  flush=True)
    return results


def restore() -> None:
    """Write the runs recorded in docs/model_card/label_efficiency.json back as result.json files (a run's folder
    from its command's --output-dir, the probes as probe/<encoder>), so that a session whose runs/ is gone skips
    them; the checkpoints are not restored, only the results."""
    recorded = json.loads((RESULTS / "label_efficiency.json").read_text())
    found: dict[Path, object] = {}
    for r in recorded["runs"] + recorded["sweep"]:
        if r["kind"] == "probe":
            found.setdefault(OUT / "probe" / r["arm"].removeprefix("probe-"), []).append(r)  # type: ignore[union-attr]
        else:
            argv = r["command"].split()
            found[Path(argv[argv.index("--output-dir") + 1])] = r
    for run, result in found.items():
        if not (run / "result.json").is_file():
            run.mkdir(parents=True, exist_ok=True)
            (run / "result.json").write_text(json.dumps(result, indent=1))
            print(f"restored {run}")


def best_scratch_blr() -> float | None:
    """The scratch arm's blr: the best validation top-1 of the sweep (None until the sweep is done)."""
    runs = [OUT / f"tune/scratch-blr{blr:g}" / "result.json" for blr in TUNE_BLRS]
    if not all(r.is_file() for r in runs):
        return None
    return max((json.loads(r.read_text()) for r in runs), key=lambda r: (r["top1"], -r["blr"]))["blr"]


def plan(extra_seed: bool, long_10pct: int | None, full: bool) -> list[tuple[str, object]]:
    """(run name, thunk) in order; a scratch thunk returns None while the lr sweep is unfinished."""
    jobs: list[tuple[str, object]] = [
        (f"tune/scratch-blr{blr:g}", lambda run, blr=blr: finetune_run(run, arm="scratch", size="1%", seed=0,
                                                                       blr=blr, val=True))
        for blr in TUNE_BLRS]
    jobs += [(f"probe/{kind}", lambda run, kind=kind: probe_runs(kind)) for kind in ("mae", "random")]
    for size in PROBE_SIZES:
        for seed in SEEDS[size] + ([2] if extra_seed and size == "10%" else []):
            for arm in ARMS:
                jobs.append((f"{size.rstrip('%')}pct/{arm}-seed{seed}",
                             lambda run, arm=arm, size=size, seed=seed: _final(run, arm, size, seed)))
    if long_10pct:
        jobs += [(f"10pct-{long_10pct}steps/{arm}-seed0",
                  lambda run, arm=arm: _final(run, arm, "10%", 0, budget=long_10pct)) for arm in ARMS]
    if full:
        jobs += [(f"100pct/{arm}-seed{seed}", lambda run, arm=arm, seed=seed: _final(run, arm, "100%", seed))
                 for seed in SEEDS["100%"] for arm in ARMS]
    return jobs


def _final(run: Path, arm: str, size: str, seed: int, budget: int | None = None) -> dict | None:
    blr = ARMS[arm]["blr"] or best_scratch_blr()
    return None if blr is None else finetune_run(run, arm=arm, size=size, seed=seed, blr=blr, budget=budget)


def collect() -> dict:
    """docs/model_card/label_efficiency.json (every run, the sweep, mean ± std per arm and size) and the plot."""
    runs = results(OUT)
    sweep = [r for r in runs if r["eval_split"] == "val"]
    finals = [r for r in runs if r["eval_split"] == "test"]
    summary = {}
    for arm in [*PLOT_NAMES, *(f"{arm}-long" for arm in ARMS)]:
        for size in PER_CLASS:
            top1 = [r["top1"] for r in finals if r["arm"] == arm and r["size"] == size]
            if top1:
                summary[f"{arm} {size}"] = {"arm": arm, "size": size, "n": len(top1), "mean": statistics.mean(top1),
                                            "std": statistics.stdev(top1) if len(top1) > 1 else None}
    out = {"budget_steps": BUDGET_STEPS, "batch_size": BATCH, "per_class": PER_CLASS, "tune_blrs": TUNE_BLRS,
           "scratch_blr": best_scratch_blr(), "summary": summary, "sweep": sweep, "runs": finals}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "label_efficiency.json").write_text(json.dumps(out, indent=1))
    series, errors = {}, {}
    for arm, name in PLOT_NAMES.items():
        rows = [summary[f"{arm} {size}"] for size in PER_CLASS if f"{arm} {size}" in summary]
        errors[name] = [r["std"] or 0.0 for r in rows]
        series[name] = [(math.log10(float(r["size"].rstrip("%"))), r["mean"]) for r in rows]
    line_plot(series, RESULTS / "label_efficiency.png", "Fashion-MNIST test top-1 by labelled fraction",
              "log10(% of training labels): 0 = 1%, 1 = 10%, 2 = 100%", "top-1 % (mean ± std)", errors=errors)
    for key, r in summary.items():
        print(f"| {key} | {r['mean']:.2f} ± {r['std'] or 0.0:.2f} | {r['n']} |")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("stage", choices=["prepare", "restore", "run", "collect"])
    p.add_argument("--worker", default="0", help="this worker's name in the log")
    p.add_argument("--extra-seed", action="store_true", help="also seed 2 at 10%%")
    p.add_argument("--long-10pct", type=int, default=None, help="also 10%% seed 0 with this step budget")
    p.add_argument("--full", action="store_true", help="also the 100%% arms (seed 0), after everything else")
    p.add_argument("--model-dir", type=Path, default=Path("service/default_model"))
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.stage == "prepare":
        pretrained_checkpoint(args.model_dir, OUT / "pretrained-mae.pth")
    elif args.stage == "restore":
        restore()
    elif args.stage == "run":
        work(plan(args.extra_seed, args.long_10pct, args.full), OUT, f"worker {args.worker}")
    else:
        collect()


if __name__ == "__main__":
    main()
