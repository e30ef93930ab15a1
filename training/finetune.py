"""`mae-finetune`: end-to-end fine-tuning of a pretrained MAE encoder as a classifier.

The official recipe (`main_finetune.py`), scaled down: global average pooling + `fc_norm`,
layer-wise lr decay, drop path, label smoothing, AdamW, warmup then cosine; the same loop,
checkpointing and torchrun support as pretraining.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import torch
from torch import nn

from model import Checkpoint, ClassifierRecord, MAEConfig, ViTClassifier
from training.cli import run_cli
from training.common import (
    MetricsLog,
    add_loop_args,
    build_loader,
    evaluate_top1,
    read_pretrained,
    run_distributed,
    save_epoch,
    scale_lr,
    start_run,
    train_epochs,
)
from training.data import SeededDataset, build_dataset, keep_class_balanced
from training.dist import DistInfo
from training.optim import param_groups


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("mae-finetune", description="Fine-tune a pretrained MAE encoder as a classifier.")
    p.add_argument("--checkpoint", required=True, help="a mae-train / mae-probe / mae-import checkpoint")
    p.add_argument("--dataset", default=None, help="default: the checkpoint's training data set")
    p.add_argument("--data-path", default=None)
    p.add_argument("--limit", type=int, default=None, help="use only the first N training images")
    add_loop_args(p, "runs/finetune", epochs=10, warmup_epochs=1, blr=1e-3, min_lr=1e-6)
    p.add_argument("--layer-decay", type=float, default=0.75)
    p.add_argument("--drop-path", type=float, default=0.1)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--crop-scale-min", type=float, default=0.5, help="RandomResizedCrop area lower bound")
    p.add_argument("--init", default="pretrained", choices=["pretrained", "scratch"],
                   help="scratch: random weights, only the architecture and data set come from --checkpoint")
    p.add_argument("--subset-per-class", type=int, default=None, help="train on N images per class (class-balanced)")
    p.add_argument("--subset-seed", type=int, default=0, help="the draw of --subset-per-class")
    p.add_argument("--val-size", type=int, default=0,
                   help="hold out the last N training images (before any subset is drawn) and report top-1 on "
                        "them instead of the test split: for choosing settings")
    p.add_argument("--eval-every", type=int, default=1, help="epochs between evaluations (and after the last)")
    return p


def main(args: argparse.Namespace) -> None:
    run_distributed(_finetune, args)


def _finetune(args: argparse.Namespace, info: DistInfo) -> None:
    torch.manual_seed(args.seed)
    src, dataset_name = read_pretrained(args.checkpoint, args.dataset)
    config = src.config
    train, evaluation = _datasets(args, config, dataset_name)
    split = "val" if args.val_size else "test"
    loader = build_loader(train, args.batch_size, info, args.seed, train=True, num_workers=args.num_workers)
    test_loader = build_loader(evaluation, 500, DistInfo(device=info.device), args.seed, train=False)  # rank 0: all
    eff_batch = scale_lr(args, info)
    model = (_from_scratch(src.config, len(train.labels), args) if args.init == "scratch"
             else _from_pretrained(src, len(train.labels), args)).to(info.device)
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay, args.layer_decay), lr=args.lr)
    run = start_run(model, optimizer, args, info)
    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    log = MetricsLog(args.output_dir / "metrics.jsonl", enabled=info.is_main)
    if info.is_main:
        print(f"mae-finetune: {len(train)} images ({args.init} init), effective batch {eff_batch}, "
              f"lr {args.lr:.2e}, layer decay {args.layer_decay}, drop path {args.drop_path}", flush=True)

    def step_fn(batch, net, step: int) -> torch.Tensor:
        imgs, labels = batch
        return criterion(net(imgs.to(info.device)), labels.to(info.device))

    def on_epoch_end(epoch: int, loss: float) -> None:
        metrics = {"train_loss": loss, "eval_split": split, "epochs": epoch + 1,
                   "steps": (epoch + 1) * len(loader), "train_images": len(train), "init": args.init}
        if (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs:
            acc = evaluate_top1(model, test_loader, info.device) if info.is_main else 0.0
            log.write(epoch=epoch, **{f"{split}_top1": acc})
            if info.is_main and not args.quiet:
                print(f"  {split} top-1 {acc:.2f}%", flush=True)
            metrics["finetune_top1"] = acc
        head = ClassifierRecord(head_type="finetune", pooling="mean", num_classes=len(train.labels),
                                labels=list(train.labels), metrics=metrics)
        save_epoch(run.checkpoint(epoch=epoch, args=args, config=config, kind="finetune", data=src.data,
                                  metrics=metrics, classifier=head), args, info)

    t0 = time.perf_counter()
    train_epochs(model=run.net, optimizer=optimizer, loader=loader, args=args, info=info, start_epoch=run.start_epoch,
                 step_fn=step_fn, log=log, on_epoch_end=on_epoch_end, scaler=run.scaler)
    if info.is_main:
        final = Checkpoint.load(args.output_dir / "checkpoint-last.pth").metrics["finetune_top1"]
        print(f"mae-finetune: {split} top-1 {final:.2f}% in {time.perf_counter() - t0:.0f} s; "
              f"wrote {args.output_dir / 'checkpoint-last.pth'}")


def _datasets(args: argparse.Namespace, config: MAEConfig, name: str) -> tuple[SeededDataset, SeededDataset]:
    """(training images, evaluation images): `--val-size` held out of the training split, else the test split;
    `--subset-per-class` drawn from what is left for training."""
    train = build_dataset(name, "train", config.img_size, config.in_chans, train=True, root=args.data_path,
                          seed=args.seed, limit=args.limit, scale=(args.crop_scale_min, 1.0))
    if args.val_size:
        if args.val_size >= len(train):
            raise ValueError(f"--val-size {args.val_size} leaves no training images")
        evaluation = build_dataset(name, "train", config.img_size, config.in_chans, train=False, root=args.data_path,
                                   limit=args.limit)
        evaluation.keep(torch.arange(len(train) - args.val_size, len(train)))
        train.keep(torch.arange(len(train) - args.val_size))
    else:
        evaluation = build_dataset(name, "test", config.img_size, config.in_chans, train=False, root=args.data_path)
    keep_class_balanced(train, args.subset_per_class, args.subset_seed)
    return train, evaluation


def _from_scratch(config: MAEConfig, num_classes: int, args: argparse.Namespace) -> ViTClassifier:
    """A fine-tuning classifier of the same architecture with fresh weights (seeded by --seed)."""
    model = ViTClassifier(config, num_classes=num_classes, head_type="finetune", drop_path_rate=args.drop_path)
    model.initialize_weights()
    return model


def _from_pretrained(src: Checkpoint, num_classes: int, args: argparse.Namespace) -> ViTClassifier:
    """A fine-tuning classifier with the pretrained encoder's weights (fc_norm and head fresh)."""
    model = ViTClassifier(src.config, num_classes=num_classes, head_type="finetune", drop_path_rate=args.drop_path)
    encoder_sd = {k: v for k, v in src.encoder_state_dict().items() if not k.startswith("norm.")}
    missing, unexpected = model.load_state_dict(encoder_sd, strict=False)
    if set(missing) != {"fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"} or unexpected:
        raise ValueError(f"{args.checkpoint}: incompatible encoder (missing {missing}, unexpected {unexpected})")
    return model


def cli(argv: Sequence[str] | None = None) -> None:
    run_cli(main, build_parser(), argv)


if __name__ == "__main__":
    cli()
