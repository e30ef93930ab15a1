"""Pieces every training CLI shares: the source checkpoint, setup / resume / save of a run, loaders, autocast,
seeded mask noise, the JSONL metrics log and the epoch loop."""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, SequentialSampler
from tqdm import tqdm

from model import Checkpoint, ClassifierRecord, MAEConfig
from model.checkpoint import Kind
from training.data import SeededDataset
from training.dist import DistInfo, cleanup, init_distributed, mean_across_ranks
from training.optim import lr_at, set_lr


def add_loop_args(p: argparse.ArgumentParser, output_dir: str, epochs: int, warmup_epochs: float, blr: float,
                  min_lr: float) -> None:
    """The flags of the shared training loop (`train_epochs`): schedule, batch, precision, checkpoints, logs."""
    p.add_argument("--epochs", type=int, default=epochs)
    p.add_argument("--warmup-epochs", type=float, default=warmup_epochs)
    p.add_argument("--batch-size", type=int, default=256, help="per process")
    p.add_argument("--accum-iter", type=int, default=1)
    p.add_argument("--blr", type=float, default=blr, help="lr = blr * effective batch / 256")
    p.add_argument("--lr", type=float, default=None, help="absolute lr (overrides --blr)")
    p.add_argument("--min-lr", type=float, default=min_lr)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", type=Path, default=Path(output_dir))
    p.add_argument("--save-every", type=int, default=1, help="checkpoint every N epochs")
    p.add_argument("--resume", default=None, help="checkpoint path, or 'auto' for output-dir/checkpoint-last.pth")
    p.add_argument("--log-every", type=int, default=50, help="steps between JSONL step records")
    p.add_argument("--quiet", action="store_true")


def run_distributed(fn: Callable[[argparse.Namespace, DistInfo], None], args: argparse.Namespace) -> None:
    """Run `fn(args, info)` in the process group torchrun set up (or alone), and always leave it."""
    info = init_distributed(args.device)
    try:
        fn(args, info)
    finally:
        cleanup(info)


def build_loader(dataset: SeededDataset, batch_size: int, info: DistInfo, seed: int, train: bool,
                 num_workers: int = 0) -> DataLoader:
    """Shuffled (seeded per epoch via set_epoch) and sharded across ranks for training; in order for eval."""
    if info.enabled:
        sampler = DistributedSampler(dataset, info.world_size, info.rank, shuffle=train, seed=seed, drop_last=train)
    elif train:
        sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(seed))
    else:
        sampler = SequentialSampler(dataset)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=train, num_workers=num_workers)


def set_epoch(loader: DataLoader, epoch: int, seed: int) -> None:
    """Make the epoch's order and augmentations a function of (seed, epoch) alone (exact resume)."""
    loader.dataset.set_epoch(epoch)
    if isinstance(loader.sampler, DistributedSampler):
        loader.sampler.set_epoch(epoch)
    elif isinstance(loader.sampler, RandomSampler):
        loader.sampler.generator.manual_seed(seed * 100_003 + epoch)


def step_seed(seed: int, rank: int, step: int) -> int:
    """The seed of one training step's random draws (mask noise, drop path): resumed runs draw the same."""
    return (seed * 1_000_003 + rank) * 10_000_019 + step


def step_generator(seed: int, rank: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(step_seed(seed, rank, step))


def autocast(amp: str, device: torch.device):
    """`none`, `bf16` (CPU or CUDA) or `fp16` (CUDA only)."""
    if amp == "none":
        return contextlib.nullcontext()
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("--amp fp16 needs CUDA; use bf16 on CPU")
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


class MetricsLog:
    """Append-only JSONL log, written by rank 0 only."""

    def __init__(self, path: Path, *, enabled: bool):
        self.path, self.enabled = path, enabled
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, **record: Any) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")


def read_pretrained(path: str | Path, dataset: str | None) -> tuple[Checkpoint, str]:
    """The pretrained (mae / encoder / probe) checkpoint a probe or fine-tune starts from, and its data set:
    `dataset` when given, else the one the checkpoint was trained on."""
    ckpt = Checkpoint.load(path)
    if ckpt.kind == "finetune":
        raise ValueError(f"{path}: already a fine-tuned classifier; start from a pretrained (mae/encoder) checkpoint")
    name = dataset or ckpt.data.get("dataset")
    if not name:
        raise ValueError("the checkpoint does not name its data set; pass --dataset")
    return ckpt, name


def run_args(args: argparse.Namespace) -> dict[str, Any]:
    """The CLI arguments as a checkpoint stores them: JSON values (numbers stay numbers, paths become strings)."""
    return json.loads(json.dumps(vars(args), default=str))


def scale_lr(args: argparse.Namespace, info: DistInfo) -> int:
    """Set `args.lr` from `--blr` (lr = blr * effective batch / 256) unless `--lr` gave it; the effective batch."""
    effective_batch = args.batch_size * args.accum_iter * info.world_size
    args.lr = args.lr if args.lr is not None else args.blr * effective_batch / 256
    return effective_batch


