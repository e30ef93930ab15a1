"""Fine-tuning: a resumed run carries on exactly as an uninterrupted one, GradScaler state and drop path included."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch
from training_helpers import run_killed_after_first_epoch, step_losses

from training import common, finetune
from training.data import FASHION_MNIST_DIR

needs_fmnist = pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason="dataset-fashion-mnist not installed")
SMALL = ["--limit", "64", "--batch-size", "16", "--warmup-epochs", "1", "--log-every", "1", "--quiet", "--seed", "3",
         "--amp", "fp16", "--epochs", "2"]


def saved(out: Path) -> dict:
    """checkpoint-last.pth as on disk (the official layout: `model`, `optimizer`, `epoch`, `scaler`, ...)."""
    return torch.load(out / "checkpoint-last.pth", weights_only=True)


@pytest.fixture()
def fp16_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """`--amp fp16` needs CUDA; here its GradScaler runs on the CPU (growing the scale every step, so that the
    scale tells how many steps it has seen) and the forward pass stays in float32."""
    real_scaler = torch.amp.GradScaler
    monkeypatch.setattr(torch.amp, "GradScaler",
                        lambda *a, **kw: real_scaler("cpu", init_scale=2.0, growth_interval=1))
    monkeypatch.setattr(common, "autocast", lambda amp, device: contextlib.nullcontext())


@needs_fmnist
def test_resume_restores_the_grad_scaler(tiny_checkpoint: Path, tmp_path: Path, fp16_on_cpu,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    base = ["--checkpoint", str(tiny_checkpoint), *SMALL]
    finetune.cli([*base, "--output-dir", str(straight)])
    run_killed_after_first_epoch(finetune, [*base, "--output-dir", str(stopped)], monkeypatch)
    first = saved(stopped)
    assert first["epoch"] == 0 and first["scaler"]["scale"] == 2.0 * 2**4  # 64 images / batch 16: 4 steps, each x2
    finetune.cli([*base, "--output-dir", str(stopped), "--resume", "auto"])

    a, b = saved(straight), saved(stopped)
    assert b["scaler"] == a["scaler"] and a["scaler"]["scale"] == 2.0 * 2**8  # the resumed scaler went on from 32
    assert step_losses(stopped) == step_losses(straight)  # drop path's draws too are a function of the step
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_scratch_init_is_the_mae_initialisation(tiny_checkpoint: Path) -> None:
    """`--init scratch` ignores the checkpoint's weights: fixed sin-cos positions, fresh xavier weights."""
    from model import Checkpoint
    from model.mae import get_2d_sincos_pos_embed

    src = Checkpoint.load(tiny_checkpoint)
    args = finetune.build_parser().parse_args(["--checkpoint", str(tiny_checkpoint), "--init", "scratch"])
    torch.manual_seed(0)
    model = finetune._from_scratch(src.config, 10, args)
    pos = torch.from_numpy(get_2d_sincos_pos_embed(src.config.embed_dim, src.config.grid_size, cls_token=True))
    assert torch.allclose(model.pos_embed[0], pos.float())
    assert not torch.equal(model.blocks[0].attn.qkv.weight, src.model["blocks.0.attn.qkv.weight"])
    assert model.blocks[0].attn.qkv.weight.std() > 0.01 and model.head.weight.abs().max() < 1e-3


@needs_fmnist
def test_subset_from_scratch_resumes_between_evaluations(tiny_checkpoint: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A subset run from scratch, evaluated on held-out training images after its last epoch only, still
    checkpoints every epoch: stopped after the first, it resumes to the uninterrupted run's every step."""
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    base = ["--checkpoint", str(tiny_checkpoint), "--init", "scratch", "--subset-per-class", "3", "--val-size", "100",
            "--limit", "600", "--batch-size", "10", "--epochs", "2", "--eval-every", "5", "--log-every", "1",
            "--quiet", "--seed", "1"]
    finetune.cli([*base, "--output-dir", str(straight)])
    run_killed_after_first_epoch(finetune, [*base, "--output-dir", str(stopped)], monkeypatch)
    assert "finetune_top1" not in saved(stopped)["metrics"]  # epoch 1 was not evaluated, but saved
    finetune.cli([*base, "--output-dir", str(stopped), "--resume", "auto"])
    assert step_losses(stopped) == step_losses(straight)
    metrics = saved(stopped)["metrics"]
    assert metrics["train_images"] == 30 and metrics["steps"] == 6 and metrics["init"] == "scratch"
    assert metrics["eval_split"] == "val" and 0.0 <= metrics["finetune_top1"] <= 100.0
