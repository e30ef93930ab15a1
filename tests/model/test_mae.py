"""The MAE model against the reference implementation's facts (reference/mae_facts.md §1).

Masking, patch order, position tables, loss and key layout are checked against expectations built
here independently (loops, hand-written tables), not against the model's own helpers.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from model import EncoderOnlyMAE, MAEConfig, MaskedAutoencoderViT, ViTClassifier, get_2d_sincos_pos_embed, get_config

TEST = get_config("mae_vit_test")  # 28 px, patch 4: L = 49
RGB = MAEConfig(img_size=8, patch_size=4, in_chans=3, embed_dim=16, depth=1, num_heads=2,
                decoder_embed_dim=8, decoder_depth=1, decoder_num_heads=2)


@pytest.fixture(scope="module")
def model() -> MaskedAutoencoderViT:
    torch.manual_seed(0)
    return MaskedAutoencoderViT(TEST).eval()


def _imgs(config: MAEConfig, n: int = 2, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, config.in_chans, config.img_size, config.img_size, generator=g)


# --- masking -------------------------------------------------------------------------------------


def test_ids_restore_inverts_the_shuffle(model: MaskedAutoencoderViT) -> None:
    noise = torch.rand(3, 49, generator=torch.Generator().manual_seed(2))
    ids_shuffle, ids_restore, mask = model.random_masking(3, 0.0, noise)  # r = 0: ids_keep is the whole shuffle
    assert ids_shuffle.shape == (3, 49) and mask.sum() == 0
    arange = torch.arange(49).expand(3, -1)
    assert torch.equal(torch.gather(ids_shuffle, 1, ids_restore), arange)
    assert torch.equal(torch.gather(ids_restore, 1, ids_shuffle), arange)
    assert not torch.equal(ids_shuffle, arange)  # r = 0 still shuffles (the official behaviour)
    # the shuffle is the ascending argsort of the noise: lowest noise first
    for row in range(3):
        assert ids_shuffle[row].tolist() == sorted(range(49), key=lambda i: noise[row, i].item())


@pytest.mark.parametrize("ratio, kept", [(0.0, 49), (0.5, 24), (0.6, 19), (0.75, 12), (0.9, 4)])
def test_exactly_int_L_times_one_minus_r_are_kept(model: MaskedAutoencoderViT, ratio: float, kept: int) -> None:
    noise = torch.rand(4, 49, generator=torch.Generator().manual_seed(3))
    ids_keep, ids_restore, mask = model.random_masking(4, ratio, noise)
    assert ids_keep.shape == (4, kept)
    assert mask.sum(dim=1).tolist() == [49.0 - kept] * 4
    for row in range(4):
        lowest = sorted(range(49), key=lambda i: noise[row, i].item())[:kept]
        assert ids_keep[row].tolist() == lowest  # the kept patches are the lowest-noise ones, in that order
        assert set(torch.nonzero(mask[row] == 0).flatten().tolist()) == set(lowest)


def test_same_noise_same_mask_and_outputs(model: MaskedAutoencoderViT) -> None:
    imgs = _imgs(TEST)
    noise = torch.rand(2, 49, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        loss1, pred1, mask1 = model(imgs, 0.75, noise)
        torch.manual_seed(123)  # the global RNG must not matter once noise is given
        loss2, pred2, mask2 = model(imgs, 0.75, noise.clone())
        _, _, mask3 = model(imgs, 0.75, torch.rand(2, 49, generator=torch.Generator().manual_seed(5)))
    assert torch.equal(mask1, mask2) and torch.equal(pred1, pred2) and torch.equal(loss1, loss2)
    assert not torch.equal(mask1, mask3)
    assert not torch.equal(mask1[0], mask1[1])  # per-sample masks


def test_loss_counts_masked_patches_only(model: MaskedAutoencoderViT) -> None:
    imgs = _imgs(TEST)
    noise = torch.rand(2, 49, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        loss, pred, mask = model(imgs, 0.75, noise)
        target = model.patchify(imgs)
        per_patch = [[((pred[n, i] - target[n, i]) ** 2).mean().item() for i in range(49)] for n in range(2)]
        masked = [per_patch[n][i] for n in range(2) for i in range(49) if mask[n, i] == 1]
        assert len(masked) == 2 * 37
        assert loss.item() == pytest.approx(sum(masked) / len(masked), rel=1e-5)

        visible = mask == 0
        changed = pred.clone()
        changed[visible] += 100.0
        assert torch.equal(model.forward_loss(imgs, changed, mask), loss)
        changed = pred.clone()
        changed[~visible] += 1.0
        assert model.forward_loss(imgs, changed, mask) > loss + 0.5


# --- patches and positions -----------------------------------------------------------------------


def test_patchify_order_is_row_col_channel() -> None:
    """'nchpwq->nhwpqc': patches row-major over the grid, each patch (row-in-patch, col-in-patch, channel)."""
    model = MaskedAutoencoderViT(RGB)
    value = lambda c, y, x: 100 * c + 10 * y + x  # every pixel distinct
    imgs = torch.tensor([[[[value(c, y, x) for x in range(8)] for y in range(8)] for c in range(3)]],
                        dtype=torch.float32)
    expected = torch.zeros(1, 4, 48)
    for patch in range(4):
        gy, gx = divmod(patch, 2)
        for py in range(4):
            for px in range(4):
                for c in range(3):
                    expected[0, patch, (py * 4 + px) * 3 + c] = value(c, 4 * gy + py, 4 * gx + px)
    assert torch.equal(model.patchify(imgs), expected)
    assert torch.equal(model.unpatchify(expected), imgs)


@pytest.mark.parametrize("config", [TEST, RGB], ids=["1ch", "3ch"])
def test_patchify_unpatchify_round_trip(config: MAEConfig) -> None:
    model = MaskedAutoencoderViT(config)
    imgs = _imgs(config, n=3)
    patches = model.patchify(imgs)
    assert patches.shape == (3, config.num_patches, config.patch_dim)
    assert torch.equal(model.unpatchify(patches), imgs)


def _reference_pos_embed(dim: int, grid: int) -> torch.Tensor:
    """Row 0 (cls) zeros; patch (row i, col j): [sin_w | cos_w | sin_h | cos_h], omega_k = 10000^(-k / (dim/4))."""
    q = dim // 4
    rows = [[0.0] * dim]
    for i in range(grid):
        for j in range(grid):
            row: list[float] = []
            for pos in (j, i):  # w (column) first, then h (row)
                row += [math.sin(pos / 10000 ** (k / q)) for k in range(q)]
                row += [math.cos(pos / 10000 ** (k / q)) for k in range(q)]
            rows.append(row)
    return torch.tensor(rows, dtype=torch.float64)


def test_sincos_pos_embed_matches_the_official_layout() -> None:
    table = torch.from_numpy(get_2d_sincos_pos_embed(16, 3, cls_token=True))
    assert table.shape == (10, 16)
    assert torch.allclose(table, _reference_pos_embed(16, 3), atol=1e-12)
    # the model's encoder and decoder tables are those, frozen
    model = MaskedAutoencoderViT(TEST)
    assert torch.allclose(model.pos_embed[0].double(), _reference_pos_embed(32, 7), atol=1e-6)
    assert torch.allclose(model.decoder_pos_embed[0].double(), _reference_pos_embed(16, 7), atol=1e-6)
    assert not model.pos_embed.requires_grad and not model.decoder_pos_embed.requires_grad


# --- loss target, features, norms ----------------------------------------------------------------


def test_norm_pix_target_uses_unbiased_var_and_eps_1e6() -> None:
    model = MaskedAutoencoderViT(get_config("mae_vit_test", norm_pix_loss=True))
    imgs = _imgs(TEST, n=1) * 1e-3  # per-patch variance ~1e-6, so eps and the n-1 divisor both matter
    got = model.patch_targets(imgs)
    patch = [model.patchify(imgs)[0, 0, k].item() for k in range(16)]
    mean = sum(patch) / 16

    def target(divisor: int, eps: float) -> torch.Tensor:
        var = sum((v - mean) ** 2 for v in patch) / divisor
        return torch.tensor([(v - mean) / math.sqrt(var + eps) for v in patch])

    assert torch.allclose(got[0, 0].double(), target(15, 1e-6).double(), atol=1e-4)
    assert not torch.allclose(got[0, 0].double(), target(16, 1e-6).double(), atol=1e-2)  # biased variance
    assert not torch.allclose(got[0, 0].double(), target(15, 1e-5).double(), atol=1e-2)  # other eps
    plain = MaskedAutoencoderViT(TEST)
    assert torch.equal(plain.patch_targets(imgs), plain.patchify(imgs))  # norm_pix_loss off: raw pixels


def test_forward_features_pooling(model: MaskedAutoencoderViT) -> None:
    imgs = _imgs(TEST)
    with torch.no_grad():
        latent = model.forward_encoder(imgs, torch.arange(49).expand(2, -1))  # all patches, spatial order
        cls, mean = model.forward_features(imgs, "cls"), model.forward_features(imgs, "mean")
        both = model.forward_features(imgs, "cls+mean")
        torch.manual_seed(7)
        again = model.forward_features(imgs, "cls")  # no random masking inside
        # any order of all 49 patches gives the same cls output (attention is order-free, positions are added)
        ids_shuffle, _, _ = model.random_masking(2, 0.0, torch.rand(2, 49, generator=torch.Generator().manual_seed(8)))
        shuffled = model.forward_encoder(imgs, ids_shuffle)
    assert cls.shape == mean.shape == (2, 32) and both.shape == (2, 64)
    assert torch.equal(cls, latent[:, 0]) and torch.equal(cls, again)
    assert torch.allclose(mean, latent[:, 1:].mean(dim=1), atol=1e-6)
    assert torch.equal(both, torch.cat([cls, mean], dim=-1))
    assert torch.allclose(shuffled[:, 0], cls, atol=1e-5)
    assert not torch.allclose(cls, mean, atol=1e-2)
    with pytest.raises(ValueError, match="pooling"):
        model.forward_features(imgs, "max")


def test_layer_norm_eps_is_configurable() -> None:
    config = get_config("mae_vit_test", layer_norm_eps=1e-12)
    for module, count in ((MaskedAutoencoderViT(config), 2 * 2 + 1 + 2 * 1 + 1),
                          (EncoderOnlyMAE(config), 2 * 2 + 1),
                          (ViTClassifier(config, num_classes=10), 2 * 2 + 1)):  # finetune: norm replaced by fc_norm
        norms = [m for m in module.modules() if isinstance(m, nn.LayerNorm)]
        assert len(norms) == count
        assert {m.eps for m in norms} == {1e-12}
    assert {m.eps for m in MaskedAutoencoderViT(TEST).modules() if isinstance(m, nn.LayerNorm)} == {1e-6}


# --- the official key layout ---------------------------------------------------------------------


def _official_layout(patch: int, dim: int, depth: int, num_patches: int, chans: int = 3,
                     dec_dim: int = 512, dec_depth: int = 8) -> dict[str, tuple[int, ...]]:
    """Key -> shape of `models_mae.MaskedAutoencoderViT` (reference §1), mlp_ratio 4, qkv bias."""
    def block(prefix: str, d: int) -> dict[str, tuple[int, ...]]:
        return {
            f"{prefix}.norm1.weight": (d,), f"{prefix}.norm1.bias": (d,),
            f"{prefix}.attn.qkv.weight": (3 * d, d), f"{prefix}.attn.qkv.bias": (3 * d,),
            f"{prefix}.attn.proj.weight": (d, d), f"{prefix}.attn.proj.bias": (d,),
            f"{prefix}.norm2.weight": (d,), f"{prefix}.norm2.bias": (d,),
            f"{prefix}.mlp.fc1.weight": (4 * d, d), f"{prefix}.mlp.fc1.bias": (4 * d,),
            f"{prefix}.mlp.fc2.weight": (d, 4 * d), f"{prefix}.mlp.fc2.bias": (d,),
        }

    layout = {"cls_token": (1, 1, dim), "pos_embed": (1, num_patches + 1, dim),
              "patch_embed.proj.weight": (dim, chans, patch, patch), "patch_embed.proj.bias": (dim,)}
    for i in range(depth):
        layout.update(block(f"blocks.{i}", dim))
    layout.update({"norm.weight": (dim,), "norm.bias": (dim,),
                   "decoder_embed.weight": (dec_dim, dim), "decoder_embed.bias": (dec_dim,),
                   "mask_token": (1, 1, dec_dim), "decoder_pos_embed": (1, num_patches + 1, dec_dim)})
    for i in range(dec_depth):
        layout.update(block(f"decoder_blocks.{i}", dec_dim))
    layout.update({"decoder_norm.weight": (dec_dim,), "decoder_norm.bias": (dec_dim,),
                   "decoder_pred.weight": (patch * patch * chans, dec_dim), "decoder_pred.bias": (patch * patch * chans,)})
    return layout


@pytest.mark.parametrize("name, patch, dim, depth, heads, num_patches", [
    ("mae_vit_base_patch16", 16, 768, 12, 12, 196),
    ("mae_vit_large_patch16", 16, 1024, 24, 16, 196),
    ("mae_vit_huge_patch14", 14, 1280, 32, 16, 256),
])
def test_official_state_dict_loads_strictly(name: str, patch: int, dim: int, depth: int, heads: int,
                                            num_patches: int) -> None:
    config = get_config(name)
    assert (config.img_size, config.patch_size, config.embed_dim, config.depth, config.num_heads) == (
        224, patch, dim, depth, heads)
    assert (config.decoder_embed_dim, config.decoder_depth, config.decoder_num_heads) == (512, 8, 16)
    assert config.layer_norm_eps == 1e-6 and config.mlp_ratio == 4.0
    with torch.device("meta"):  # shapes only: no memory, no init
        model = MaskedAutoencoderViT(config)
    layout = _official_layout(patch, dim, depth, num_patches)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == layout
    state = {k: torch.empty(shape, device="meta") for k, shape in layout.items()}
    model.load_state_dict(state, strict=True, assign=True)
    with pytest.raises(RuntimeError, match="Missing key"):
        model.load_state_dict({k: v for k, v in state.items() if k != "norm.bias"}, strict=True, assign=True)
    if name == "mae_vit_base_patch16":  # the hub's ViT-B ForPreTraining file: 447,670,680 bytes incl. a <64 KiB header
        assert (447_670_680 - 65_536) / 4 < sum(math.prod(s) for s in layout.values()) < 447_670_680 / 4


def test_small_config_state_dict_round_trip() -> None:
    torch.manual_seed(1)
    source, target = MaskedAutoencoderViT(TEST), MaskedAutoencoderViT(TEST)
    assert {k: tuple(v.shape) for k, v in source.state_dict().items()} == _official_layout(
        4, 32, 2, 49, chans=1, dec_dim=16, dec_depth=1)
    target.load_state_dict(source.state_dict(), strict=True)
    imgs, noise = _imgs(TEST), torch.rand(2, 49)
    with torch.no_grad():
        assert torch.equal(source.eval()(imgs, 0.75, noise)[1], target.eval()(imgs, 0.75, noise)[1])
