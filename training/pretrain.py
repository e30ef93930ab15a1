"""`mae-train`: MAE pretraining, one process or many under torchrun, with the same code path."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import torch

from model import CONFIGS, Checkpoint, MaskedAutoencoderViT, get_config
from training.cli import run_cli
from training.common import (
    MetricsLog,
    add_loop_args,
    build_loader,
    run_distributed,
    save_epoch,
    scale_lr,
    start_run,
    step_generator,
    train_epochs,
)
from training.data import build_dataset
from training.dist import DistInfo
from training.figures import reconstruction_grid
from training.optim import param_groups


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("mae-train", description="Pretrain a Masked Autoencoder.")
    p.add_argument("--model", default="mae_vit_tiny_fmnist", choices=sorted(CONFIGS))
    p.add_argument("--norm-pix-loss", action=argparse.BooleanOptionalAction, default=None,
                   help="per-patch normalised pixel targets (default: the named config's)")
    p.add_argument("--mask-ratio", type=float, default=0.75)
    p.add_argument("--dataset", default="fashion-mnist", choices=["fashion-mnist", "imagefolder"])
    p.add_argument("--data-path", default=None, help="IDX directory (fashion-mnist) or folder with train/")
    p.add_argument("--limit", type=int, default=None, help="use only the first N training images")
    p.add_argument("--init-from", default=None,
                   help="start from this MAE checkpoint's weights (same architecture) with a fresh optimizer and "
                        "schedule: continued pretraining; a run that resumes takes its own checkpoint instead")
    add_loop_args(p, "runs/pretrain", epochs=40, warmup_epochs=4, blr=1.5e-4, min_lr=0.0)
    p.add_argument("--preview", action=argparse.BooleanOptionalAction, default=True,
                   help="write a reconstruction PNG per epoch")
    return p


def main(args: argparse.Namespace) -> None:
    run_distributed(_pretrain, args)


def _pretrain(args: argparse.Namespace, info: DistInfo) -> None:
    if not 0.0 <= args.mask_ratio < 1.0:
        raise ValueError(f"--mask-ratio must be in [0, 1), got {args.mask_ratio}")
    torch.manual_seed(args.seed)
    overrides = {} if args.norm_pix_loss is None else {"norm_pix_loss": args.norm_pix_loss}
    config = get_config(args.model, **overrides)
    dataset = build_dataset(args.dataset, "train", config.img_size, config.in_chans, train=True,
                            root=args.data_path, seed=args.seed, limit=args.limit)
    loader = build_loader(dataset, args.batch_size, info, args.seed, train=True, num_workers=args.num_workers)
    eff_batch = scale_lr(args, info)
    model = MaskedAutoencoderViT(config).to(info.device)
    # a continuation counts the epochs its starting weights had (also when it resumes from its own checkpoint)
    prior_epochs = _load_initial_weights(model, args.init_from) if args.init_from else 0
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.95))
    run = start_run(model, optimizer, args, info)
    if info.is_main:
        args.output_dir.mkdir(parents=True, exist_ok=True)
        n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"mae-train: {args.model} ({n_params / 1e6:.2f}M params), {len(dataset)} images, "
              f"effective batch {eff_batch}, lr {args.lr:.2e}, {info.world_size} process(es) on {info.device}",
              flush=True)
    log = MetricsLog(args.output_dir / "metrics.jsonl", enabled=info.is_main)
    preview_imgs = _preview_images(args, config) if args.preview and info.is_main else None
    data = {"dataset": args.dataset, "mean": list(dataset.mean), "std": list(dataset.std),
            "labels": list(dataset.labels), "train_images": len(dataset)}

    def step_fn(batch, net, step: int) -> torch.Tensor:
        imgs = batch[0].to(info.device, non_blocking=True)
        noise = torch.rand(imgs.shape[0], config.num_patches, generator=step_generator(args.seed, info.rank, step))
        loss, _, _ = net(imgs, mask_ratio=args.mask_ratio, noise=noise.to(info.device))
        return loss

    def on_epoch_end(epoch: int, loss: float) -> None:
        ckpt = run.checkpoint(epoch=epoch, args=args, config=config, kind="mae", data=data,
                              metrics={"train_loss": loss, "epochs": prior_epochs + epoch + 1,
                                       "epochs_this_run": epoch + 1})
        save_epoch(ckpt, args, info, final_copy=True)
        if preview_imgs is not None:
            reconstruction_grid(model, preview_imgs, dataset.mean, dataset.std, [args.mask_ratio],
                                args.output_dir / f"preview-{epoch + 1:03d}.png")
            model.train()

    t0 = time.perf_counter()
    train_epochs(model=run.net, optimizer=optimizer, loader=loader, args=args, info=info, start_epoch=run.start_epoch,
                 step_fn=step_fn, log=log, on_epoch_end=on_epoch_end, scaler=run.scaler)
    if info.is_main:
        print(f"mae-train: done in {time.perf_counter() - t0:.0f} s; checkpoint {args.output_dir / 'checkpoint-last.pth'}")


def _load_initial_weights(model: MaskedAutoencoderViT, path: str) -> int:
    """Load the source checkpoint's weights into `model`; returns the epochs they were trained for."""
    source = Checkpoint.load(path)
    if source.kind != "mae" or source.config != model.config:
        raise ValueError(f"--init-from {path}: a {source.kind} checkpoint of {source.config}; "
                         f"the run trains an MAE of {model.config}")
    model.load_state_dict(source.model)
    return int(source.metrics.get("epochs", 0))


def _preview_images(args: argparse.Namespace, config) -> torch.Tensor:
    try:
        ds = build_dataset(args.dataset, "test", config.img_size, config.in_chans, train=False,
                           root=args.data_path, limit=8)
    except FileNotFoundError:
        ds = build_dataset(args.dataset, "train", config.img_size, config.in_chans, train=False,
                           root=args.data_path, limit=8)
    return torch.stack([ds[i][0] for i in range(len(ds))])


def cli(argv: Sequence[str] | None = None) -> None:
    run_cli(main, build_parser(), argv)


if __name__ == "__main__":
    cli()
