"""Figures for the model card, drawn with Pillow: line plots, and reconstruction grids made of the server's
reconstruction panel (`model_dir.reconstruction`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from model import MaskedAutoencoderViT
from model_dir.reconstruction import PANEL_GAP, panel, panel_row, reconstruct, to_uint8
from training.model_json import preprocessing

COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189)]


def line_plot(series: dict[str, Sequence[tuple[float, float]]], path: Path, title: str, xlabel: str,
              ylabel: str, size: tuple[int, int] = (640, 400),
              errors: dict[str, Sequence[float]] | None = None) -> None:
    """One or more (x, y) series on shared axes, with min/max tick labels and a legend; `errors` (per series,
    per point) draws y ± error bars."""
    w, h = size
    left, right, top, bottom = 70, 20, 40, 50
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    errors = errors or {}
    xs = [x for s in series.values() for x, _ in s]
    ys = [y + sign * e for name, s in series.items()
          for (_, y), e in zip(s, errors.get(name, [0.0] * len(s)), strict=True) for sign in (-1, 1)]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    pad = (y1 - y0) * 0.05 or 1.0
    y0, y1 = y0 - pad, y1 + pad
    x1 = x1 if x1 > x0 else x0 + 1

    def pt(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x0) / (x1 - x0) * (w - left - right), top + (y1 - y) / (y1 - y0) * (h - top - bottom))

    d.rectangle([left, top, w - right, h - bottom], outline="black")
    for i in range(5):
        yv = y0 + (y1 - y0) * i / 4
        _, yy = pt(x0, yv)
        d.line([left - 4, yy, left, yy], fill="black")
        d.text((4, yy - 6), f"{yv:.3g}", fill="black")
        xv = x0 + (x1 - x0) * i / 4
        xx, _ = pt(xv, y0)
        d.line([xx, h - bottom, xx, h - bottom + 4], fill="black")
        d.text((xx - 10, h - bottom + 8), f"{xv:.3g}", fill="black")
    d.text((w // 2 - 4 * len(title), 12), title, fill="black")
    d.text((w // 2 - 3 * len(xlabel), h - 20), xlabel, fill="black")
    d.text((4, top - 20), ylabel, fill="black")
    for i, (name, s) in enumerate(series.items()):
        color = COLORS[i % len(COLORS)]
        points = [pt(x, y) for x, y in s]
        if len(points) > 1:
            d.line(points, fill=color, width=2)
        for px, py in points if len(points) <= 20 else []:
            d.ellipse([px - 3, py - 3, px + 3, py + 3], fill=color)
        for (x, y), e in zip(s, errors.get(name, []), strict=False):
            (px, lo), (_, hi) = pt(x, y - e), pt(x, y + e)
            d.line([px, lo, px, hi], fill=color, width=1)
            d.line([px - 4, lo, px + 4, lo], fill=color)
            d.line([px - 4, hi, px + 4, hi], fill=color)
        d.text((left + 10, top + 8 + 14 * i), f"- {name}", fill=color)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


@torch.no_grad()
def reconstruction_grid(model: MaskedAutoencoderViT, imgs: torch.Tensor, mean: Sequence[float],
                        std: Sequence[float], ratios: Sequence[float], path: Path, seed: int = 0) -> None:
    """Per ratio, one row per image: original | masked | reconstruction | pasted, the server's panel
    (`model_dir.reconstruction`), with the ratio written on the left of its rows.

    Norm-pix models predict normalised patches; they are put back on the pixel scale with each
    patch's own mean and std (that uses the hidden pixels' statistics: a visualisation only).
    """
    model.eval()
    c = model.config
    device = next(model.parameters()).device
    prep = preprocessing({"mean": list(mean), "std": list(std)}, c)
    m, s = np.asarray(mean).reshape(-1, 1, 1), np.asarray(std).reshape(-1, 1, 1)
    shown = [to_uint8(np.clip(img * s + m, 0.0, 1.0)) for img in imgs.cpu().numpy()]  # the images as seen
    rows = []
    for ratio in ratios:
        noise = torch.rand(imgs.shape[0], c.num_patches, generator=torch.Generator().manual_seed(seed))
        _, pred, mask = model(imgs.to(device), mask_ratio=ratio, noise=noise.to(device))
        for rgb, p, mk in zip(shown, pred.cpu().numpy(), mask.cpu().numpy(), strict=True):
            rows.append(panel_row(reconstruct(rgb, p, mk, prep, c.patch_size, c.norm_pix_loss)))
    grid = panel(rows)
    im = Image.fromarray(grid[:, :, 0] if grid.shape[2] == 1 else grid)
    canvas = Image.new("RGB", (im.width + 60, im.height), "white")
    canvas.paste(im, (60, 0))
    d = ImageDraw.Draw(canvas)
    block_h = (im.height + PANEL_GAP) / len(ratios)
    for i, ratio in enumerate(ratios):
        d.text((4, int(block_h * i + block_h / 2) - 6), f"mask {ratio:.2f}", fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
