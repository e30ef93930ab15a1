"""The Masked Autoencoder (He et al. 2021) in PyTorch, with the official state-dict layout.

The methods follow the paper's steps in order: patchify, random masking, encoder on the visible
patches, decoder with mask tokens, loss on the removed patches. Masking is split from the encoder:
`random_masking` draws index tensors and `forward_encoder` gathers with them, so the exported
ONNX graphs take the same `ids_keep` / `ids_restore` inputs as the training code.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.configs import MAEConfig


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int, cls_token: bool = False) -> np.ndarray:
    """Fixed 2-D sin-cos table laid out as the official one: [sin_w | cos_w | sin_h | cos_h]."""
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0)  # w first, as in the official code
    emb = np.concatenate([_sincos_1d(embed_dim // 2, grid[0]), _sincos_1d(embed_dim // 2, grid[1])], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)
    return emb  # [(1+)gs*gs, D]


def _sincos_1d(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


class PatchEmbed(nn.Module):
    """Image to patch tokens with a strided convolution (timm layout: `proj`)."""

    def __init__(self, *, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # [N, L, D]


class Attention(nn.Module):
    def __init__(self, dim: int, *, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # [B, heads, N, C/heads]
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim: int, *, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DropPath(nn.Module):
    """Stochastic depth per sample (used when fine-tuning)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class Block(nn.Module):
    """Pre-norm transformer block with the timm key names (norm1, attn, norm2, mlp)."""

    def __init__(self, dim: int, *, num_heads: int, mlp_ratio: float, eps: float, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads=num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, hidden=int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


class ViTEncoder(nn.Module):
    """The MAE encoder: patch embedding, fixed position embeddings, blocks, final norm.

    Keys sit at the top level of the state dict (`cls_token`, `pos_embed`, `patch_embed.proj.*`,
    `blocks.N.*`, `norm.*`), as in the official models, so subclasses keep that layout.
    """

    def __init__(self, config: MAEConfig, *, drop_path_rate: float = 0.0):
        super().__init__()
        self.config = config
        c = config
        self.patch_embed = PatchEmbed(patch_size=c.patch_size, in_chans=c.in_chans, embed_dim=c.embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, c.num_patches + 1, c.embed_dim), requires_grad=False)
        rates = torch.linspace(0, drop_path_rate, c.depth, device="cpu").tolist()  # also under a meta device
        self.blocks = nn.ModuleList(
            Block(c.embed_dim, num_heads=c.num_heads, mlp_ratio=c.mlp_ratio, eps=c.layer_norm_eps, drop_path=r)
            for r in rates
        )
        self.norm = nn.LayerNorm(c.embed_dim, eps=c.layer_norm_eps)

    def _init_encoder(self) -> None:
        pos = get_2d_sincos_pos_embed(self.config.embed_dim, self.config.grid_size, cls_token=True)
        self.pos_embed.data.copy_(torch.from_numpy(pos).float().unsqueeze(0))
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.zeros_(self.patch_embed.proj.bias)
        nn.init.normal_(self.cls_token, std=0.02)

    def patchify(self, imgs: Tensor) -> Tensor:
        """[N, C, H, W] -> [N, L, p*p*C], each patch ordered (row, col, channel)."""
        p, c, h = self.config.patch_size, self.config.in_chans, self.config.grid_size
        x = imgs.reshape(imgs.shape[0], c, h, p, h, p)
        x = torch.einsum("nchpwq->nhwpqc", x)
        return x.reshape(imgs.shape[0], h * h, p * p * c)

    def unpatchify(self, x: Tensor) -> Tensor:
        """[N, L, p*p*C] -> [N, C, H, W]."""
        p, c, h = self.config.patch_size, self.config.in_chans, self.config.grid_size
        x = x.reshape(x.shape[0], h, h, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, h * p)

    def random_masking(self, batch: int, mask_ratio: float, noise: Tensor | None = None,
                       device: torch.device | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Per-sample random masking by argsort of noise (lowest noise kept).

        Returns ids_keep [N, K], ids_restore [N, L] and the binary mask [N, L] (1 = removed).
        """
        L = self.config.num_patches
        len_keep = int(L * (1 - mask_ratio))
        if noise is None:
            noise = torch.rand(batch, L, device=device)
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :len_keep]
        mask = torch.ones(batch, L, device=noise.device)
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
        return ids_keep, ids_restore, mask

    def encode_tokens(self, imgs: Tensor, ids_keep: Tensor | None) -> Tensor:
        """Blocks over the cls token and the patches in ids_keep [N, K] (all when None); no final norm."""
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:, :]  # [N, L, D]
        if ids_keep is not None:
            x = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # [N, K, D]
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return x  # [N, 1+K, D]

    def forward_encoder(self, imgs: Tensor, ids_keep: Tensor) -> Tensor:
        """Encode the patches listed in ids_keep [N, K]; returns latent [N, 1+K, D] (cls first)."""
        return self.norm(self.encode_tokens(imgs, ids_keep))

    def forward_features(self, imgs: Tensor, pooling: str = "cls") -> Tensor:
        """Embedding of the unmasked image: the cls token or the mean of the patch tokens."""
        return pool_latent(self.norm(self.encode_tokens(imgs, None)), pooling)


def pool_latent(latent: Tensor, pooling: str) -> Tensor:
    """[N, 1+L, D] -> [N, D] (`cls`, `mean`) or [N, 2D] (`cls+mean`)."""
    if pooling == "cls":
        return latent[:, 0]
    if pooling == "mean":
        return latent[:, 1:].mean(dim=1)
    if pooling == "cls+mean":
        return torch.cat([latent[:, 0], latent[:, 1:].mean(dim=1)], dim=-1)
    raise ValueError(f"unknown pooling {pooling!r} (cls, mean, cls+mean)")


class MaskedAutoencoderViT(ViTEncoder):
    """Masked Autoencoder with a ViT backbone (official key layout, loads released checkpoints)."""

    def __init__(self, config: MAEConfig):
        super().__init__(config)
        c = config
        self.decoder_embed = nn.Linear(c.embed_dim, c.decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, c.decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, c.num_patches + 1, c.decoder_embed_dim),
                                              requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            Block(c.decoder_embed_dim, num_heads=c.decoder_num_heads, mlp_ratio=c.mlp_ratio, eps=c.layer_norm_eps)
            for _ in range(c.decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(c.decoder_embed_dim, eps=c.layer_norm_eps)
        self.decoder_pred = nn.Linear(c.decoder_embed_dim, c.patch_dim, bias=True)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """The official initialisation: sin-cos tables, xavier_uniform, normal(0.02) tokens."""
        self.apply(_init_weights)
        self._init_encoder()
        pos = get_2d_sincos_pos_embed(self.config.decoder_embed_dim, self.config.grid_size, cls_token=True)
        self.decoder_pos_embed.data.copy_(torch.from_numpy(pos).float().unsqueeze(0))
        nn.init.normal_(self.mask_token, std=0.02)

    def forward_decoder(self, latent: Tensor, ids_restore: Tensor) -> Tensor:
        """latent [N, 1+K, D], ids_restore [N, L] -> pred [N, L, p*p*C]."""
        x = self.decoder_embed(latent)  # [N, 1+K, Dd]
        n_mask = ids_restore.shape[1] + 1 - x.shape[1]
        mask_tokens = self.mask_token.expand(x.shape[0], n_mask, -1)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)  # [N, L, Dd], visible first
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))  # unshuffle
        x = torch.cat([x[:, :1, :], x_], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_pred(self.decoder_norm(x))
        return x[:, 1:, :]

    def patch_targets(self, imgs: Tensor) -> Tensor:
        """The reconstruction target per patch: pixels, or per-patch normalised pixels."""
        target = self.patchify(imgs)
        if self.config.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        return target

    def forward_loss(self, imgs: Tensor, pred: Tensor, mask: Tensor) -> Tensor:
        """Mean squared error per patch, averaged over removed patches only."""
        loss = ((pred - self.patch_targets(imgs)) ** 2).mean(dim=-1)  # [N, L]
        return (loss * mask).sum() / mask.sum()

    def forward(self, imgs: Tensor, mask_ratio: float = 0.75,
                noise: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        ids_keep, ids_restore, mask = self.random_masking(imgs.shape[0], mask_ratio, noise, imgs.device)
        latent = self.forward_encoder(imgs, ids_keep)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask), pred, mask


class EncoderOnlyMAE(ViTEncoder):
    """An encoder without a decoder (e.g. `mae_pretrain_vit_*.pth`): features, no reconstruction."""

    def __init__(self, config: MAEConfig):
        super().__init__(config)
        self.apply(_init_weights)
        self._init_encoder()

    def forward(self, imgs: Tensor, mask_ratio: float = 0.75, noise: Tensor | None = None):
        raise NotImplementedError(
            "this checkpoint has no decoder (encoder-only file): it can extract features but not reconstruct"
        )


def probe_head(dim: int, num_classes: int) -> nn.Sequential:
    """The linear probe's head, as the official `main_linprobe.py`: BatchNorm1d(affine=False) + Linear."""
    head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, num_classes))
    nn.init.trunc_normal_(head[1].weight, std=0.01)
    nn.init.zeros_(head[1].bias)
    return head


