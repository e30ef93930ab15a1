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
