"""The Checkpoint type: the official layout on disk, files written before it still load, clear refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model import (
    Checkpoint,
    CheckpointError,
    ClassifierRecord,
    MaskedAutoencoderViT,
    ViTClassifier,
    get_config,
    probe_head,
)

CONFIG = get_config("mae_vit_test")


def test_saved_file_has_the_official_layout_and_loads_back(tmp_path: Path) -> None:
    torch.manual_seed(0)
    mae, head = MaskedAutoencoderViT(CONFIG), probe_head(CONFIG.embed_dim, 3)
    ckpt = Checkpoint(model=mae.state_dict(), config=CONFIG, kind="probe", epoch=4, args={"epochs": 5},
                      data={"dataset": "x", "labels": ["a", "b", "c"]},
                      classifier=ClassifierRecord(head_type="probe", pooling="cls", num_classes=3,
                                                  labels=["a", "b", "c"], state_dict=head.state_dict()))
    ckpt.save(tmp_path / "c.pth")
    raw = torch.load(tmp_path / "c.pth", weights_only=True)
    assert {"model", "optimizer", "epoch", "scaler", "args", "config", "kind", "classifier"} <= set(raw)
    assert raw["config"] == CONFIG.to_dict() and raw["classifier"]["state_dict"].keys() == head.state_dict().keys()
    back = Checkpoint.load(tmp_path / "c.pth")
    assert back.config == CONFIG and back.epoch == 4 and back.classifier.labels == ["a", "b", "c"]
    classifier = back.classifier_model()
    assert isinstance(classifier, ViTClassifier) and classifier.labels == ["a", "b", "c"]
    imgs = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(classifier(imgs), head.eval()(mae.eval().forward_features(imgs, "cls")))


def test_a_file_in_the_earlier_hand_written_layout_loads(tmp_path: Path) -> None:
    """As fine-tuning wrote it before the type existed: `args` as strings, the classifier entry by hand."""
    model = ViTClassifier(CONFIG, num_classes=2)
    torch.save({"model": model.state_dict(), "optimizer": None, "epoch": 0, "scaler": None,
                "args": {"epochs": "1", "output_dir": "runs/x"}, "config": CONFIG.to_dict(), "kind": "finetune",
                "data": {}, "metrics": {"finetune_top1": 50.0},
                "classifier": {"head_type": "finetune", "pooling": "mean", "num_classes": 2, "labels": ["n", "y"],
                               "metrics": {"finetune_top1": 50.0}}}, tmp_path / "old.pth")
    ckpt = Checkpoint.load(tmp_path / "old.pth")
    assert ckpt.kind == "finetune" and ckpt.classifier_model().labels == ["n", "y"]
    with pytest.raises(CheckpointError, match="no autoencoder"):
        ckpt.autoencoder()


@pytest.mark.parametrize(("content", "problem"), [
    ({"model": {}}, r"needs 'model' and 'config'"),
    ({"model": {}, "config": CONFIG.to_dict(), "kind": "teacher"}, r"unknown checkpoint kind 'teacher'"),
    ({"model": {}, "config": {**CONFIG.to_dict(), "depth_multiplier": 2}}, r"unknown MAEConfig keys"),
    ({"model": {}, "config": CONFIG.to_dict(), "classifier": {"head_type": "probe"}}, r"missing .* arguments"),
])
def test_refusals_name_the_file_and_the_problem(tmp_path: Path, content: dict, problem: str) -> None:
    torch.save(content, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=r"bad\.pth: .*" + problem):
        Checkpoint.load(tmp_path / "bad.pth")


def test_unreadable_and_missing_files(tmp_path: Path) -> None:
    (tmp_path / "notes.pth").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        Checkpoint.load(tmp_path / "notes.pth")
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        Checkpoint.load(tmp_path / "absent.pth")
