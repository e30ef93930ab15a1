"""Checkpoint files: what this project writes (official layout plus `config`, `kind`, `classifier`) and loading them.

A checkpoint is a dict with `model` (state dict), `optimizer`, `epoch`, `scaler`, `args` as the
official ones, plus:
- `config`: the `MAEConfig` as a dict;
- `kind`: `mae` (encoder + decoder), `encoder` (no decoder), `probe` (`model` is an MAE or encoder
  state dict and `classifier` holds the linear head) or `finetune` (`model` is a `ViTClassifier`);
- `classifier` (probe / finetune): `head_type`, `pooling`, `num_classes`, `labels`, `metrics`,
  and for probes the head's `state_dict`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from model.configs import MAEConfig
from model.mae import EncoderOnlyMAE, MaskedAutoencoderViT, ViTClassifier

KINDS = ("mae", "encoder", "probe", "finetune")


class CheckpointError(ValueError):
    """A file that is not a checkpoint this project can use, with the reason."""


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write atomically (temp file + rename), so an interrupted run never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a corrupt or foreign file: say which and why
        raise CheckpointError(f"{path}: not a readable checkpoint ({e.__class__.__name__}: {e})") from e
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise CheckpointError(
            f"{path}: not a checkpoint of this project (needs 'model' and 'config'); "
            "convert public checkpoints with mae-import first"
        )
    if ckpt.get("kind", "mae") not in KINDS:
        raise CheckpointError(f"{path}: unknown checkpoint kind {ckpt.get('kind')!r}")
    return ckpt


def checkpoint_config(ckpt: dict[str, Any]) -> MAEConfig:
    return MAEConfig.from_dict(ckpt["config"])


def has_decoder(state_dict: dict[str, torch.Tensor]) -> bool:
    return "decoder_pred.weight" in state_dict


def _load_strict(model: nn.Module, state_dict: dict[str, torch.Tensor], what: str) -> nn.Module:
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{what}: missing keys {missing}, unexpected keys {unexpected}")
    return model.eval()


def build_autoencoder(ckpt: dict[str, Any], what: str = "checkpoint") -> MaskedAutoencoderViT | EncoderOnlyMAE:
    """The MAE (or the encoder alone, when the file has no decoder) of a mae/encoder/probe checkpoint."""
    if ckpt.get("kind", "mae") == "finetune":
        raise CheckpointError(f"{what}: a fine-tuned classifier has no autoencoder; use load_classifier")
    config = checkpoint_config(ckpt)
    sd = ckpt["model"]
    model = MaskedAutoencoderViT(config) if has_decoder(sd) else EncoderOnlyMAE(config)
    return _load_strict(model, sd, what)


def build_classifier(ckpt: dict[str, Any], what: str = "checkpoint") -> ViTClassifier | None:
    """The classifier of a probe or finetune checkpoint (None for the other kinds), `.labels` set."""
    info = ckpt.get("classifier")
    if info is None:
        return None
    config = checkpoint_config(ckpt)
    model = ViTClassifier(config, info["num_classes"], head_type=info["head_type"], pooling=info["pooling"])
    if info["head_type"] == "probe":
        encoder_keys = {k: v for k, v in ckpt["model"].items() if not k.startswith(("decoder", "mask_token"))}
        sd = {**encoder_keys, **{f"head.{k}": v for k, v in info["state_dict"].items()}}
    else:
        sd = ckpt["model"]
    _load_strict(model, sd, what)
    model.labels = list(info.get("labels") or [str(i) for i in range(info["num_classes"])])
    return model


def load_checkpoint(path: str | Path) -> nn.Module:
    """The model of any checkpoint this project writes, in eval mode.

    mae / probe -> `MaskedAutoencoderViT` (or `EncoderOnlyMAE` without a decoder);
    encoder -> `EncoderOnlyMAE`; finetune -> `ViTClassifier`.
    """
    ckpt = read_checkpoint(path)
    if ckpt.get("kind") == "finetune":
        return build_classifier(ckpt, str(path))
    return build_autoencoder(ckpt, str(path))


def load_classifier(path: str | Path) -> ViTClassifier | None:
    """The classifier (probe or fine-tuned) a checkpoint carries, or None."""
    return build_classifier(read_checkpoint(path), str(path))
