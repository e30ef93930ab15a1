"""The two engines behind one interface: torch agrees with ONNX Runtime on CPU within 1e-4, on the tiny model
(weights.safetensors from the exporter) and on the bundled one (weights recovered from its fp32 graphs)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from model_dir import self_check
from model_dir.schema import ModelDirError, load_model_dir
from service.engine import Engine, RuntimeConfigError
from service.engine_onnxruntime import OnnxRuntimeEngine
from service.server import open_engine
from service.settings import BUNDLED_MODEL_DIR, Settings

torch = pytest.importorskip("torch")

from service.engine_torch import TorchEngine, build_modules  # noqa: E402
from training.weights import PREFIXES, WEIGHTS_FILE, recover_weights  # noqa: E402

PARITY = 1e-4


def _cases(engine: Engine, rng: np.random.Generator) -> list[tuple[str, tuple[np.ndarray, ...]]]:
    """Every graph at batch 1 and 5, with the full image and with K = L // 4 and K = 1 visible patches."""
    a = engine.arch
    cases: list[tuple[str, tuple[np.ndarray, ...]]] = []
    for batch in (1, 5):
        pixels = rng.standard_normal((batch, a.in_chans, a.img_size, a.img_size)).astype(np.float32)
        order = np.stack([rng.permutation(a.num_patches) for _ in range(batch)]).astype(np.int64)
        for keep in (a.num_patches, a.num_patches // 4, 1):
            cases.append(("encoder", (pixels, order[:, :keep])))
        if engine.has("decoder"):
            latent = rng.standard_normal((batch, 1 + a.num_patches // 4, a.embed_dim)).astype(np.float32)
            cases.append(("decoder", (latent, np.argsort(order, axis=1).astype(np.int64))))
        if engine.has("classifier"):
            cases.append(("classifier", (pixels,)))
    return cases


def _assert_engines_agree(model_dir: Path) -> dict[str, float]:
    directory = load_model_dir(model_dir)
    ort_engine = OnnxRuntimeEngine(directory, device="cpu")
    torch_engine = TorchEngine(directory, device="cpu")
    assert {g for g in ("encoder", "decoder", "classifier") if ort_engine.has(g)} == set(torch_engine.graphs)
    worst: dict[str, float] = {}
    for graph, inputs in _cases(ort_engine, np.random.default_rng(0)):
        method = {"encoder": "encode", "decoder": "decode", "classifier": "classify"}[graph]
        expected, actual = getattr(ort_engine, method)(*inputs), getattr(torch_engine, method)(*inputs)
        pairs = {graph: (expected, actual)}
        if graph == "classifier":  # the logits, and the features where the graph has them
            pairs = {"classifier": (expected.logits, actual.logits),
                     "classifier.features": (expected.features, actual.features)}
            assert (expected.features is None) == (actual.features is None)
            if expected.features is None:
                del pairs["classifier.features"]
        for name, (e, a) in pairs.items():
            assert a.shape == e.shape and a.dtype == np.float32
            worst[name] = max(worst.get(name, 0.0), float(np.abs(a - e).max()))
    assert max(worst.values()) <= PARITY, worst
    return worst


def test_engines_agree_on_the_tiny_model(tiny_model_dir: Path) -> None:
    assert json.loads((tiny_model_dir / "model.json").read_text())["weights"]["path"] == WEIGHTS_FILE
    assert TorchEngine(load_model_dir(tiny_model_dir), device="cpu").weights == WEIGHTS_FILE
    assert "classifier.features" in _assert_engines_agree(tiny_model_dir)


def test_engines_agree_on_the_bundled_model() -> None:
    directory = load_model_dir(BUNDLED_MODEL_DIR)
    assert directory.spec.weights is None  # so the torch engine recovers them from the fp32 graphs
    assert "classifier.features" in _assert_engines_agree(BUNDLED_MODEL_DIR)


def test_recovered_weights_are_the_exported_ones(tiny_model_dir: Path) -> None:
    """Every tensor read back from the fp32 graphs equals the one the exporter wrote (cls_token and pos_embed
    come back as their sum and pos_embed[:, 1:], which compute the same tokens)."""
    from safetensors.torch import load_file

    directory = load_model_dir(tiny_model_dir)
    saved = load_file(str(tiny_model_dir / WEIGHTS_FILE))
    modules = build_modules(directory)
    for role, recovered in recover_weights(directory, modules).items():
        template = modules[role].state_dict()
        assert set(recovered) == set(template), set(template) ^ set(recovered)
        for key, value in recovered.items():
            want = saved[PREFIXES[role] + key]
            if key == "cls_token":
                want = want + saved[PREFIXES[role] + "pos_embed"][:, :1]
            elif key == "pos_embed":
                value, want = value[:, 1:], want[:, 1:]
            assert torch.equal(value, want), key


def test_the_encoder_only_directory_serves_on_torch(encoder_only_dir: Path) -> None:
    engine = TorchEngine(load_model_dir(encoder_only_dir), device="cpu")
    assert set(engine.graphs) == {"encoder"} and "recovered" in engine.weights
    assert engine.self_check["results"][0]["passed"]


def test_weights_are_hashed_like_every_file(tiny_model_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    data = bytearray((copy / WEIGHTS_FILE).read_bytes())
    data[-1] ^= 0xFF
    (copy / WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(ModelDirError, match="weights"):
        load_model_dir(copy)


def test_bf16_below_its_gate_falls_back_to_fp32_or_refuses(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    directory = load_model_dir(tiny_model_dir)
    engine = TorchEngine(directory, device="cpu", precision="bf16")
    cosine = engine.self_check["results"][0]["cosine"]
    assert cosine > 0.9  # bf16 autocast is close to fp32 ...
    monkeypatch.setitem(self_check.MIN_COSINE, "bf16", 1.01)  # ... but no gate above 1 can be met
    engine = TorchEngine(directory, device="cpu", precision="bf16")
    assert engine.precision("encoder") == "fp32" and engine.self_check["fell_back"]
    assert all(r["passed"] and r["precision"] == "fp32" for r in engine.self_check["results"])
    with pytest.raises(RuntimeConfigError, match="misses its gate"):
        TorchEngine(directory, device="cpu", precision="bf16", self_check_policy="refuse")


@pytest.mark.parametrize(("device", "precision", "message"), [
    ("tensorrt", "fp32", "ONNX Runtime provider"),
    ("cpu", "int8", "int8 graphs are ONNX Runtime's"),
    ("cpu", "fp16", "fp16"),
])
def test_torch_engine_refuses_what_it_cannot_run(tiny_model_dir: Path, device: str, precision: str,
                                                 message: str) -> None:
    with pytest.raises(RuntimeConfigError, match=message):
        TorchEngine(load_model_dir(tiny_model_dir), device=device, precision=precision)


def test_cuda_without_a_device_is_refused(tiny_model_dir: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this host has CUDA")
    with pytest.raises(RuntimeConfigError, match="sees no CUDA device"):
        TorchEngine(load_model_dir(tiny_model_dir), device="cuda")
    assert TorchEngine(load_model_dir(tiny_model_dir), device="auto").device == "cpu"


def test_open_engine_picks_by_setting_and_says_when_torch_is_missing(tiny_model_dir: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    directory = load_model_dir(tiny_model_dir)
    assert open_engine(directory, Settings(model_dir=tiny_model_dir)).describe()["engine"] == "onnxruntime"
    assert open_engine(directory, Settings(model_dir=tiny_model_dir, engine="torch")).describe()["engine"] == "torch"
    monkeypatch.setitem(sys.modules, "service.engine_torch", None)  # as an install without the torch extra
    with pytest.raises(RuntimeConfigError, match=r"needs the torch extra"):
        open_engine(directory, Settings(model_dir=tiny_model_dir, engine="torch"))


def test_onnxruntime_refuses_bf16(tiny_model_dir: Path) -> None:
    with pytest.raises(RuntimeConfigError, match="no bf16 variant of the encoder"):
        OnnxRuntimeEngine(load_model_dir(tiny_model_dir), device="cpu", precision="bf16")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_compiled_torch_engine_agrees_with_onnxruntime() -> None:
    """torch.compile (inductor; needs a C++ compiler on a CPU): the same outputs after warm-up, at new batch sizes too."""
    directory = load_model_dir(BUNDLED_MODEL_DIR)
    compiled, reference = TorchEngine(directory, device="cpu", compile=True), OnnxRuntimeEngine(directory, device="cpu")
    compiled.warm_up()
    assert compiled.describe()["compiled"] is True
    for batch in (3, 7):
        pixels = np.random.default_rng(batch).standard_normal((batch, 1, 28, 28)).astype(np.float32)
        ids = reference.all_patches(batch)
        assert np.abs(compiled.encode(pixels, ids) - reference.encode(pixels, ids)).max() <= PARITY
        got, expected = compiled.classify(pixels), reference.classify(pixels)
        assert np.abs(got.logits - expected.logits).max() <= PARITY
        assert np.abs(got.features - expected.features).max() <= PARITY
