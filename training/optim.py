"""Optimizer parameter groups and the per-iteration learning-rate schedule of the MAE recipes."""

from __future__ import annotations

import math

from torch import nn

NO_DECAY_NAMES = ("cls_token", "mask_token", "pos_embed", "decoder_pos_embed")


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float | None = None) -> list[dict]:
    """Weight decay except on biases, norms (any 1-D tensor), tokens and position embeddings.

    With `layer_decay`, each group also carries `lr_scale = layer_decay ** (num_layers - layer_id)`
    (BEiT-style, as the official fine-tuning): embeddings are layer 0, block i is layer i + 1, the head last.
    """
    num_layers = len(model.blocks) + 1 if layer_decay is not None else 0
    groups: dict[tuple[bool, int], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1 or name.endswith(".bias") or name in NO_DECAY_NAMES
        layer = _layer_id(name, num_layers) if layer_decay is not None else 0
        key = (no_decay, layer)
        if key not in groups:
            scale = layer_decay ** (num_layers - layer) if layer_decay is not None else 1.0
            groups[key] = {"params": [], "weight_decay": 0.0 if no_decay else weight_decay, "lr_scale": scale}
        groups[key]["params"].append(p)
    return list(groups.values())


def _layer_id(name: str, num_layers: int) -> int:
    if name.startswith(("cls_token", "pos_embed", "patch_embed")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return num_layers


def lr_at(epoch: float, lr: float, min_lr: float, warmup_epochs: float, epochs: int) -> float:
    """Linear warmup, then half-cycle cosine to min_lr; `epoch` is fractional (updated every iteration)."""
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    progress = (epoch - warmup_epochs) / max(epochs - warmup_epochs, 1e-8)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def set_lr(optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
