"""The torch engine's GPU path, on a CPU: the recovery check on the CPU before the move to CUDA, fp32 without TF32,
torch.compile at every batch bucket with no compilation inside a request, /embed pooled where the latent is, and a
device error's failover. CUDA is faked at its boundary (torch.cuda.is_available, Module.to, the engine's transfer),
so these check the path that would be taken on a GPU, not a GPU's arithmetic."""

from __future__ import annotations

import functools
import json
import shutil
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from model_dir.schema import ModelDir, load_model_dir
from service.engine import WARMUP_MASK_RATIO, DeviceFailed, RuntimeConfigError, pool_tokens
from service.masking import len_keep

torch = pytest.importorskip("torch")

import onnxruntime as ort  # noqa: E402
from torch import nn  # noqa: E402

from service.engine_torch import TorchEngine, check_compiler  # noqa: E402
from training.weights import WEIGHTS_FILE  # noqa: E402

CUDA_ERROR = "CUDA error: an illegal memory access was encountered"


@pytest.fixture(scope="module")
def recovered_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model without weights.safetensors (as the bundled one): the torch engine recovers its weights."""
    out = tmp_path_factory.mktemp("recovered") / "mae-test"
    shutil.copytree(tiny_model_dir, out, ignore=shutil.ignore_patterns(WEIGHTS_FILE))
    spec = json.loads((out / "model.json").read_text())
    spec["weights"] = None
    (out / "model.json").write_text(json.dumps(spec))
    return out


@pytest.fixture
def tf32_flags() -> Iterator[None]:
    """TF32 on (cuDNN's default) for the test, and the process's flags as they were afterwards."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _fake_cuda(monkeypatch: pytest.MonkeyPatch, events: list[tuple[str, str]]) -> None:
    """CUDA "available"; module moves and the engine's input transfers recorded as (what, device), left on the CPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    def move(module: nn.Module, *args: Any, **kwargs: Any) -> nn.Module:
        events.append(("module.to", str(torch.device(kwargs.get("device", args[0] if args else "cpu")))))
        return module

    def transfer(engine: TorchEngine, array: np.ndarray) -> Any:
        events.append(("input", str(engine.torch_device)))
        return torch.from_numpy(np.ascontiguousarray(array))

    monkeypatch.setattr(nn.Module, "to", move)
    monkeypatch.setattr(TorchEngine, "_to_device", transfer)


def test_recovered_weights_are_checked_on_the_cpu_before_the_move_to_cuda(
        recovered_dir: Path, monkeypatch: pytest.MonkeyPatch, tf32_flags: None) -> None:
    """The path a GPU takes: the recovery check (ONNX Runtime on the CPU against the modules) runs, even with
    MAE_SELF_CHECK=off, before any module moves to cuda, and the engine then serves fp32 without TF32."""
    events: list[tuple[str, str]] = []
    _fake_cuda(monkeypatch, events)
    session = ort.InferenceSession
    monkeypatch.setattr(ort, "InferenceSession", lambda *a, **k: events.append(("check", "cpu")) or session(*a, **k))
    engine = TorchEngine(load_model_dir(recovered_dir), device="cuda", self_check_policy="off")
    assert engine.device == "cuda" and "recovered" in engine.weights
    checks = [i for i, e in enumerate(events) if e[0] == "check"]
    moves = [i for i, e in enumerate(events) if e == ("module.to", "cuda")]
    assert len(checks) == 3 and len(moves) == 2, events  # encoder, decoder, classifier; autoencoder, classifier
    assert max(checks) < min(moves) and ("input", "cuda") not in events, events
    assert torch.backends.cuda.matmul.allow_tf32 is False and torch.backends.cudnn.allow_tf32 is False
    engine.encode(np.zeros((1, 1, 28, 28), np.float32), engine.all_patches(1))
    assert events[-2:] == [("input", "cuda")] * 2  # a call's inputs go to the device


@pytest.mark.parametrize(("device", "language", "variable"), [("cpu", "C\\+\\+", "CXX"), ("cuda", "C", "CC")])
def test_compile_is_refused_at_startup_without_a_compiler(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                                          device: str, language: str, variable: str) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: device == "cuda")
    monkeypatch.setattr(shutil, "which", lambda name: None)
    for name in ("CC", "CXX"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(RuntimeConfigError, match=rf"needs a {language} compiler .*apt-get install"):
        TorchEngine(load_model_dir(tiny_model_dir), device=device, compile=True)
    monkeypatch.setenv(variable, "/usr/bin/cc")
    check_compiler(device)  # a compiler named by the environment will do


def test_embed_pools_on_the_device_as_the_host_does(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Engine.embed's host pooling of the whole latent, computed where the latent is; only [B, 2, D] is copied to
    the host (Tensor.cpu, the device-to-host copy on a GPU, is watched)."""
    runs: list[tuple[str, int, int]] = []
    engine = TorchEngine(load_model_dir(tiny_model_dir), device="cpu", self_check_policy="off",
                         on_run=lambda graph, batch, seconds, nbytes: runs.append((graph, batch, nbytes)))
    pixels = np.random.default_rng(0).standard_normal((3, 1, 28, 28)).astype(np.float32)
    copies, cpu = [], torch.Tensor.cpu
    with monkeypatch.context() as watch:
        watch.setattr(torch.Tensor, "cpu", lambda t, *a, **k: copies.append(tuple(t.shape)) or cpu(t, *a, **k))
        tokens = engine.embed(pixels)
    assert copies == [(3, 2, engine.arch.embed_dim)]
    expected = pool_tokens(engine.encode(pixels, engine.all_patches(3)))
    assert tokens.shape == expected.shape == (3, 2, engine.arch.embed_dim) and tokens.dtype == np.float32
    assert np.abs(tokens - expected).max() <= 1e-6
    assert runs[0] == ("encoder", 3, tokens.nbytes)


def _inputs(directory: ModelDir, batch: int, keep: int, seed: int) -> dict[str, tuple[np.ndarray, ...]]:
    """Inputs of every graph at this batch size, the encoder and decoder at K = keep (and the full image)."""
    a, rng = directory.spec.architecture, np.random.default_rng(seed)
    pixels = rng.standard_normal((batch, a.in_chans, a.img_size, a.img_size)).astype(np.float32)
    order = np.stack([rng.permutation(a.num_patches) for _ in range(batch)]).astype(np.int64)
    latent = rng.standard_normal((batch, 1 + keep, a.embed_dim)).astype(np.float32)
    return {"embed": (pixels,), "encode": (pixels, np.sort(order[:, :keep], axis=1)),
            "decode": (latent, np.argsort(order, axis=1)), "classify": (pixels,)}


def _outputs(engine: TorchEngine, method: str, inputs: tuple[np.ndarray, ...]) -> list[np.ndarray]:
    out = getattr(engine, method)(*inputs)
    return [out.logits, out.features] if method == "classify" else [out]


def _compilations() -> tuple[int, int]:
    """Dynamo's counts of frames it set out to compile and of graphs it compiled."""
    from torch._dynamo.utils import counters

    return counters["frames"]["total"], counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("backend", [
    "counting",  # dynamo's caching and guards, which decide what compiles when, with the FX graphs run as they are
    pytest.param("inductor", marks=[pytest.mark.slow, pytest.mark.timeout(900), pytest.mark.skipif(
        not (shutil.which("g++") or shutil.which("cc")), reason="Inductor's CPU kernels need a C++ compiler")]),
])
def test_compiled_buckets_are_warmed_up_and_requests_never_compile(
        tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, backend: str) -> None:
    """The path the server takes on a GPU as on a CPU: warm-up compiles every graph at every bucket of max_batch;
    then batches of every size 1..max_batch from two threads at once (padded up to their bucket), and a
    reconstruct at another K (eager), compile nothing and give the eager outputs."""
    compiled_runs: list[int] = []
    if backend == "counting":
        def counting(graph: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
            def run(*args: Any) -> Any:
                compiled_runs.append(1)
                return graph.forward(*args)
            return run

        monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=counting))
        monkeypatch.setenv("CXX", "unused-by-this-backend")
    # dynamo caches compiled frames per code object across engines: an earlier test's engine at the same shapes
    # would be reused here and the counts below would be smaller
    torch._dynamo.reset()
    directory = load_model_dir(tiny_model_dir)
    eager = TorchEngine(directory, device="cpu", self_check_policy="off")
    compiled = TorchEngine(directory, device="cpu", self_check_policy="off", compile=True, max_batch=4)
    before = _compilations()
    compiled.warm_up()
    assert compiled.describe()["compiled_batch_sizes"] == [1, 2, 4]
    assert len(compiled.compiled_shapes) == 3 * 4  # encoder at two K, decoder, classifier
    assert _compilations()[1] - before[1] == 3 * 4  # each one graph: no graph breaks

    warm_keep, other_keep = len_keep(directory.spec.architecture.num_patches, WARMUP_MASK_RATIO), 5
    assert warm_keep != other_keep
    cases = [(method, inputs) for batch in range(1, 5) for keep in (warm_keep, other_keep)
             for method, inputs in _inputs(directory, batch, keep, seed=batch).items()]
    expected = [_outputs(eager, method, inputs) for method, inputs in cases]
    start, warmed, runs_warmed = threading.Barrier(2), _compilations(), len(compiled_runs)

    def serve(_: int) -> list[list[np.ndarray]]:
        start.wait()
        return [_outputs(compiled, method, inputs) for method, inputs in cases]

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(serve, range(2)))
    assert _compilations() == warmed
    if backend == "counting":  # per batch size and thread: 4 calls at the warm-up K, embed and classify at the other
        assert len(compiled_runs) - runs_warmed == 2 * 4 * (4 + 2)
    for got in results:
        for (method, inputs), want, have in zip(cases, expected, got, strict=True):
            for w, h in zip(want, have, strict=True):
                assert h.shape == w.shape and np.abs(h - w).max() <= 1e-5, (method, [i.shape for i in inputs])


