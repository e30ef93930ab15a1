"""What `model.json` says about an exported model, taken from its checkpoints: name, architecture,
preprocessing, labels, the `/embed` default, the classifier and the training facts.

The files, the verification table and the self-check entry come from the export itself
(`training/export.py`); the schema is `model_dir.schema`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from model import Checkpoint, ClassifierRecord, MAEConfig, ViTClassifier
from model.stats import default_stats
from model_dir.schema import (
    Architecture,
    ClassifierInfo,
    Embedding,
    FileSpec,
    ModelJson,
    Preprocessing,
    SelfCheckSpec,
    Training,
    Verification,
    WeightsSpec,
)


def describe(*, ckpt: Checkpoint, cls_ckpt: Checkpoint | None, classifier: ViTClassifier | None, name: str | None,
             checkpoint: str | Path, files: dict[str, dict[str, FileSpec]], verification: Verification,
             self_check: SelfCheckSpec, weights: WeightsSpec | None) -> ModelJson:
    """The content of model.json for the graphs exported from `ckpt` (and `cls_ckpt`'s classifier)."""
    config = ckpt.config
    info = (cls_ckpt or ckpt).classifier if classifier is not None else None
    return ModelJson(
        name=name or ckpt.args.get("model") or Path(checkpoint).stem,
        version=model_version(files),
        architecture=Architecture(**{k: v for k, v in config.to_dict().items() if k != "norm_pix_loss"},
                                  num_patches=config.num_patches, grid_size=config.grid_size),
        preprocessing=preprocessing(ckpt.data, config),
        norm_pix_loss=config.norm_pix_loss,
        labels=class_labels(classifier, info, ckpt.data) if classifier is not None else None,
        embedding=embedding_info(ckpt),
        classifier=classifier_info(classifier, info) if classifier is not None else None,
        training=training_facts(ckpt, cls_ckpt),
        files=files,
        verification=verification,
        self_check=self_check,
        weights=weights,
    )


def model_version(files: dict[str, dict[str, FileSpec]]) -> str:
    """model.json's `version`: a digest of the fp32 graphs (the variants derive from them), so a re-export that
    changes any graph, not only the encoder, is a new version."""
    digest = hashlib.sha256("".join(f"{g}:{by_precision['fp32'].sha256}\n" for g, by_precision in files.items()).encode())
    return digest.hexdigest()[:12]


def embedding_info(ckpt: Checkpoint) -> Embedding:
    """`/embed`'s default: the pooling the checkpoint's linear probe was measured on (cls without a probe)."""
    pooling = ckpt.classifier.pooling if ckpt.kind == "probe" and ckpt.classifier is not None else "cls"
    return Embedding(default_pooling=pooling, dim=ckpt.config.embed_dim * (2 if pooling == "cls+mean" else 1))


def preprocessing(data: dict[str, Any], config: MAEConfig) -> Preprocessing:
    """As the evaluation transform of training/data.py: square centre crop, bicubic resize, normalize."""
    mean, std = data.get("mean"), data.get("std")
    if mean is None or std is None:
        mean, std = default_stats(config.in_chans)
    return Preprocessing(resize=config.img_size, crop=config.img_size,
                         channels="L" if config.in_chans == 1 else "RGB", mean=list(mean), std=list(std))


def training_facts(ckpt: Checkpoint, cls_ckpt: Checkpoint | None) -> Training:
    """Dataset, pretraining epochs and the scalar metrics of the checkpoints (fine-tune ones prefixed)."""
    metrics = ckpt.metrics
    facts: dict[str, Any] = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}
    epochs = metrics.get("epochs", ckpt.epoch + 1 if isinstance(ckpt.epoch, int) else None)
    if cls_ckpt is not None:
        facts.update({f"finetune_{k}" if not k.startswith("finetune") else k: v
                      for k, v in cls_ckpt.metrics.items() if isinstance(v, (int, float, str))})
    for key in ("epochs", "dataset"):
        facts.pop(key, None)
    return Training(dataset=ckpt.data.get("dataset"), epochs=epochs, **facts)


def class_labels(classifier: ViTClassifier, info: ClassifierRecord, data: dict[str, Any]) -> list[str]:
    """The head's label names: from the classifier record, else the training data's, else the class ids."""
    data_labels = data.get("labels")
    if not info.labels and data_labels and len(data_labels) == len(classifier.labels):
        return list(data_labels)
    return list(classifier.labels)


def classifier_info(classifier: ViTClassifier, info: ClassifierRecord) -> ClassifierInfo:
    top1 = info.metrics.get(f"{info.head_type}_top1", info.metrics.get("top1"))
    return ClassifierInfo(source=info.head_type, pooling=classifier.pooling, top1=top1, features=True)
