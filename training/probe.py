"""`mae-probe`: the MAE linear-probe protocol on a frozen encoder.

Features of the whole (unmasked) image are extracted once (and cached on disk with
`--feature-cache`); the head is BatchNorm1d(affine=False) + Linear. `--optimizer lars` trains it as
the official `main_linprobe.py` (LARS, warmup then cosine); `--optimizer lbfgs` fits the same head
to convergence as a full-batch L2-regularised logistic regression on the standardised features.
`--pooling best` picks cls / mean / cls+mean (and, for L-BFGS, the L2 strength) on a validation
split held out of the training set, then retrains on the full training set and reports top-1 on
the test split.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm import tqdm

from model import Checkpoint, ClassifierRecord, probe_head
from training.cli import run_cli
from training.common import read_pretrained, run_args
from training.data import SeededDataset, build_dataset
from training.optim import lr_at, set_lr

POOLINGS = ("cls", "mean", "cls+mean")


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise trust ratio; no scaling or weight decay for tensors of ndim <= 1."""

    def __init__(self, params, *, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                dp = p.grad
                if p.ndim > 1:
                    dp = dp.add(p, alpha=g["weight_decay"])
                    p_norm, u_norm = torch.norm(p), torch.norm(dp)
                    if p_norm > 0 and u_norm > 0:
                        dp = dp.mul(g["trust_coefficient"] * p_norm / u_norm)
                mu = self.state[p].setdefault("mu", torch.zeros_like(p))
                mu.mul_(g["momentum"]).add_(dp)
                p.add_(mu, alpha=-g["lr"])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("mae-probe", description="Linear probe of a pretrained MAE encoder.")
    p.add_argument("--checkpoint", required=True, help="a mae-train (or mae-import) checkpoint")
    p.add_argument("--output", type=Path, default=None, help="probe checkpoint (default: beside --checkpoint)")
    p.add_argument("--pooling", default="cls", choices=[*POOLINGS, "best"])
    p.add_argument("--dataset", default=None, help="default: the checkpoint's training data set")
    p.add_argument("--data-path", default=None)
    p.add_argument("--limit", type=int, default=None, help="use only the first N training images")
    p.add_argument("--val-size", type=int, default=5000, help="held-out training images for --pooling best")
    p.add_argument("--optimizer", default="lars", choices=["lars", "lbfgs"])
    p.add_argument("--l2", type=float, nargs="+", default=[1e-4],
                   help="L-BFGS: L2 strength(s); with several, --pooling best picks one on the validation split")
    p.add_argument("--feature-cache", type=Path, default=None, help="file to store / reuse extracted features")
    p.add_argument("--epochs", type=int, default=90)
    p.add_argument("--warmup-epochs", type=float, default=10)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--blr", type=float, default=0.1, help="lr = blr * batch / 256")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    return p


@torch.no_grad()
def extract_latents(encoder: nn.Module, dataset, batch_size: int = 500, quiet: bool = False) -> Tensor:
    """`cls+mean` features [N, 2D] of the unmasked images; `pooled` slices the other two out of them."""
    encoder.eval()
    out = []
    for start in tqdm(range(0, len(dataset), batch_size), desc="features", disable=quiet, leave=False):
        imgs = torch.stack([dataset[i][0] for i in range(start, min(start + batch_size, len(dataset)))])
        out.append(encoder.forward_features(imgs, "cls+mean"))
    return torch.cat(out)


def pooled(features: Tensor, pooling: str) -> Tensor:
    """cls = the first half of the `cls+mean` features, mean = the second half."""
    dim = features.shape[1] // 2
    return {"cls": features[:, :dim], "mean": features[:, dim:], "cls+mean": features}[pooling]


def train_head(x: Tensor, y: Tensor, num_classes: int, args: argparse.Namespace, l2: float = 0.0) -> nn.Sequential:
    if args.optimizer == "lbfgs":
        return train_head_lbfgs(x, y, num_classes, l2, args.seed)
    g = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    head = probe_head(x.shape[1], num_classes)
    lr = args.blr * args.batch_size / 256
    opt = LARS(head.parameters(), lr=lr, weight_decay=args.weight_decay)
    steps = max(len(x) // args.batch_size, 1)
    head.train()
    for epoch in range(args.epochs):
        order = torch.randperm(len(x), generator=g)
        for i in range(steps):
            set_lr(opt, lr_at(epoch + i / steps, lr, 0.0, args.warmup_epochs, args.epochs))
            idx = order[i * args.batch_size:(i + 1) * args.batch_size]
            loss = nn.functional.cross_entropy(head(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return head.eval()


def train_head_lbfgs(x: Tensor, y: Tensor, num_classes: int, l2: float, seed: int) -> nn.Sequential:
    """BatchNorm statistics of the whole training set, then the Linear layer by full-batch L-BFGS."""
    torch.manual_seed(seed)
    head = probe_head(x.shape[1], num_classes)
    bn, linear = head[0], head[1]
    bn.momentum = None  # cumulative average: one full-batch pass sets the exact mean and (unbiased) variance
    with torch.no_grad():
        bn.train()(x)
    z = bn.eval()(x)
    opt = torch.optim.LBFGS(linear.parameters(), lr=1.0, max_iter=1000, history_size=20,
                            tolerance_grad=1e-6, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(linear(z), y) + l2 * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    bn.momentum = 0.1
    return head.eval()


@torch.no_grad()
def top1(head: nn.Module, x: Tensor, y: Tensor) -> float:
    return 100.0 * (head(x).argmax(-1) == y).float().mean().item()


def main(args: argparse.Namespace) -> None:
    t0 = time.perf_counter()
    ckpt, dataset_name = read_pretrained(args.checkpoint, args.dataset)
    config = ckpt.config
    train = build_dataset(dataset_name, "train", config.img_size, config.in_chans, train=False,
                          root=args.data_path, limit=args.limit)
    test = build_dataset(dataset_name, "test", config.img_size, config.in_chans, train=False, root=args.data_path)
    x_train, y_train, x_test, y_test = features(ckpt.autoencoder(str(args.checkpoint)), train, test, args)
    num_classes = len(train.labels)
    results: dict[str, float] = {}
    pooling, l2 = args.pooling, args.l2[0]
    if pooling == "best" or len(args.l2) > 1:
        pooling, l2, results = select_on_validation(x_train, y_train, num_classes, args)
    head = train_head(pooled(x_train, pooling), y_train, num_classes, args, l2)
    acc = top1(head, pooled(x_test, pooling), y_test)
    train_acc = top1(head, pooled(x_train, pooling), y_train)

    output = args.output or Path(args.checkpoint).with_name("checkpoint-probe.pth")
    metrics = {"probe_top1": acc, "probe_train_top1": train_acc, "pooling": pooling, "optimizer": args.optimizer,
               **({"l2": l2} if args.optimizer == "lbfgs" else {}), **results}
    Checkpoint(
        model=ckpt.model, config=config, kind="probe", epoch=ckpt.epoch, args=run_args(args), data=ckpt.data,
        metrics={**ckpt.metrics, **metrics},
        classifier=ClassifierRecord(head_type="probe", pooling=pooling, num_classes=num_classes,
                                    labels=list(train.labels), metrics=metrics, state_dict=head.state_dict()),
    ).save(output)
    print(f"mae-probe: {pooling} features, test top-1 {acc:.2f}% (train {train_acc:.2f}%), "
          f"{time.perf_counter() - t0:.0f} s; wrote {output}")


def features(encoder: nn.Module, train: SeededDataset, test: SeededDataset, args: argparse.Namespace
             ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(x_train, y_train, x_test, y_test): from `--feature-cache` when it exists, else extracted (and cached)."""
    if args.feature_cache and args.feature_cache.is_file():
        return tuple(torch.load(args.feature_cache, weights_only=True))
    x_train, x_test = extract_latents(encoder, train, quiet=args.quiet), extract_latents(encoder, test, quiet=args.quiet)
    y_train, y_test = _targets(train), _targets(test)
    if args.feature_cache:
        args.feature_cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save((x_train, y_train, x_test, y_test), args.feature_cache)
    return x_train, y_train, x_test, y_test


def select_on_validation(x: Tensor, y: Tensor, num_classes: int, args: argparse.Namespace
                         ) -> tuple[str, float, dict[str, float]]:
    """(pooling, L2 strength, validation top-1 per candidate) on `--val-size` images held out of training."""
    n_fit = len(x) - args.val_size
    if n_fit <= 0:
        raise ValueError(f"--val-size {args.val_size} leaves no training images")
    results: dict[str, float] = {}
    candidates = [(p, c) for p in (POOLINGS if args.pooling == "best" else (args.pooling,)) for c in args.l2]
    for p, c in candidates:
        head = train_head(pooled(x[:n_fit], p), y[:n_fit], num_classes, args, c)
        results[f"val_top1_{p}_l2_{c:g}"] = top1(head, pooled(x[n_fit:], p), y[n_fit:])
        if not args.quiet:
            print(f"  pooling {p:9s} l2 {c:g}: val top-1 {results[f'val_top1_{p}_l2_{c:g}']:.2f}%", flush=True)
    pooling, l2 = max(candidates, key=lambda pc: results[f"val_top1_{pc[0]}_l2_{pc[1]:g}"])
    return pooling, l2, results


def _targets(dataset) -> Tensor:
    return torch.tensor([dataset.raw(i)[1] for i in range(len(dataset))])


def cli(argv: Sequence[str] | None = None) -> None:
    run_cli(main, build_parser(), argv)


if __name__ == "__main__":
    cli()
