"""Data sets (Fashion-MNIST IDX files, ImageFolder) and the few transforms the recipes need, torch only.

Every random draw of an augmentation comes from a generator seeded by (seed, epoch, index), so a
run resumed from a checkpoint sees exactly the images an uninterrupted run would have seen.
"""

from __future__ import annotations

import gzip
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from model.stats import FASHION_MNIST_MEAN, FASHION_MNIST_STD, default_stats

FASHION_MNIST_DIR = Path(os.environ.get("MAE_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
FASHION_MNIST_LABELS = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (optionally gzipped) as a numpy array (the format of MNIST and Fashion-MNIST)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != math.prod(shape):
        raise ValueError(f"{path}: expected {math.prod(shape)} values for shape {shape}, found {array.size}")
    return array.reshape(shape)


def load_fashion_mnist(split: str, root: str | Path | None = None) -> tuple[Tensor, Tensor]:
    """(images uint8 [N, 1, 28, 28], labels int64 [N]) of the `train` or `test` split."""
    root = Path(root) if root else FASHION_MNIST_DIR
    prefix = {"train": "train", "test": "t10k"}[split]
    files = [root / f"{prefix}-images-idx3-ubyte.gz", root / f"{prefix}-labels-idx1-ubyte.gz"]
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(
                f"{f} not found: install Debian's dataset-fashion-mnist package or pass the data directory"
            )
    images, labels = (read_idx(f) for f in files)
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


def class_balanced_indices(targets: Tensor, per_class: int, seed: int) -> Tensor:
    """Sorted indices of `per_class` images of every class, drawn without replacement by `seed` alone."""
    g = torch.Generator().manual_seed(seed)
    picked = []
    for c in targets.unique().tolist():
        members = (targets == c).nonzero().flatten()
        if len(members) < per_class:
            raise ValueError(f"class {c} has {len(members)} images, fewer than --subset-per-class {per_class}")
        picked.append(members[torch.randperm(len(members), generator=g)[:per_class]])
    return torch.cat(picked).sort().values


def keep_class_balanced(dataset: SeededDataset, per_class: int | None, seed: int) -> None:
    """With `per_class`, reduce `dataset` to a class-balanced subset of that many images per class (by `seed`)."""
    if per_class:
        dataset.keep(class_balanced_indices(dataset.class_ids(), per_class, seed))


def _rng(seed: int, epoch: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed(hash((seed, epoch, index)) & 0x7FFF_FFFF_FFFF_FFFF)


def random_resized_crop_box(height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float],
                            g: torch.Generator) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a crop covering a random area fraction and aspect ratio (Inception-style)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * (scale[0] + (scale[1] - scale[0]) * torch.rand(1, generator=g).item())
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * torch.rand(1, generator=g).item())
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=g))
            left = int(torch.randint(0, width - w + 1, (1,), generator=g))
            return top, left, h, w
    side = min(height, width)  # fallback: central square
    return (height - side) // 2, (width - side) // 2, side, side


def resize(img: Tensor, size: int) -> Tensor:
    """float [C, H, W] -> [C, size, size], bicubic as the official recipes, clamped to [0, 1]."""
    if img.shape[-2:] == (size, size):
        return img
    out = F.interpolate(img.unsqueeze(0), size=(size, size), mode="bicubic", align_corners=False, antialias=True)
    return out.squeeze(0).clamp_(0.0, 1.0)


