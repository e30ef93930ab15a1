"""Class-balanced subsets: exact counts per class, a function of the seed alone, drawn from the split."""

from __future__ import annotations

import pytest
import torch

from training.data import class_balanced_indices


def imbalanced_targets() -> torch.Tensor:
    """Three classes of 50, 80 and 200 items, shuffled."""
    targets = torch.cat([torch.full((n,), c) for c, n in enumerate((50, 80, 200))])
    return targets[torch.randperm(len(targets), generator=torch.Generator().manual_seed(1))]


def test_exact_counts_per_class_without_repeats() -> None:
    targets = imbalanced_targets()
    picked = class_balanced_indices(targets, 40, seed=0)
    assert picked.unique().numel() == len(picked) == 120
    assert torch.bincount(targets[picked]).tolist() == [40, 40, 40]
    assert torch.equal(picked, picked.sort().values)


def test_deterministic_per_seed() -> None:
    targets = imbalanced_targets()
    assert torch.equal(class_balanced_indices(targets, 40, seed=3), class_balanced_indices(targets, 40, seed=3))
    assert not torch.equal(class_balanced_indices(targets, 40, seed=3), class_balanced_indices(targets, 40, seed=4))


def test_too_few_images_in_a_class_is_an_error() -> None:
    with pytest.raises(ValueError, match="class 0 has 50 images"):
        class_balanced_indices(imbalanced_targets(), 51, seed=0)
