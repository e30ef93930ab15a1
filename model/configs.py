"""Architectures: the `MAEConfig` dataclass and the named configurations (official and small CPU ones)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass(frozen=True)
class MAEConfig:
    """Everything needed to rebuild a `MaskedAutoencoderViT` (stored in every checkpoint as `config`)."""

    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    mlp_ratio: float = 4.0
    norm_pix_loss: bool = False
    layer_norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if self.embed_dim % self.num_heads or self.decoder_embed_dim % self.decoder_num_heads:
            raise ValueError("embedding dims must be divisible by their head counts")
        if self.embed_dim % 4 or self.decoder_embed_dim % 4:
            raise ValueError("2-D sin-cos position embeddings need dims divisible by 4")

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def patch_dim(self) -> int:
        return self.patch_size**2 * self.in_chans

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MAEConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown MAEConfig keys: {sorted(unknown)}")
        return cls(**d)


_OFFICIAL_DECODER = dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16)

CONFIGS: dict[str, MAEConfig] = {
    "mae_vit_base_patch16": MAEConfig(patch_size=16, embed_dim=768, depth=12, num_heads=12, **_OFFICIAL_DECODER),
    "mae_vit_large_patch16": MAEConfig(patch_size=16, embed_dim=1024, depth=24, num_heads=16, **_OFFICIAL_DECODER),
    "mae_vit_huge_patch14": MAEConfig(patch_size=14, embed_dim=1280, depth=32, num_heads=16, **_OFFICIAL_DECODER),
    # Small configurations for 28x28 one-channel images (Fashion-MNIST) on a CPU.
    "mae_vit_tiny_fmnist": MAEConfig(
        img_size=28, patch_size=4, in_chans=1, embed_dim=128, depth=6, num_heads=4,
        decoder_embed_dim=64, decoder_depth=3, decoder_num_heads=4, norm_pix_loss=True,
    ),
    "mae_vit_small_fmnist": MAEConfig(
        img_size=28, patch_size=4, in_chans=1, embed_dim=192, depth=8, num_heads=6,
        decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4, norm_pix_loss=True,
    ),
    # A very small configuration for tests.
    "mae_vit_test": MAEConfig(
        img_size=28, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=2,
        decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2,
    ),
}


def get_config(name: str, **overrides: Any) -> MAEConfig:
    """A named configuration, optionally with fields replaced (e.g. `norm_pix_loss=True`)."""
    if name not in CONFIGS:
        raise KeyError(f"unknown model config {name!r}; known: {', '.join(sorted(CONFIGS))}")
    return MAEConfig.from_dict({**CONFIGS[name].to_dict(), **overrides})