class ViTClassifier(ViTEncoder):
    """Encoder + classification head, as the official fine-tuning (`global_pool`) and linear probe.

    - `head_type="finetune"`: mean of patch tokens (no final `norm`) -> `fc_norm` -> `head` Linear.
    - `head_type="probe"`: pooled features after `norm` -> `head` = BatchNorm1d(affine=False) + Linear.
    """

    def __init__(self, config: MAEConfig, *, num_classes: int, head_type: str = "finetune",
                 pooling: str = "mean", drop_path_rate: float = 0.0):
        super().__init__(config, drop_path_rate=drop_path_rate)
        self.head_type, self.pooling = head_type, pooling
        dim = config.embed_dim * (2 if pooling == "cls+mean" else 1)
        if head_type == "finetune":
            if pooling != "mean":
                raise ValueError("fine-tuning uses global (mean) pooling")
            del self.norm
            self.fc_norm = nn.LayerNorm(dim, eps=config.layer_norm_eps)
            self.head = nn.Linear(dim, num_classes)
            self._init_head()
        elif head_type == "probe":
            self.head = probe_head(dim, num_classes)
        else:
            raise ValueError(f"unknown head_type {head_type!r}")

    def _init_head(self) -> None:
        nn.init.trunc_normal_(self.head.weight, std=2e-5)
        nn.init.zeros_(self.head.bias)

    def initialize_weights(self) -> None:
        """Training from scratch: the MAE's initialisation for the encoder (sin-cos positions, xavier_uniform,
        normal(0.02) cls token), the fine-tuning head's for the head."""
        if self.head_type != "finetune":
            raise ValueError("only a fine-tuning classifier is trained from scratch")
        self.apply(_init_weights)
        self._init_encoder()
        self._init_head()

    @property
    def head_linear(self) -> nn.Linear:
        return self.head if isinstance(self.head, nn.Linear) else self.head[1]

    def features(self, imgs: Tensor) -> Tensor:
        if self.head_type == "probe":
            return self.forward_features(imgs, self.pooling)
        return self.fc_norm(self.encode_tokens(imgs, None)[:, 1:].mean(dim=1))

    def head_features(self, imgs: Tensor) -> Tensor:
        """The input of the head's last Linear [N, D]: `fc_norm`'s output (fine-tune), the batch-normalized pooled
        features (probe). Unnormalized; the classifier graph's `features` output, served by `/embed?source=classifier`."""
        x = self.features(imgs)
        return x if isinstance(self.head, nn.Linear) else self.head[:-1](x)

    def forward_with_features(self, imgs: Tensor) -> tuple[Tensor, Tensor]:
        """(logits [N, num_classes], head_features [N, D]): the exported classifier graph's two outputs."""
        features = self.head_features(imgs)
        return self.head_linear(features), features

    def forward(self, imgs: Tensor) -> Tensor:
        return self.head(self.features(imgs))
