"""Linear probe CLI: L-BFGS on frozen features, the feature cache written into a new folder and reused."""

from __future__ import annotations

import pytest

from model import Checkpoint
from training import pretrain, probe
from training.data import FASHION_MNIST_DIR

needs_fmnist = pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason="dataset-fashion-mnist not installed")


@needs_fmnist
def test_probe_writes_its_checkpoint_and_reuses_a_cache_in_a_new_folder(tmp_path):
    pretrain.cli(["--model", "mae_vit_test", "--limit", "64", "--batch-size", "16", "--epochs", "1",
                  "--no-preview", "--quiet", "--output-dir", str(tmp_path / "pretrain")])
    cache = tmp_path / "not" / "yet" / "features.pt"  # the folder does not exist before the probe
    argv = ["--checkpoint", str(tmp_path / "pretrain" / "checkpoint-last.pth"), "--optimizer", "lbfgs",
            "--pooling", "cls+mean", "--l2", "1e-3", "--limit", "200", "--feature-cache", str(cache), "--quiet"]
    probe.cli([*argv, "--output", str(tmp_path / "a" / "probe.pth")])
    assert cache.is_file()
    first = Checkpoint.load(tmp_path / "a" / "probe.pth")
    assert first.kind == "probe" and first.classifier.pooling == "cls+mean"
    assert 10.0 < first.metrics["probe_top1"] <= 100.0 and first.metrics["epochs"] == 1
    probe.cli([*argv, "--output", str(tmp_path / "b" / "probe.pth")])  # from the cache: the same fit
    assert Checkpoint.load(tmp_path / "b" / "probe.pth").metrics["probe_top1"] == first.metrics["probe_top1"]
