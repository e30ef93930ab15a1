"""The MAE in PyTorch: architectures, masking, patchify, checkpoint I/O and importers."""

from model.checkpoint import Checkpoint, CheckpointError, ClassifierRecord, load_checkpoint, load_classifier
from model.configs import CONFIGS, MAEConfig, get_config
from model.mae import (
    EncoderOnlyMAE,
    MaskedAutoencoderViT,
    ViTClassifier,
    get_2d_sincos_pos_embed,
    pool_latent,
    probe_head,
)

__all__ = [
    "CONFIGS", "Checkpoint", "CheckpointError", "ClassifierRecord", "EncoderOnlyMAE", "MAEConfig",
    "MaskedAutoencoderViT", "ViTClassifier", "get_2d_sincos_pos_embed", "get_config", "load_checkpoint",
    "load_classifier", "pool_latent", "probe_head",
]
