"""The model directory proves itself at startup: every loaded variant against the stored torch outputs.

The degraded variant is made on purpose (its weight scales tripled, model.json's hash updated), so the
refusal does not depend on which CPU runs the suite.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from service_helpers import make_client, sample_png

from model_dir import self_check
from model_dir.schema import MODEL_JSON, load_model_dir, sha256_file
from service.app import create_app
from service.engine_onnxruntime import OnnxRuntimeEngine, RuntimeConfigError
from service.settings import Settings


def degrade_int8_encoder(model_dir: Path) -> None:
    """Triple every per-channel weight scale of encoder.int8.onnx and re-declare the file in model.json."""
    path = model_dir / "encoder.int8.onnx"
    model = onnx.load(path)
    scaled = 0
    for t in model.graph.initializer:
        if t.name.endswith("_scale") and t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 1:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * np.float32(3.0), t.name))
            scaled += 1
    assert scaled, "no per-channel weight scale found in the int8 encoder"
    onnx.save(model, path)
    spec = json.loads((model_dir / MODEL_JSON).read_text())
    entry = spec["files"]["encoder"]["int8"]
    entry.update(sha256=sha256_file(path), bytes=path.stat().st_size)
    (model_dir / MODEL_JSON).write_text(json.dumps(spec))


@pytest.fixture
def degraded_dir(tiny_model_dir: Path, tmp_path: Path) -> Path:
    out = Path(shutil.copytree(tiny_model_dir, tmp_path / "degraded"))
    degrade_int8_encoder(out)
    return out


def test_exported_variants_pass_their_self_check_here(tiny_model_dir: Path) -> None:
    with make_client(tiny_model_dir, precision="int8") as c:
        runtime = c.get("/info").json()["runtime"]
    check = runtime["self_check"]
    assert check["reference"] == "torch" and check["inputs"] == "real" and check["images"] == 8
    assert {(r["graph"], r["precision"]) for r in check["results"]} == {
        ("encoder", "int8"), ("encoder+decoder", "int8"), ("classifier", "int8"), ("classifier.features", "int8")}
    assert all(r["passed"] and r["cosine"] >= r["gate"] for r in check["results"]), check
    assert check["fell_back"] == [] and {g["precision"] for g in runtime["graphs"].values()} == {"int8"}
    assert check["cpu"]["model"] and isinstance(check["cpu"]["flags"], list)


def test_a_degraded_int8_graph_is_replaced_by_fp32_at_startup(degraded_dir: Path, caplog) -> None:
    with caplog.at_level(logging.ERROR, logger="service.engine_onnxruntime"), make_client(degraded_dir, precision="int8") as c:
        info = c.get("/info").json()["runtime"]
        assert c.post("/embed", files={"image": sample_png()}).status_code == 200
    assert info["graphs"]["encoder"]["precision"] == "fp32"
    assert info["graphs"]["decoder"]["precision"] == "int8" and info["graphs"]["classifier"]["precision"] == "int8"
    assert [f["graph"] for f in info["self_check"]["fell_back"]] == ["encoder"]
    assert info["self_check"]["fell_back"][0]["cosine"] < 0.999
    assert all(r["passed"] for r in info["self_check"]["results"])  # after the fallback
    line = next(r.getMessage() for r in caplog.records if "self-check" in r.getMessage())
    assert "encoder.int8.onnx fails its gate on this CPU" in line and "cosine" in line and "flags" in line
    assert "serving encoder.onnx (fp32) instead" in line


def test_a_features_check_that_fails_blames_the_classifier_graph(tiny_model_dir: Path) -> None:
    """The classifier's features are checked like its logits; below the gate, the int8 classifier is replaced."""
    runtime = OnnxRuntimeEngine(load_model_dir(tiny_model_dir), device="cpu", precision="int8")
    failed = self_check.CheckResult(graph=self_check.FEATURES, precision="int8", max_abs_diff=1.0, cosine=0.5,
                                    passed=False)
    assert runtime._culprit(failed) == "classifier"
    assert "classifier.int8.onnx fails its gate" in runtime._self_check_failure(failed, "classifier", "torch",
                                                                                self_check.cpu_features())


def test_a_degraded_int8_graph_stops_the_server_when_asked(degraded_dir: Path) -> None:
    with pytest.raises(RuntimeConfigError, match=r"encoder\.int8\.onnx fails its gate .*\(MAE_SELF_CHECK=refuse\)"):
        create_app(Settings(model_dir=degraded_dir, precision="int8", self_check="refuse"))


def test_a_tampered_self_check_file_is_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    from model_dir.schema import ModelDirError

    out = Path(shutil.copytree(tiny_model_dir, tmp_path / "tampered"))
    data = bytearray((out / "selfcheck.npz").read_bytes())
    data[-100] ^= 0xFF
    (out / "selfcheck.npz").write_bytes(bytes(data))
    with pytest.raises(ModelDirError, match=r"selfcheck\.npz: sha256 .*self-check"):
        create_app(Settings(model_dir=out))


def test_the_bundled_int8_variant_passes_its_self_check_here() -> None:
    from service.settings import BUNDLED_MODEL_DIR

    with make_client(BUNDLED_MODEL_DIR, precision="int8") as c:
        runtime = c.get("/info").json()["runtime"]
    check = runtime["self_check"]
    assert check["reference"] == "torch" and check["fell_back"] == []  # re-exported from its recovered weights
    assert {g["precision"] for g in runtime["graphs"].values()} == {"int8"}
    assert all(r["passed"] for r in check["results"]), check
