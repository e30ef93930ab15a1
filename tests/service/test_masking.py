"""The numpy masking and reconstruction math against the PyTorch reference in `model/` (tests may use torch)."""

from __future__ import annotations

import numpy as np
import pytest

from model_dir.reconstruction import patchify, reconstruct, unpatchify
from model_dir.schema import Preprocessing
from service.masking import len_keep, random_masking

torch = pytest.importorskip("torch")


@pytest.mark.parametrize(("num_patches", "ratio"), [(49, 0.75), (49, 0.0), (196, 0.5), (196, 0.9)])
def test_masking_matches_the_reference(num_patches: int, ratio: float) -> None:
    from model import MaskedAutoencoderViT, get_config

    config = get_config("mae_vit_test", img_size=4 * int(num_patches**0.5))
    mae = MaskedAutoencoderViT(config)
    ours = random_masking(num_patches, len_keep(num_patches, ratio), seed=123)
    noise = torch.from_numpy(np.random.default_rng(123).random(num_patches)).unsqueeze(0)
    ids_keep, ids_restore, mask = mae.random_masking(1, ratio, noise)
    assert ours.ids_keep.tolist() == ids_keep[0].tolist()
    assert ours.ids_restore.tolist() == ids_restore[0].tolist()
    assert ours.mask.tolist() == mask[0].int().tolist()
    assert len(ours.ids_keep) == len_keep(num_patches, ratio) == int(num_patches * (1 - ratio))


def test_seed_determines_the_mask() -> None:
    a, b, c = (random_masking(49, len_keep(49, 0.75), s) for s in (1, 1, 2))
    assert a.mask.tolist() == b.mask.tolist()
    assert a.mask.tolist() != c.mask.tolist()


def test_patchify_matches_the_model() -> None:
    from model import MaskedAutoencoderViT, get_config

    mae = MaskedAutoencoderViT(get_config("mae_vit_test", in_chans=3))
    images = np.random.default_rng(0).random((3, 28, 28)).astype(np.float32)
    reference = mae.patchify(torch.from_numpy(images)[None])[0].numpy()
    np.testing.assert_array_equal(patchify(images, 4), reference)
    np.testing.assert_array_equal(unpatchify(reference, 4, 3), images)


@pytest.mark.parametrize("norm_pix_loss", [True, False])
def test_reconstruction_inverts_the_training_target(norm_pix_loss: bool) -> None:
    """A decoder that predicts the training target exactly reproduces the image, with zero loss."""
    from model import MaskedAutoencoderViT, get_config

    prep = Preprocessing(resize=28, crop=28, channels="L", mean=[0.286], std=[0.353])
    mae = MaskedAutoencoderViT(get_config("mae_vit_test", norm_pix_loss=norm_pix_loss))
    rgb = np.random.default_rng(1).integers(0, 256, (28, 28, 1), dtype=np.uint8)
    normalized = (torch.from_numpy(rgb).permute(2, 0, 1).float() / 255 - 0.286) / 0.353
    target = mae.patch_targets(normalized[None].double())[0].numpy()  # what the loss compares pred with
    masking = random_masking(49, len_keep(49, 0.75), seed=5)
    r = reconstruct(rgb, target, masking.mask, prep, patch_size=4, norm_pix_loss=norm_pix_loss)
    assert r.mse_masked == pytest.approx(0.0, abs=1e-12)
    np.testing.assert_allclose(r.reconstruction, rgb.transpose(2, 0, 1) / 255, atol=1e-6)
    np.testing.assert_allclose(r.pasted, r.original, atol=1e-6)
    # The masked picture keeps the visible patches and greys out exactly the removed ones.
    removed = unpatchify(np.repeat(masking.mask[:, None], 16, axis=1), 4, 1).astype(bool)
    np.testing.assert_array_equal(r.masked[~removed], r.original[~removed])
    assert np.all(r.masked[removed] == 0.5)
    # Predicting zeros: for norm_pix_loss that is each patch's mean (the leak), else the dataset mean.
    zeros = reconstruct(rgb, np.zeros_like(target), masking.mask, prep, 4, norm_pix_loss)
    patch_means = patchify(rgb.transpose(2, 0, 1) / 255, 4).mean(axis=1)
    shown = patchify(zeros.reconstruction, 4)[:, 0]
    if norm_pix_loss:
        np.testing.assert_allclose(shown, patch_means, atol=1e-6)
    else:
        np.testing.assert_allclose(shown, 0.286, atol=1e-6)
