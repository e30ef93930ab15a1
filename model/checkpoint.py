"""Checkpoint files: the one `Checkpoint` type every writer and reader of a `.pth` file uses.

On disk a checkpoint is a dict in the official layout (`model`, `optimizer`, `epoch`, `scaler`,
`args`) plus:
- `config`: the `MAEConfig` as a dict;
- `kind`: `mae` (encoder + decoder), `encoder` (no decoder), `probe` (`model` is an MAE or encoder
  state dict and `classifier` holds the linear head) or `finetune` (`model` is a `ViTClassifier`);
- `data`: the training data set's name, normalization `mean` / `std` and `labels`;
- `metrics`: the run's figures;
- `classifier` (probe / finetune): `head_type`, `pooling`, `num_classes`, `labels`, `metrics`,
  and for probes the head's `state_dict`.

Files are read with `torch.load(..., weights_only=True)` and written atomically.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from model.configs import MAEConfig
from model.mae import EncoderOnlyMAE, MaskedAutoencoderViT, ViTClassifier

Kind = Literal["mae", "encoder", "probe", "finetune"]
KINDS = ("mae", "encoder", "probe", "finetune")
_DECODER_PREFIXES = ("decoder", "mask_token")


class CheckpointError(ValueError):
    """A file that is not a checkpoint this project can use, with the reason."""


@dataclass(frozen=True, kw_only=True)
class ClassifierRecord:
    """The `classifier` entry: which head, on which pooling, with which labels and figures."""

    head_type: Literal["probe", "finetune"]
    pooling: str
    num_classes: int
    labels: list[str] | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    state_dict: dict[str, Tensor] | None = None  # the probe head (BatchNorm1d + Linear); finetune: in `model`

    def to_dict(self) -> dict[str, Any]:
        out = {"head_type": self.head_type, "pooling": self.pooling, "num_classes": self.num_classes,
               "labels": self.labels, "metrics": self.metrics}
        return out if self.state_dict is None else {**out, "state_dict": self.state_dict}


@dataclass(frozen=True, kw_only=True)
class Checkpoint:
    """What a checkpoint file holds (the official layout plus this project's entries), in memory."""

    model: dict[str, Tensor]
    config: MAEConfig
    kind: Kind = "mae"
    epoch: int | None = None
    optimizer: dict[str, Any] | None = None
    scaler: dict[str, Any] | None = None
    args: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    classifier: ClassifierRecord | None = None

    def to_dict(self) -> dict[str, Any]:
        """The on-disk layout."""
        return {"model": self.model, "optimizer": self.optimizer, "epoch": self.epoch, "scaler": self.scaler,
                "args": self.args, "config": self.config.to_dict(), "kind": self.kind, "data": self.data,
                "metrics": self.metrics, "classifier": None if self.classifier is None else self.classifier.to_dict()}

    @classmethod
    def from_dict(cls, raw: Any, what: str = "checkpoint") -> Checkpoint:
        if not isinstance(raw, dict) or "model" not in raw or "config" not in raw:
            raise CheckpointError(f"{what}: not a checkpoint of this project (needs 'model' and 'config'); "
                                  "convert public checkpoints with mae-import first")
        kind = raw.get("kind") or "mae"
        if kind not in KINDS:
            raise CheckpointError(f"{what}: unknown checkpoint kind {kind!r}")
        try:
            config = MAEConfig.from_dict(raw["config"])
            info = raw.get("classifier")
            classifier = None if info is None else ClassifierRecord(**info)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{what}: {e}") from e
        return cls(model=raw["model"], config=config, kind=kind, epoch=raw.get("epoch"),
                   optimizer=raw.get("optimizer"), scaler=raw.get("scaler"), args=raw.get("args") or {},
                   data=raw.get("data") or {}, metrics=raw.get("metrics") or {}, classifier=classifier)

    @classmethod
    def load(cls, path: str | Path) -> Checkpoint:
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"{path}: no such checkpoint file")
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # a corrupt or foreign file: say which and why
            raise CheckpointError(f"{path}: not a readable checkpoint ({e.__class__.__name__}: {e})") from e
        return cls.from_dict(raw, str(path))

    def save(self, path: str | Path) -> None:
        """Write atomically (temp file + rename), so an interrupted run never leaves half a file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        torch.save(self.to_dict(), tmp)
        tmp.replace(path)

    def has_decoder(self) -> bool:
        return "decoder_pred.weight" in self.model

    def encoder_state_dict(self) -> dict[str, Tensor]:
        """The encoder's tensors (decoder and mask token left out)."""
        return {k: v for k, v in self.model.items() if not k.startswith(_DECODER_PREFIXES)}

    def autoencoder(self, what: str = "checkpoint") -> MaskedAutoencoderViT | EncoderOnlyMAE:
        """The MAE (or the encoder alone, when the file has no decoder) of a mae/encoder/probe checkpoint."""
        if self.kind == "finetune":
            raise CheckpointError(f"{what}: a fine-tuned classifier has no autoencoder; use its classifier")
        model = MaskedAutoencoderViT(self.config) if self.has_decoder() else EncoderOnlyMAE(self.config)
        return _load_strict(model, self.model, what)

    def classifier_model(self, what: str = "checkpoint") -> ViTClassifier | None:
        """The classifier of a probe or finetune checkpoint (None for the other kinds), `.labels` set."""
        info = self.classifier
        if info is None:
            return None
        model = ViTClassifier(self.config, num_classes=info.num_classes, head_type=info.head_type,
                              pooling=info.pooling)
        if info.head_type == "probe":
            sd = {**self.encoder_state_dict(), **{f"head.{k}": v for k, v in (info.state_dict or {}).items()}}
        else:
            sd = self.model
        _load_strict(model, sd, what)
        model.labels = list(info.labels or [str(i) for i in range(info.num_classes)])
        return model


def _load_strict(model: nn.Module, state_dict: dict[str, Tensor], what: str) -> nn.Module:
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{what}: missing keys {missing}, unexpected keys {unexpected}")
    return model.eval()


def load_checkpoint(path: str | Path) -> nn.Module:
    """The model of any checkpoint this project writes, in eval mode.

    mae / probe -> `MaskedAutoencoderViT` (or `EncoderOnlyMAE` without a decoder);
    encoder -> `EncoderOnlyMAE`; finetune -> `ViTClassifier`.
    """
    ckpt = Checkpoint.load(path)
    if ckpt.kind == "finetune":
        return ckpt.classifier_model(str(path))
    return ckpt.autoencoder(str(path))


def load_classifier(path: str | Path) -> ViTClassifier | None:
    """The classifier (probe or fine-tuned) a checkpoint carries, or None."""
    return Checkpoint.load(path).classifier_model(str(path))
