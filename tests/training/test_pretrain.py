"""Pretraining: exact resume, torchrun DDP parity across ranks, and the CLI's handling of bad input."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from training_helpers import run_killed_after_first_epoch, step_losses

from model import Checkpoint, load_checkpoint
from training import pretrain
from training.data import FASHION_MNIST_DIR

REPO = Path(__file__).resolve().parents[2]
needs_fmnist = pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason="dataset-fashion-mnist not installed")
SMALL = ["--model", "mae_vit_test", "--limit", "64", "--batch-size", "16", "--warmup-epochs", "1",
         "--log-every", "1", "--no-preview", "--quiet", "--seed", "3"]


@needs_fmnist
def test_resume_gives_the_loss_of_an_uninterrupted_run(tmp_path, monkeypatch):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    pretrain.cli([*SMALL, "--epochs", "2", "--output-dir", str(straight)])

    # The same run, killed right after epoch 1's checkpoint, then resumed with --resume auto.
    run_killed_after_first_epoch(pretrain, [*SMALL, "--epochs", "2", "--output-dir", str(stopped)], monkeypatch)
    assert Checkpoint.load(stopped / "checkpoint-last.pth").epoch == 0
    pretrain.cli([*SMALL, "--epochs", "2", "--output-dir", str(stopped), "--resume", "auto"])

    straight_losses, resumed_losses = step_losses(straight), step_losses(stopped)
    assert len(straight_losses) == 8  # 64 images / batch 16 = 4 steps per epoch
    assert resumed_losses == straight_losses  # every step after the resume equals the uninterrupted run
    a, b = load_checkpoint(straight / "checkpoint-last.pth"), load_checkpoint(stopped / "checkpoint-last.pth")
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(v, w), k


@needs_fmnist
def test_init_from_starts_from_the_checkpoints_weights(tmp_path, capsys):
    pretrain.cli([*SMALL, "--epochs", "1", "--output-dir", str(tmp_path / "first")])
    source = tmp_path / "first" / "checkpoint-last.pth"
    # lr 0: AdamW moves nothing, so the continued run ends on exactly the weights it started from
    pretrain.cli([*SMALL, "--epochs", "1", "--lr", "0", "--output-dir", str(tmp_path / "continued"),
                  "--init-from", str(source)])
    pretrain.cli([*SMALL, "--epochs", "1", "--lr", "0", "--seed", "4", "--output-dir", str(tmp_path / "fresh")])
    first = Checkpoint.load(source).model
    continued = Checkpoint.load(tmp_path / "continued" / "checkpoint-last.pth")
    fresh = Checkpoint.load(tmp_path / "fresh" / "checkpoint-last.pth").model
    assert all(torch.equal(first[k], continued.model[k]) for k in first)
    assert not all(torch.equal(first[k], fresh[k]) for k in first)
    assert continued.args["init_from"] == str(source)
    assert continued.metrics["epochs"] == 2 and continued.metrics["epochs_this_run"] == 1  # 1 before + 1 here
    with pytest.raises(SystemExit) as e:  # another architecture
        pretrain.cli([*SMALL, "--model", "mae_vit_tiny_fmnist", "--epochs", "1", "--output-dir",
                      str(tmp_path / "other"), "--init-from", str(source)])
    assert e.value.code == 2 and "--init-from" in capsys.readouterr().err


@needs_fmnist
def test_loss_falls_and_checkpoint_and_preview_are_written(tmp_path):
    pretrain.cli(["--model", "mae_vit_test", "--limit", "512", "--batch-size", "64", "--epochs", "3",
                  "--warmup-epochs", "0.5", "--blr", "2e-3", "--log-every", "1", "--quiet",
                  "--output-dir", str(tmp_path)])
    losses = step_losses(tmp_path)
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.05
    from PIL import Image

    with Image.open(tmp_path / "preview-003.png") as preview:  # the server's panel: 8 rows of 4 pictures, 140 px
        assert preview.size == (60 + 4 * 140 + 3 * 4, 8 * 140 + 7 * 4)  # (+ 60 px for the ratio's label)
    raw = torch.load(tmp_path / "checkpoint-final.pth", weights_only=True)  # the official layout on disk
    assert set(raw) >= {"model", "optimizer", "epoch", "scaler", "args", "config"}
    ckpt = Checkpoint.load(tmp_path / "checkpoint-final.pth")
    assert ckpt.kind == "mae" and ckpt.data["dataset"] == "fashion-mnist" and len(ckpt.data["labels"]) == 10
    assert ckpt.args["epochs"] == 3 and ckpt.args["output_dir"] == str(tmp_path)  # numbers stay numbers


@needs_fmnist
def test_torchrun_two_ranks_end_with_identical_parameters(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "tests" / "training" / "ddp_worker.py"), str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0.keys() == r1.keys()
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
    start = torch.load(tmp_path / "rank0-start.pt", weights_only=True)
    assert any(not torch.equal(start[k], r0[k]) for k in r0)  # they trained, and stayed in step
    assert (tmp_path / "out" / "checkpoint-last.pth").is_file()


@pytest.mark.parametrize("argv, message", [
    (["--data-path", "/nonexistent"], "not found"),
    (["--mask-ratio", "1.0"], "--mask-ratio"),
    (["--resume", "/nonexistent.pth"], "no such checkpoint"),
])
def test_cli_bad_input_exits_2_with_a_message(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        pretrain.cli([*SMALL, "--epochs", "1", "--output-dir", str(tmp_path), *argv])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_config_file_gives_defaults_and_rejects_unknown_keys(tmp_path, capsys):
    good = tmp_path / "good.toml"
    good.write_text('model = "mae_vit_test"\nepochs = 7\n')
    args = pretrain.build_parser()
    from training.cli import parse_with_config
    ns = parse_with_config(args, ["--config", str(good), "--epochs", "2"])
    assert ns.model == "mae_vit_test" and ns.epochs == 2
    bad = tmp_path / "bad.toml"
    bad.write_text("epochz = 3\n")
    with pytest.raises(SystemExit) as e:
        pretrain.cli(["--config", str(bad)])
    assert e.value.code == 2 and "unknown key(s) epochz" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        pretrain.cli(["--config", str(tmp_path / "missing.toml")])
    assert "no such file" in capsys.readouterr().err


def test_repo_config_files_parse(capsys):
    from training.cli import parse_with_config
    from training.finetune import build_parser as finetune_parser
    from training.probe import build_parser as probe_parser
    parsers = {"pretrain": pretrain.build_parser, "probe": probe_parser, "finetune": finetune_parser}
    configs = sorted((REPO / "configs").glob("*.toml"))
    assert configs
    for path in configs:  # the probe and fine-tune files give the required --checkpoint themselves
        args = parse_with_config(parsers[path.stem.split("_")[0]](), ["--config", str(path)])
        assert isinstance(args.seed, int)  # every run is seeded


def test_imagefolder_pretraining_exports_with_its_own_normalization(tmp_path):
    """A grayscale model trained on an ImageFolder (mixed modes and sizes) records 1-channel statistics
    in its checkpoint, and mae-export writes them into a model directory that the service loads."""
    import numpy as np
    from PIL import Image

    from model_dir.schema import load_model_dir
    from training.export import export_model_dir

    rng = np.random.default_rng(0)
    for c, name in enumerate(["boots", "shirts"]):
        (tmp_path / "data" / "train" / name).mkdir(parents=True)
        for i in range(8):
            pixels = (rng.random((30 + 4 * i, 28, 3)) * 255 * (0.5 + c / 2)).astype(np.uint8)
            im = Image.fromarray(pixels)
            im.convert("L" if i % 2 else "RGB").save(tmp_path / "data" / "train" / name / f"{i}.{'png' if i % 2 else 'jpg'}")
    run = tmp_path / "run"
    pretrain.cli(["--model", "mae_vit_test", "--dataset", "imagefolder", "--data-path", str(tmp_path / "data"),
                  "--batch-size", "8", "--epochs", "1", "--no-preview", "--quiet", "--output-dir", str(run)])
    ckpt = Checkpoint.load(run / "checkpoint-final.pth")
    assert ckpt.data["labels"] == ["boots", "shirts"]
    assert (ckpt.data["mean"], ckpt.data["std"]) == ([0.5], [0.5])
    export_model_dir(run / "checkpoint-final.pth", tmp_path / "model", precisions=("fp32",), name="folder")
    prep = load_model_dir(tmp_path / "model").spec.preprocessing
    assert (prep.channels, list(prep.mean), list(prep.std)) == ("L", [0.5], [0.5])
