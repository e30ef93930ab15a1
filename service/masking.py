"""Seeded random masking in numpy, with the reference semantics (lowest noise kept, ascending argsort)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_SEED = 2**53 - 1  # seeds travel through JSON and JavaScript numbers exactly up to here


@dataclass(frozen=True)
class Masking:
    """Index tensors of one image's mask: what the encoder keeps and how the decoder unshuffles."""

    ids_keep: np.ndarray  # [K] int64, patches given to the encoder
    ids_restore: np.ndarray  # [L] int64, argsort of the shuffle
    mask: np.ndarray  # [L] uint8, 1 = removed


def len_keep(num_patches: int, mask_ratio: float) -> int:
    """K, the number of visible patches, as the reference computes it."""
    return int(num_patches * (1 - mask_ratio))


def random_masking(num_patches: int, keep: int, seed: int) -> Masking:
    """The reference `random_masking` for one image, `keep` = len_keep(...) patches visible, with noise from
    `numpy.random.default_rng(seed)` (the mask ratio is checked where a request's options are: tasks)."""
    noise = np.random.default_rng(seed).random(num_patches)  # [L]
    ids_shuffle = np.argsort(noise, kind="stable")
    ids_restore = np.argsort(ids_shuffle, kind="stable")
    mask = np.ones(num_patches, dtype=np.uint8)
    mask[:keep] = 0
    return Masking(ids_keep=ids_shuffle[:keep].astype(np.int64), ids_restore=ids_restore.astype(np.int64),
                   mask=mask[ids_restore])