@dataclass(frozen=True, kw_only=True)
class TrainingRun:
    """A model ready for `train_epochs`: its optimizer, GradScaler (`--amp fp16`), wrapper and first epoch."""

    model: nn.Module
    net: nn.Module  # `model`, wrapped in DistributedDataParallel under torchrun
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    start_epoch: int

    def checkpoint(self, *, epoch: int, args: argparse.Namespace, config: MAEConfig, kind: Kind,
                   data: dict[str, Any], metrics: dict[str, Any],
                   classifier: ClassifierRecord | None = None) -> Checkpoint:
        """Everything needed to resume after `epoch`, and to use the model."""
        return Checkpoint(model=self.model.state_dict(), optimizer=self.optimizer.state_dict(), epoch=epoch,
                          scaler=None if self.scaler is None else self.scaler.state_dict(), args=run_args(args),
                          config=config, kind=kind, data=data, metrics=metrics, classifier=classifier)


def start_run(model: nn.Module, optimizer: torch.optim.Optimizer, args: argparse.Namespace,
              info: DistInfo) -> TrainingRun:
    """The GradScaler for fp16, the state of `--resume` (model, optimizer, scaler, epoch), the DDP wrapper."""
    scaler = torch.amp.GradScaler(info.device.type) if args.amp == "fp16" else None
    start_epoch = 0
    state = resume_state(args.resume, args.output_dir)
    if state is not None:
        model.load_state_dict(state.model)
        optimizer.load_state_dict(state.optimizer)
        if scaler is not None and state.scaler:
            scaler.load_state_dict(state.scaler)
        start_epoch = state.epoch + 1
        if info.is_main:
            print(f"resumed from epoch {start_epoch} of {args.epochs}", flush=True)
    net = DistributedDataParallel(model) if info.enabled else model
    return TrainingRun(model=model, net=net, optimizer=optimizer, scaler=scaler, start_epoch=start_epoch)


def resume_state(resume: str | None, output_dir: Path) -> Checkpoint | None:
    """`--resume auto` takes output_dir/checkpoint-last.pth when present; a path must exist."""
    if not resume:
        return None
    if resume == "auto":
        last = output_dir / "checkpoint-last.pth"
        return Checkpoint.load(last) if last.is_file() else None
    return Checkpoint.load(resume)


def save_epoch(ckpt: Checkpoint, args: argparse.Namespace, info: DistInfo, *, final_copy: bool = False) -> None:
    """`checkpoint-last.pth` every `--save-every` epochs and after the last one (rank 0); with `final_copy`,
    `checkpoint-final.pth` too after the last."""
    last = ckpt.epoch + 1 == args.epochs
    if not info.is_main:
        return
    if last or (ckpt.epoch + 1) % args.save_every == 0:
        ckpt.save(args.output_dir / "checkpoint-last.pth")
    if last and final_copy:
        ckpt.save(args.output_dir / "checkpoint-final.pth")


def train_epochs(*, model, optimizer, loader, args, info: DistInfo, start_epoch: int,
                 step_fn: Callable[[Any, Any, int], torch.Tensor], log: MetricsLog,
                 on_epoch_end: Callable[[int, float], None], scaler=None) -> None:
    """The loop: per-iteration lr, gradient accumulation, optional autocast, per-step and per-epoch logs.

    `step_fn(batch, model, global_step)` returns the loss of one micro-batch.
    """
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise ValueError("the data set is smaller than one batch")
    for epoch in range(start_epoch, args.epochs):
        set_epoch(loader, epoch, args.seed)
        model.train()
        total, count, t0 = 0.0, 0, time.perf_counter()
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", disable=not info.is_main or args.quiet,
                   leave=False, dynamic_ncols=True)
        optimizer.zero_grad(set_to_none=True)
        for i, batch in enumerate(bar):
            step = epoch * steps_per_epoch + i
            if i % args.accum_iter == 0:
                set_lr(optimizer, lr_at(step / steps_per_epoch, args.lr, args.min_lr, args.warmup_epochs, args.epochs))
            torch.manual_seed(step_seed(args.seed, info.rank, step))  # drop path: exact resume
            with autocast(args.amp, info.device):
                loss = step_fn(batch, model, step)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss is {loss.item()} at step {step}; stopping")
            scaled = loss / args.accum_iter
            (scaler.scale(scaled) if scaler else scaled).backward()
            if (i + 1) % args.accum_iter == 0:
                if scaler:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            total, count = total + loss.item(), count + 1
            bar.set_postfix(loss=f"{loss.item():.4f}")
            if step % args.log_every == 0:
                log.write(step=step, epoch=epoch, loss=loss.item(), lr=optimizer.param_groups[0]["lr"])
        epoch_loss = mean_across_ranks(total / count, info)
        seconds = time.perf_counter() - t0
        log.write(epoch=epoch, train_loss=epoch_loss, epoch_seconds=round(seconds, 2),
                  images_per_second=round(count * loader.batch_size * info.world_size / seconds, 1))
        if info.is_main and not args.quiet:
            print(f"epoch {epoch + 1}/{args.epochs}: loss {epoch_loss:.4f} ({seconds:.0f} s)", flush=True)
        on_epoch_end(epoch, epoch_loss)


@torch.no_grad()
def evaluate_top1(model: torch.nn.Module, loader: DataLoader, device: torch.device) -> float:
    """Top-1 accuracy (%) of a classifier over a loader (all ranks see the whole split)."""
    model.eval()
    correct = total = 0
    for imgs, labels in loader:
        logits = model(imgs.to(device))
        correct += (logits.argmax(-1).cpu() == labels).sum().item()
        total += labels.numel()
    return 100.0 * correct / max(total, 1)