@pytest.fixture
def failing_engine(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A CPU engine that passes for a CUDA one (device "cuda"), whose encoder raises `error` once; returns
    (engine, the observer's calls)."""

    def make(failover: str, error: Exception) -> tuple[TorchEngine, list[tuple[str, str]]]:
        engine = TorchEngine(load_model_dir(tiny_model_dir), device="cpu", self_check_policy="off", failover=failover)
        heard: list[tuple[str, str]] = []
        engine.on_device_failure = lambda device, reason: heard.append((device, reason))
        encoder, raised = engine.graphs["encoder"], []

        def fail_once(*tensors: Any) -> Any:
            if not raised:
                raised.append(error)
                raise error
            return encoder(*tensors)

        monkeypatch.setitem(engine.graphs, "encoder", fail_once)
        engine.device = "cuda"
        return engine, heard

    return make


def _pixels() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((2, 1, 28, 28)).astype(np.float32)


def test_a_device_error_without_failover_reports_the_device_failed(failing_engine: Any) -> None:
    """The path a CUDA error after warm-up takes with MAE_DEVICE_FAILOVER=unready."""
    engine, heard = failing_engine("unready", RuntimeError(CUDA_ERROR))
    pixels = _pixels()
    with pytest.raises(DeviceFailed, match="illegal memory access"):
        engine.encode(pixels, engine.all_patches(2))
    assert engine.device_failure.startswith("cuda failed after start-up: RuntimeError: CUDA error")
    assert heard == [("cuda", f"RuntimeError: {CUDA_ERROR}")]


def test_a_device_error_with_failover_moves_to_the_cpu_and_runs_again(tiny_model_dir: Path,
                                                                       failing_engine: Any) -> None:
    """The path a CUDA error after warm-up takes with MAE_DEVICE_FAILOVER=cpu: the same call, answered on the CPU."""
    pixels = _pixels()
    reference = TorchEngine(load_model_dir(tiny_model_dir), device="cpu", self_check_policy="off")
    for method in ("encode", "embed"):
        engine, heard = failing_engine("cpu", torch.AcceleratorError(CUDA_ERROR))
        args = (pixels, engine.all_patches(2)) if method == "encode" else (pixels,)
        expected = getattr(reference, method)(*args)
        assert np.abs(getattr(engine, method)(*args) - expected).max() <= 1e-6
        assert engine.describe()["device"] == "cpu" and engine.device_failure is None
        assert engine.precision("encoder") == "fp32" and [d for d, _ in heard] == ["cuda"]


def test_an_input_error_is_no_device_failure(failing_engine: Any) -> None:
    engine, heard = failing_engine("cpu", RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)"))
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        engine.encode(_pixels(), engine.all_patches(2))
    assert engine.device == "cuda" and engine.device_failure is None and not heard
