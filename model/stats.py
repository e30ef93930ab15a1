"""Per-channel normalization statistics of the data sets this project knows (pixels scaled to [0, 1]).

Training normalizes with them, checkpoints record them (`data.mean` / `data.std`) and the exporter
writes them into `model.json`, from where the server reads them: they are defined here only.
"""

from __future__ import annotations

FASHION_MNIST_MEAN = (0.2860,)  # the Fashion-MNIST training split
FASHION_MNIST_STD = (0.3530,)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def default_stats(in_chans: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) for images without recorded statistics: ImageNet's for RGB, 0.5 / 0.5 otherwise."""
    return (IMAGENET_MEAN, IMAGENET_STD) if in_chans == 3 else ((0.5,) * in_chans, (0.5,) * in_chans)
