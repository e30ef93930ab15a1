"""`mae-import`: Hugging Face parity, official / timm files, key spellings and refusals.

All sources are built here from small random models (no downloads); the Hugging Face ones with
the installed transformers and `save_pretrained`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from model import EncoderOnlyMAE, MAEConfig, MaskedAutoencoderViT, ViTClassifier, get_config, load_checkpoint
from model.checkpoint import Checkpoint, load_classifier
from model.importers import cli, import_checkpoint

REPO = Path(__file__).resolve().parents[2]
TEST = get_config("mae_vit_test")  # 28 px, 1 channel, patch 4, 32-d x2 (2 heads), decoder 16-d x1 (2 heads)


def _randomize(module: nn.Module, seed: int) -> nn.Module:
    """Every tensor random (LayerNorm weights around 1), so that any misplaced tensor changes the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if t.is_floating_point():
                noise = torch.randn(t.shape, generator=g) * 0.1
                is_norm_weight = name.endswith("weight") and t.ndim == 1
                t.copy_(noise + 1.0 if is_norm_weight else noise)
    return module.eval()


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        cli(argv)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def _convert(src: Path, out: Path, capsys: pytest.CaptureFixture[str], *flags: str) -> dict[str, Any]:
    """mae-import SRC --out OUT; the file it wrote, as on disk (the official layout), checked to load."""
    code, stdout, stderr = _run([str(src), "--out", str(out), *flags], capsys)
    assert code == 0, stderr
    assert str(out) in stdout
    Checkpoint.load(out)
    return torch.load(out, weights_only=True)


# --- Hugging Face ----------------------------------------------------------------------------------


def _hf_config(norm_pix_loss: bool) -> Any:
    transformers = pytest.importorskip("transformers")
    return transformers.ViTMAEConfig(
        image_size=32, patch_size=4, num_channels=3, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=256, decoder_hidden_size=32, decoder_num_hidden_layers=1, decoder_num_attention_heads=4,
        decoder_intermediate_size=128, norm_pix_loss=norm_pix_loss,
    )


def _hf_model(norm_pix_loss: bool, seed: int = 0) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    return _randomize(transformers.ViTMAEForPreTraining(_hf_config(norm_pix_loss)), seed)


@pytest.fixture(scope="module")
def hf_saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path]:
    """A random ViTMAEForPreTraining (norm_pix_loss) and its save_pretrained directory."""
    model = _hf_model(norm_pix_loss=True, seed=1)
    directory = tmp_path_factory.mktemp("hf") / "vit-mae-tiny"
    model.save_pretrained(directory)
    return model, directory


@pytest.mark.parametrize("norm_pix_loss", [True, False])
def test_hf_parity_pred_mask_loss_and_encoder(norm_pix_loss: bool, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    hf = _hf_model(norm_pix_loss, seed=2)
    hf.save_pretrained(tmp_path / "hf")
    ckpt = _convert(tmp_path / "hf", tmp_path / "mae.pth", capsys)
    assert ckpt["kind"] == "mae" and ckpt["args"]["format"] == "huggingface"
    config = MAEConfig.from_dict(ckpt["config"])
    assert (config.img_size, config.patch_size, config.in_chans, config.embed_dim, config.depth, config.num_heads,
            config.decoder_embed_dim, config.decoder_depth, config.decoder_num_heads, config.mlp_ratio) == (
        32, 4, 3, 64, 2, 4, 32, 1, 4, 4.0)
    assert config.norm_pix_loss is norm_pix_loss and config.layer_norm_eps == 1e-12

    ours = load_checkpoint(tmp_path / "mae.pth")
    assert type(ours) is MaskedAutoencoderViT
    g = torch.Generator().manual_seed(3)
    pixels, noise = torch.randn(3, 3, 32, 32, generator=g), torch.rand(3, 64, generator=g)
    with torch.no_grad():
        theirs = hf(pixel_values=pixels, noise=noise)
        loss, pred, mask = ours(pixels, mask_ratio=hf.config.mask_ratio, noise=noise)
        hidden = hf.vit(pixel_values=pixels, noise=noise).last_hidden_state
        ids_keep, _, _ = ours.random_masking(3, hf.config.mask_ratio, noise)
        latent = ours.forward_encoder(pixels, ids_keep)
    assert mask.sum().item() == 3 * 48 and torch.equal(mask, theirs.mask)
    assert (pred - theirs.logits).abs().max().item() <= 1e-5
    assert abs(loss.item() - theirs.loss.item()) <= 1e-5
    assert latent.shape == hidden.shape == (3, 17, 64)
    assert (latent - hidden).abs().max().item() <= 1e-5
    assert pred.std().item() > 0.1 and loss.item() > 0.1  # not a degenerate comparison


def test_hf_encoder_only_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hf = _hf_model(norm_pix_loss=False, seed=4)
    hf.vit.save_pretrained(tmp_path / "hf-encoder")  # a ViTMAEModel: no `vit.` prefix, no decoder
    ckpt = _convert(tmp_path / "hf-encoder", tmp_path / "enc.pth", capsys)
    assert ckpt["kind"] == "encoder"
    ours = load_checkpoint(tmp_path / "enc.pth")
    assert type(ours) is EncoderOnlyMAE
    pixels, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 64)
    with torch.no_grad():
        hidden = hf.vit(pixel_values=pixels, noise=noise).last_hidden_state
        latent = ours.forward_encoder(pixels, ours.random_masking(2, 0.75, noise)[0])
    assert (latent - hidden).abs().max().item() <= 1e-5
    with pytest.raises(NotImplementedError, match="decoder"):
        ours(pixels)