class Transform:
    """uint8 [C, H, W] -> normalized float [C, size, size]; training mode crops and flips at random."""

    def __init__(self, size: int, *, mean: tuple[float, ...], std: tuple[float, ...], train: bool,
                 scale: tuple[float, float] = (0.2, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
                 hflip: bool = True):
        self.size, self.train, self.scale, self.ratio, self.hflip = size, train, scale, ratio, hflip
        self.mean = torch.tensor(mean).view(-1, 1, 1)
        self.std = torch.tensor(std).view(-1, 1, 1)

    def __call__(self, img: Tensor, g: torch.Generator) -> Tensor:
        x = img.float() / 255.0
        if self.train:
            top, left, h, w = random_resized_crop_box(x.shape[1], x.shape[2], self.scale, self.ratio, g)
            x = resize(x[:, top:top + h, left:left + w], self.size)
            if self.hflip and torch.rand(1, generator=g).item() < 0.5:
                x = x.flip(-1)
        else:
            x = center_crop(x)
            x = resize(x, self.size)
        return (x - self.mean) / self.std


def center_crop(x: Tensor) -> Tensor:
    side = min(x.shape[1], x.shape[2])
    top, left = (x.shape[1] - side) // 2, (x.shape[2] - side) // 2
    return x[:, top:top + side, left:left + side]


class SeededDataset(Dataset):
    """Base: items are (transformed image, label) with augmentation seeded by (seed, epoch, index)."""

    labels: list[str]

    def __init__(self, transform: Transform, *, seed: int = 0):
        self.transform, self.seed, self.epoch = transform, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def raw(self, index: int) -> tuple[Tensor, int]:
        raise NotImplementedError

    def class_ids(self) -> Tensor:
        """The label of every item, in order."""
        raise NotImplementedError

    def keep(self, indices: Tensor) -> None:
        """Keep only the items at `indices` (a subset of the split), in that order."""
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        img, label = self.raw(index)
        return self.transform(img, _rng(self.seed, self.epoch, index)), label


class FashionMNIST(SeededDataset):
    labels = FASHION_MNIST_LABELS
    mean, std = FASHION_MNIST_MEAN, FASHION_MNIST_STD

    def __init__(self, split: str, *, transform: Transform, root: str | Path | None = None, seed: int = 0,
                 limit: int | None = None):
        super().__init__(transform, seed=seed)
        self.images, self.targets = load_fashion_mnist(split, root)
        if limit:
            self.keep(torch.arange(min(limit, len(self.targets))))

    def __len__(self) -> int:
        return len(self.targets)

    def raw(self, index: int) -> tuple[Tensor, int]:
        return self.images[index], int(self.targets[index])

    def class_ids(self) -> Tensor:
        return self.targets

    def keep(self, indices: Tensor) -> None:
        self.images, self.targets = self.images[indices], self.targets[indices]


class ImageFolder(SeededDataset):
    """root/<class>/<image>: classes sorted by name, images decoded with PIL to `in_chans` channels.

    Normalized with ImageNet's statistics (RGB) or 0.5 / 0.5 (grayscale); `mean` and `std` say which.
    """

    def __init__(self, root: str | Path, *, transform: Transform, in_chans: int = 3, seed: int = 0,
                 limit: int | None = None):
        super().__init__(transform, seed=seed)
        self.mean, self.std = default_stats(in_chans)
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"{root}: no such image folder")
        self.labels = sorted(d.name for d in root.iterdir() if d.is_dir())
        self.samples = [
            (p, i) for i, c in enumerate(self.labels) for p in sorted((root / c).rglob("*"))
            if p.suffix.lower() in IMAGE_EXTENSIONS
        ][:limit]
        if not self.samples:
            raise FileNotFoundError(f"{root}: no images in class sub-folders")
        self.mode = "L" if in_chans == 1 else "RGB"

    def __len__(self) -> int:
        return len(self.samples)

    def class_ids(self) -> Tensor:
        return torch.tensor([label for _, label in self.samples])

    def keep(self, indices: Tensor) -> None:
        self.samples = [self.samples[i] for i in indices.tolist()]

    def raw(self, index: int) -> tuple[Tensor, int]:
        path, label = self.samples[index]
        with Image.open(path) as im:
            arr = np.asarray(im.convert(self.mode))
        arr = arr[:, :, None] if arr.ndim == 2 else arr
        return torch.from_numpy(arr.copy()).permute(2, 0, 1), label


def build_dataset(name: str, split: str, img_size: int, in_chans: int, train: bool, root: str | None = None,
                  seed: int = 0, limit: int | None = None, scale: tuple[float, float] = (0.2, 1.0)) -> SeededDataset:
    """`fashion-mnist` (root: the IDX directory) or `imagefolder` (root: the split's parent directory).

    `train` turns on RandomResizedCrop (area fraction `scale`) and horizontal flips.
    """
    if name == "fashion-mnist":
        t = Transform(img_size, mean=FashionMNIST.mean, std=FashionMNIST.std, train=train, scale=scale)
        return FashionMNIST(split, transform=t, root=root, seed=seed, limit=limit)
    if name == "imagefolder":
        if not root:
            raise ValueError("the imagefolder dataset needs --data-path")
        mean, std = default_stats(in_chans)
        t = Transform(img_size, mean=mean, std=std, train=train, scale=scale)
        return ImageFolder(Path(root) / split, transform=t, in_chans=in_chans, seed=seed, limit=limit)
    raise ValueError(f"unknown dataset {name!r} (fashion-mnist, imagefolder)")
