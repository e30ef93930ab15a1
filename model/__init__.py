"""The MAE in PyTorch: architectures, masking, patchify, checkpoint I/O and importers."""

from model.checkpoint import CheckpointError, load_checkpoint, load_classifier, read_checkpoint, save_checkpoint
from model.configs import CONFIGS, MAEConfig, get_config
from model.mae import EncoderOnlyMAE, MaskedAutoencoderViT, ViTClassifier, get_2d_sincos_pos_embed, pool_latent

__all__ = [
    "CONFIGS", "CheckpointError", "EncoderOnlyMAE", "MAEConfig", "MaskedAutoencoderViT", "ViTClassifier",
    "get_2d_sincos_pos_embed", "get_config", "load_checkpoint", "load_classifier", "pool_latent",
    "read_checkpoint", "save_checkpoint",
]