def _write_hf_variant(directory: Path, config_dir: Path, sd: dict[str, torch.Tensor]) -> Path:
    directory.mkdir()
    shutil.copy(config_dir / "config.json", directory / "config.json")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(directory / "model.safetensors"))
    return directory


def _v5_name(hub_name: str) -> str:
    """A 4.x hub key spelled as transformers 5 names its modules (reference §7)."""
    name = hub_name.replace("vit.encoder.layer.", "vit.layers.")
    for old, new in (("attention.attention.query", "attention.q_proj"), ("attention.attention.key", "attention.k_proj"),
                     ("attention.attention.value", "attention.v_proj"), ("attention.output.dense", "attention.o_proj"),
                     ("intermediate.dense", "mlp.fc1"), ("output.dense", "mlp.fc2")):
        name = name.replace(old, new)
    return name


def test_hf_key_spellings_convert_identically(hf_saved: tuple[nn.Module, Path], tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    hf, saved = hf_saved
    written = load_file(str(saved / "model.safetensors"))  # what save_pretrained of this version wrote
    hub = {k.replace("decoder.decoder_encoder.layer.", "decoder.decoder_layers."): v for k, v in written.items()}
    hub = {k.replace("vit.layers.", "vit.encoder.layer."): v for k, v in hub.items()}
    assert "decoder.decoder_layers.0.attention.attention.query.weight" in hub
    assert "vit.encoder.layer.1.attention.attention.value.bias" in hub
    v5 = {_v5_name(k): v for k, v in hub.items()}
    assert "vit.layers.1.attention.q_proj.weight" in v5 and "decoder.decoder_layers.0.mlp.fc2.bias" in v5
    in_memory = hf.state_dict()
    if "vit.layers.0.attention.q_proj.weight" in in_memory:  # transformers 5: the renaming above is the real one
        assert v5.keys() == in_memory.keys()

    reference = _convert(saved, tmp_path / "ref.pth", capsys)
    for name, sd in (("hub", hub), ("v5", v5)):
        variant = _write_hf_variant(tmp_path / name, saved, sd)
        ckpt = _convert(variant, tmp_path / f"{name}.pth", capsys)
        assert ckpt["config"] == reference["config"]
        assert ckpt["model"].keys() == reference["model"].keys()
        assert all(torch.equal(ckpt["model"][k], reference["model"][k]) for k in reference["model"]), name

    # a lone weights file (no config.json): shapes give the architecture, flags the heads
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(saved / "model.safetensors", lone / "weights.safetensors")
    ckpt = _convert(lone / "weights.safetensors", tmp_path / "lone.pth", capsys,
                    "--num-heads", "4", "--decoder-num-heads", "4", "--norm-pix-loss")
    assert ckpt["config"] == reference["config"]  # incl. eps 1e-12, the Hugging Face default
    assert all(torch.equal(ckpt["model"][k], reference["model"][k]) for k in reference["model"])


def test_hf_qkv_fused_by_rows(hf_saved: tuple[nn.Module, Path], tmp_path: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    _, saved = hf_saved
    written = load_file(str(saved / "model.safetensors"))
    ckpt = _convert(saved, tmp_path / "ref.pth", capsys)
    qkv = ckpt["model"]["blocks.1.attn.qkv.weight"]
    for i, part in enumerate(("query", "key", "value")):
        assert torch.equal(qkv[64 * i:64 * (i + 1)], written[f"vit.encoder.layer.1.attention.attention.{part}.weight"])


def test_hf_refusals(hf_saved: tuple[nn.Module, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, saved = hf_saved
    written = load_file(str(saved / "model.safetensors"))

    # an incomplete q/k/v triple: the fused key is missing, the leftovers are unexpected
    broken = {k: v for k, v in written.items() if k != "vit.encoder.layer.0.attention.attention.value.weight"}
    code, _, err = _run([str(_write_hf_variant(tmp_path / "broken", saved, broken)), "--out", str(tmp_path / "b.pth")],
                        capsys)
    assert code == 2
    assert "missing keys [blocks.0.attn.qkv.weight]" in err
    assert "vit.encoder.layer.0.attention.attention.query.weight" in err
    assert not (tmp_path / "b.pth").exists()

    # config.json that contradicts the weights
    wrong = tmp_path / "wrong"
    shutil.copytree(saved, wrong)
    config = json.loads((wrong / "config.json").read_text())
    (wrong / "config.json").write_text(json.dumps({**config, "hidden_size": 128, "num_attention_heads": 2}))
    code, _, err = _run([str(wrong), "--out", str(tmp_path / "w.pth")], capsys)
    assert code == 2 and "config.json disagrees with the weights: embed_dim 128 (weights: 64)" in err

    # another model type
    (wrong / "config.json").write_text(json.dumps({**config, "model_type": "vit"}))
    code, _, err = _run([str(wrong), "--out", str(tmp_path / "w.pth")], capsys)
    assert code == 2 and "'vit', not 'vit_mae'" in err


# --- official and timm files ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def official() -> MaskedAutoencoderViT:
    torch.manual_seed(0)
    return _randomize(MaskedAutoencoderViT(TEST), seed=5)


def _encoder_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in sd.items() if not k.startswith(("decoder", "mask_token"))}


@pytest.mark.parametrize("file_name, flags, norm_pix_loss, eps", [
    ("mae_visualize_vit_test.pth", [], False, 1e-6),
    ("mae_pretrain_vit_test_full.pth", [], True, 1e-6),
    ("mae_pretrain_vit_test_full.pth", ["--no-norm-pix-loss", "--layer-norm-eps", "1e-12"], False, 1e-12),
    ("checkpoint-799.pth", ["--config-name", "mae_vit_test"], False, 1e-6),
])
def test_official_full_file(official: MaskedAutoencoderViT, file_name: str, flags: list[str], norm_pix_loss: bool,
                            eps: float, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.save({"model": official.state_dict()}, tmp_path / file_name)
    ckpt = _convert(tmp_path / file_name, tmp_path / "out.pth", capsys, *flags)
    assert ckpt["kind"] == "mae" and ckpt["args"]["format"] == "official"
    assert ckpt["config"] == get_config("mae_vit_test", norm_pix_loss=norm_pix_loss, layer_norm_eps=eps).to_dict()
    assert ckpt["data"]["mean"] is None  # one channel: ImageNet statistics do not apply
    model = load_checkpoint(tmp_path / "out.pth")
    assert type(model) is MaskedAutoencoderViT
    for k, v in official.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    if eps == 1e-6:
        imgs, noise = torch.randn(2, 1, 28, 28), torch.rand(2, 49)
        with torch.no_grad():
            assert torch.equal(model(imgs, 0.75, noise)[1], official(imgs, 0.75, noise)[1])


@pytest.mark.parametrize("wrap", [True, False], ids=["official", "timm-bare"])
def test_encoder_only_file(official: MaskedAutoencoderViT, wrap: bool, tmp_path: Path,
                           capsys: pytest.CaptureFixture[str]) -> None:
    sd = _encoder_keys(official.state_dict())
    assert "norm.weight" in sd and "decoder_pred.weight" not in sd and "mask_token" not in sd
    torch.save({"model": sd} if wrap else sd, tmp_path / "mae_pretrain_vit_test.pth")
    ckpt = _convert(tmp_path / "mae_pretrain_vit_test.pth", tmp_path / "enc.pth", capsys)
    assert ckpt["kind"] == "encoder" and ckpt["args"]["format"] == ("official" if wrap else "timm")
    model = load_checkpoint(tmp_path / "enc.pth")
    assert type(model) is EncoderOnlyMAE
    imgs = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        for pooling in ("cls", "mean"):
            assert torch.equal(model.forward_features(imgs, pooling), official.forward_features(imgs, pooling))
    with pytest.raises(NotImplementedError, match="no decoder"):
        model(imgs)


def test_official_finetuned_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = _randomize(ViTClassifier(TEST, num_classes=10), seed=6)
    assert "fc_norm.weight" in source.state_dict() and "norm.weight" not in source.state_dict()
    torch.save({"model": source.state_dict()}, tmp_path / "mae_finetuned_vit_test.pth")
    ckpt = _convert(tmp_path / "mae_finetuned_vit_test.pth", tmp_path / "ft.pth", capsys)
    assert ckpt["kind"] == "finetune"
    assert {k: ckpt["classifier"][k] for k in ("head_type", "pooling", "num_classes", "labels")} == {
        "head_type": "finetune", "pooling": "mean", "num_classes": 10, "labels": None}
    model = load_checkpoint(tmp_path / "ft.pth")
    assert type(model) is ViTClassifier and model.labels == [str(i) for i in range(10)]
    imgs = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(model(imgs), source(imgs))


def test_timm_token_classifier_becomes_exact_probe(official: MaskedAutoencoderViT, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    weight, bias = torch.randn(7, 32), torch.randn(7)
    torch.save({**_encoder_keys(official.state_dict()), "head.weight": weight, "head.bias": bias},
               tmp_path / "vit_test.pth")
    ckpt = _convert(tmp_path / "vit_test.pth", tmp_path / "probe.pth", capsys)
    assert ckpt["kind"] == "probe" and ckpt["classifier"]["pooling"] == "cls"
    classifier = load_classifier(tmp_path / "probe.pth")
    imgs = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        expected = F.linear(official.forward_features(imgs, "cls"), weight, bias)  # timm: norm -> cls -> head
        assert torch.allclose(classifier(imgs), expected, atol=1e-5)


def test_heads_inferred_from_width_or_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = MAEConfig(img_size=16, patch_size=8, in_chans=3, embed_dim=128, depth=1, num_heads=2,
                       decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=2)  # matches no named config
    torch.save({"model": MaskedAutoencoderViT(config).state_dict()}, tmp_path / "custom.pth")
    ckpt = _convert(tmp_path / "custom.pth", tmp_path / "a.pth", capsys)
    assert ckpt["config"] == config.to_dict()  # 128 // 64 = 2 heads, 64 // 32 = 2 decoder heads
    assert ckpt["data"]["mean"] == [0.485, 0.456, 0.406]
    ckpt = _convert(tmp_path / "custom.pth", tmp_path / "b.pth", capsys, "--num-heads", "8",
                    "--decoder-num-heads", "4")
    assert (ckpt["config"]["num_heads"], ckpt["config"]["decoder_num_heads"]) == (8, 4)


# --- refusals ------------------------------------------------------------------------------------


def test_junk_state_dict_lists_missing_and_unexpected_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.save({"model": {"foo.weight": torch.zeros(3), "bar": torch.zeros(2)}}, tmp_path / "junk.pth")
    code, out, err = _run([str(tmp_path / "junk.pth"), "--out", str(tmp_path / "x.pth")], capsys)
    assert code == 2 and out == ""
    assert err.startswith("mae-import: error:")
    for key in ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight"):
        assert key in err.split("unexpected keys")[0]
    assert "bar" in err.split("unexpected keys")[1] and "foo.weight" in err.split("unexpected keys")[1]
    assert not (tmp_path / "x.pth").exists()


def test_near_miss_state_dict_lists_the_differences(official: MaskedAutoencoderViT, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    sd = {k: v for k, v in official.state_dict().items() if k != "norm.bias"}
    torch.save({"model": {**sd, "blocks.0.ls1.gamma": torch.ones(32)}}, tmp_path / "near.pth")
    code, _, err = _run([str(tmp_path / "near.pth"), "--out", str(tmp_path / "x.pth")], capsys)
    assert code == 2
    assert "missing keys [norm.bias]; unexpected keys [blocks.0.ls1.gamma]" in err


def test_unusable_files(official: MaskedAutoencoderViT, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "notes.pth").write_text("not a checkpoint")
    code, _, err = _run([str(tmp_path / "notes.pth"), "--out", str(tmp_path / "x.pth")], capsys)
    assert code == 2 and "weights_only=True" in err

    code, _, err = _run([str(tmp_path / "absent.pth"), "--out", str(tmp_path / "x.pth")], capsys)
    assert code == 2 and "no such file" in err

    torch.save({"model": official.state_dict()}, tmp_path / "src.pth")
    code, _, err = _run([str(tmp_path / "src.pth"), "--out", str(tmp_path / "x.pth"), "--config-name",
                         "mae_vit_base_patch16"], capsys)
    assert code == 2 and "config 'mae_vit_base_patch16' disagrees with the weights" in err

    import_checkpoint(tmp_path / "src.pth").save(tmp_path / "ours.pth")
    code, _, err = _run([str(tmp_path / "ours.pth"), "--out", str(tmp_path / "x.pth")], capsys)
    assert code == 2 and "already a checkpoint of this project" in err
    assert not (tmp_path / "x.pth").exists()


def test_console_entry_exit_status(tmp_path: Path) -> None:
    torch.save({"weight": torch.zeros(1)}, tmp_path / "junk.pth")
    result = subprocess.run([sys.executable, "-m", "model.importers", str(tmp_path / "junk.pth"),
                             "--out", str(tmp_path / "x.pth")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "mae-import: error:" in result.stderr and "missing keys" in result.stderr
