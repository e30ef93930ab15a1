"""Fixtures shared by the suites: a tiny random MAE with a probe head, as a checkpoint and as a model directory.

torch is imported inside the fixtures, so service tests that do not use them never load it.
"""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A probe checkpoint: random `mae_vit_test` MAE (norm_pix_loss) + random 10-class head on mean pooling."""
    import torch

    from model import Checkpoint, ClassifierRecord, MaskedAutoencoderViT, get_config, probe_head
    from model.stats import FASHION_MNIST_MEAN, FASHION_MNIST_STD
    from training.data import FASHION_MNIST_LABELS

    torch.manual_seed(0)
    config = get_config("mae_vit_test", norm_pix_loss=True)
    mae = MaskedAutoencoderViT(config)
    head = probe_head(config.embed_dim, len(FASHION_MNIST_LABELS))
    head[0].running_mean.normal_(0.0, 0.1)  # non-trivial statistics, so the graph must carry them
    head[0].running_var.uniform_(0.5, 2.0)
    head[1].bias.data.normal_(0.0, 0.1)  # probe_head starts it at zero, which the ONNX exporter may fold away
    path = tmp_path_factory.mktemp("tiny") / "checkpoint-probe.pth"
    Checkpoint(
        model=mae.state_dict(), config=config, kind="probe", epoch=1, args={"model": "mae_vit_test"},
        data={"dataset": "fashion-mnist", "mean": list(FASHION_MNIST_MEAN), "std": list(FASHION_MNIST_STD),
              "labels": list(FASHION_MNIST_LABELS)},
        metrics={"train_loss": 0.9, "epochs": 2, "probe_top1": 11.5},
        classifier=ClassifierRecord(head_type="probe", pooling="mean", num_classes=len(FASHION_MNIST_LABELS),
                                    labels=list(FASHION_MNIST_LABELS), metrics={"probe_top1": 11.5},
                                    state_dict=head.state_dict()),
    ).save(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`tiny_checkpoint` exported by mae-export: encoder, decoder, classifier in fp32, fp16 and int8."""
    import torch

    from training.export import export_model_dir

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small graphs: thread hand-offs cost more than they gain on a busy CPU
    try:
        return export_model_dir(tiny_checkpoint, tmp_path_factory.mktemp("exported") / "mae-test",
                                precisions=("fp32", "fp16", "int8"), name="mae-test", log=lambda _: None)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def logits_only_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`tiny_model_dir` as exporters before the classifier's `features` output wrote it: fp32 graphs, the
    classifier with logits only, no `classifier.features` in model.json, no weights file."""
    import json
    import shutil

    import onnx

    from model_dir.schema import sha256_file

    out = tmp_path_factory.mktemp("logits-only")
    spec = json.loads((tiny_model_dir / "model.json").read_text())
    spec["files"] = {g: {"fp32": by_precision["fp32"]} for g, by_precision in spec["files"].items()}
    spec["classifier"].pop("features")
    spec["weights"] = None
    spec["version"] = spec["files"]["encoder"]["fp32"]["sha256"][:12]  # as they named it
    for f in [*(by_precision["fp32"] for by_precision in spec["files"].values()), spec["self_check"]]:
        shutil.copy(tiny_model_dir / f["path"], out / f["path"])
    classifier = onnx.load(str(out / "classifier.onnx"))
    del classifier.graph.output[1]
    onnx.save(classifier, str(out / "classifier.onnx"))
    spec["files"]["classifier"]["fp32"].update(outputs=spec["files"]["classifier"]["fp32"]["outputs"][:1],
                                               sha256=sha256_file(out / "classifier.onnx"),
                                               bytes=(out / "classifier.onnx").stat().st_size)
    (out / "model.json").write_text(json.dumps(spec))
    return out
