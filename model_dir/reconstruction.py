"""From the decoder's `pred` back to pictures: patchify in numpy, undo the target normalization, score, composite;
and the reconstruction panel (original | masked | reconstruction | pasted per row) the server's `/reconstruct`
returns and the model card shows.

`pred` lives in the space of the training target: normalized pixels, or, for `norm_pix_loss` models,
per-patch standardized normalized pixels. Turning the latter back into pixels needs each patch's
mean and std, which for a masked patch come from the original image (the target): a leak that the
response states as `denormalized_with_target_stats`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from model_dir.schema import Preprocessing

NORM_PIX_EPS = 1e-6  # as in the training loss: (target - mean) / sqrt(var + eps)
MASKED_GRAY = 0.5  # value painted over removed patches in the "masked" picture
PANEL_GAP = 4  # pixels of white between the pictures of a panel
PANEL_MIN_SIDE = 128  # small model inputs (28x28) are enlarged, nearest neighbour, to at least this


@dataclass(frozen=True)
class Reconstruction:
    """The four pictures (float [C, H, W] in [0, 1]) and the errors on the removed patches."""

    original: np.ndarray
    masked: np.ndarray
    reconstruction: np.ndarray
    pasted: np.ndarray  # reconstruction with the visible patches of the original pasted back
    mse_masked: float | None  # in the training target's space (the model's loss on this image); None: none removed
    mse_masked_pixels: float | None  # in [0, 1] pixel space, on the pictures as shown


def patchify(image: np.ndarray, patch_size: int) -> np.ndarray:
    """[C, H, W] -> [L, p*p*C], each patch ordered (row, col, channel) as the model's patchify."""
    c, h, w = image.shape
    gh, gw = h // patch_size, w // patch_size
    x = image.reshape(c, gh, patch_size, gw, patch_size)
    return x.transpose(1, 3, 2, 4, 0).reshape(gh * gw, patch_size * patch_size * c)


def unpatchify(patches: np.ndarray, patch_size: int, channels: int) -> np.ndarray:
    """[L, p*p*C] -> [C, H, W] for a square grid."""
    grid = int(round(patches.shape[0] ** 0.5))
    x = patches.reshape(grid, grid, patch_size, patch_size, channels)
    return x.transpose(4, 0, 2, 1, 3).reshape(channels, grid * patch_size, grid * patch_size)


def reconstruct(rgb: np.ndarray, pred: np.ndarray, mask: np.ndarray, prep: Preprocessing, patch_size: int,
                norm_pix_loss: bool) -> Reconstruction:
    """rgb uint8 [H, W, C] (the model input as shown), pred [L, p*p*C], mask [L] (1 = removed)."""
    channels = rgb.shape[2]
    mean = np.asarray(prep.mean, dtype=np.float64).reshape(-1, 1, 1)
    std = np.asarray(prep.std, dtype=np.float64).reshape(-1, 1, 1)
    original = rgb.transpose(2, 0, 1).astype(np.float64) / 255.0  # [C, H, W]
    target = patchify((original - mean) / std, patch_size)  # [L, p*p*C], normalized pixels
    pred = pred.astype(np.float64)
    if norm_pix_loss:
        patch_mean = target.mean(axis=-1, keepdims=True)
        patch_std = np.sqrt(target.var(axis=-1, ddof=1, keepdims=True) + NORM_PIX_EPS)
        loss_target = (target - patch_mean) / patch_std
        pred_pixels = pred * patch_std + patch_mean
    else:
        loss_target, pred_pixels = target, pred
    removed = mask.astype(bool)
    # A mask ratio small enough to remove no patch (K = L) leaves nothing to score: None, not NaN.
    mse_masked = float(((pred - loss_target) ** 2).mean(axis=-1)[removed].mean()) if removed.any() else None

    reconstruction = np.clip(unpatchify(pred_pixels, patch_size, channels) * std + mean, 0.0, 1.0)
    pixel_mask = unpatchify(np.repeat(mask.astype(np.float64)[:, None], target.shape[1], axis=1),
                            patch_size, channels)  # [C, H, W], 1 on removed patches
    masked = original * (1 - pixel_mask) + MASKED_GRAY * pixel_mask
    pasted = original * (1 - pixel_mask) + reconstruction * pixel_mask
    mse_pixels = float(((reconstruction - original) ** 2)[pixel_mask.astype(bool)].mean()) if removed.any() else None
    return Reconstruction(original=original, masked=masked, reconstruction=reconstruction, pasted=pasted,
                          mse_masked=mse_masked, mse_masked_pixels=mse_pixels)


def to_uint8(image: np.ndarray) -> np.ndarray:
    """float [C, H, W] in [0, 1] -> uint8 [H, W, C]."""
    return np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8).transpose(1, 2, 0)


def enlarge(rgb: np.ndarray) -> np.ndarray:
    """Nearest-neighbour enlargement of small images to at least PANEL_MIN_SIDE pixels (integer factor)."""
    factor = max(1, -(-PANEL_MIN_SIDE // max(rgb.shape[:2])))
    return rgb.repeat(factor, axis=0).repeat(factor, axis=1)


def panel_row(r: Reconstruction) -> list[np.ndarray]:
    """One row of the reconstruction panel: the four pictures as uint8 [H, W, C], enlarged when small."""
    return [enlarge(to_uint8(x)) for x in (r.original, r.masked, r.reconstruction, r.pasted)]


def panel(rows: list[list[np.ndarray]]) -> np.ndarray:
    """Rows of equally sized uint8 [H, W, C] images -> one grid image, white gaps between cells."""
    height, width, channels = rows[0][0].shape
    cols = max(len(r) for r in rows)
    out = np.full((len(rows) * (height + PANEL_GAP) - PANEL_GAP, cols * (width + PANEL_GAP) - PANEL_GAP, channels),
                  255, dtype=np.uint8)
    for i, row in enumerate(rows):
        for j, cell in enumerate(row):
            top, left = i * (height + PANEL_GAP), j * (width + PANEL_GAP)
            out[top:top + height, left:left + width] = cell
    return out
