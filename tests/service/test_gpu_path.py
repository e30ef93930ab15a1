"""The ONNX Runtime engine's GPU path, on a CPU: what a CUDA (or TensorRT) session is asked for, and what the
engine and server do with one.

No GPU is reachable here, so `FakeGpuSession` stands at that boundary: a real CPU session that reports the
providers it was asked for and maps device memory bindings onto the host. Everything above it (provider
options, fallback, IO binding, pooling, warm-up, failure handling, GPU defaults, /info, /metrics) is the real
code; these tests check the path a GPU would take, not a GPU's numerics.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from onnxruntime.capi.onnxruntime_pybind11_state import EPFail
from service_helpers import live_server, make_client, metric, sample_png

from model_dir import self_check
from model_dir.schema import load_model_dir
from service import engine_onnxruntime
from service.app import create_app
from service.batcher import Batcher
from service.engine import DeviceFailed, pool_tokens
from service.engine_onnxruntime import CPU, CUDA, TENSORRT, OnnxRuntimeEngine, trt_options
from service.settings import GPU_DEFAULTS, Settings

REAL_SESSION = ort.InferenceSession
EP_ERROR = "CUDA failure 700: an illegal memory access was encountered"


def _name(provider: Any) -> str:
    return provider[0] if isinstance(provider, tuple) else provider


class FakeBinding:
    """An IO binding whose device outputs land on the host (recorded by device)."""

    def __init__(self, session: FakeGpuSession):
        self.real, self.session = session.real.io_binding(), session

    def bind_output(self, name: str, device: str = "cpu") -> None:
        self.session.bound_to.append(device)
        self.real.bind_output(name, "cpu")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


class FakeGpuSession:
    """A CPU session that reports the GPU providers it was asked for; `fail` makes its next runs raise."""

    created: list[FakeGpuSession] = []
    fail: BaseException | None = None

    def __init__(self, path: str, sess_options: Any = None, providers: list[Any] | None = None):
        self.path, self.asked = path, list(providers or [CPU])
        self.real = REAL_SESSION(path, sess_options=sess_options, providers=[CPU])
        self.fallback, self.bound_to = True, []
        FakeGpuSession.created.append(self)

    def get_providers(self) -> list[str]:
        return [_name(p) for p in self.asked]

    def disable_fallback(self) -> None:
        self.fallback = False

    def _check(self) -> None:
        if FakeGpuSession.fail is not None and self.get_providers() != [CPU]:
            raise FakeGpuSession.fail

    def run(self, *args: Any, **kwargs: Any) -> Any:
        self._check()
        return self.real.run(*args, **kwargs)

    def io_binding(self) -> FakeBinding:
        return FakeBinding(self)

    def run_with_iobinding(self, binding: FakeBinding, *args: Any) -> None:
        self._check()
        self.real.run_with_iobinding(binding.real, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


@pytest.fixture
def fake_gpu(monkeypatch: pytest.MonkeyPatch) -> Iterator[type[FakeGpuSession]]:
    """onnxruntime-gpu on a machine with a GPU, as far as the engine can tell."""
    FakeGpuSession.created, FakeGpuSession.fail = [], None
    monkeypatch.setattr(ort, "InferenceSession", FakeGpuSession)
    monkeypatch.setattr(ort, "get_available_providers", lambda: [TENSORRT, CUDA, CPU])
    monkeypatch.setattr(engine_onnxruntime, "preload_cuda", lambda: [])
    monkeypatch.setattr(engine_onnxruntime, "gpu_name", lambda device_id=0: "NVIDIA H200")
    yield FakeGpuSession
    FakeGpuSession.fail = None


def _pixels(tiny_model_dir: Path, batch: int) -> np.ndarray:
    a = load_model_dir(tiny_model_dir).spec.architecture
    return np.random.default_rng(batch).standard_normal((batch, a.in_chans, a.img_size, a.img_size)).astype(np.float32)


def test_cuda_sessions_compute_fp32_without_tf32_and_never_move_to_the_cpu_silently(
        tiny_model_dir: Path, fake_gpu: type[FakeGpuSession]) -> None:
    """Finding 1 and 9: the CUDA provider's TF32 (on by default) is off, so fp32 holds the fp32 gate; ONNX Runtime's
    run-time fallback (an EP failure re-runs on the CPU and keeps the session there) is off on every GPU session."""
    engine = OnnxRuntimeEngine(load_model_dir(tiny_model_dir), device="cuda")
    graphs = [s for s in fake_gpu.created if s.path.endswith(".onnx") and "pool_tokens" not in s.path]
    assert {Path(s.path).name for s in graphs} >= {"encoder.onnx", "decoder.onnx", "classifier.onnx"}
    for session in graphs:
        assert (CUDA, {"use_tf32": "0"}) in session.asked, session.asked
        assert session.fallback is False, session.path
    assert engine.device == "cuda" and engine.describe()["embedding_pooled_on"] == "cuda"
    assert all(r["passed"] for r in engine.self_check["results"]) and engine.self_check["gpu"] == "NVIDIA H200"


def test_a_failed_self_check_on_a_gpu_names_the_gpu_not_the_cpu(tiny_model_dir: Path,
                                                                fake_gpu: type[FakeGpuSession]) -> None:
    """Finding 1: the log line says which device computed the figure (it said "this CPU" on every device)."""
    engine = OnnxRuntimeEngine(load_model_dir(tiny_model_dir), device="cuda")
    failed = self_check.CheckResult(graph="encoder", precision="fp32", max_abs_diff=3e-3, cosine=0.99999,
                                    passed=False)
    message = engine._self_check_failure(failed, None, "torch", self_check.cpu_features())
    assert "on this GPU (NVIDIA H200; CUDAExecutionProvider)" in message and "this CPU" not in message, message


def test_tensorrt_fp32_is_checked_against_a_tf32_gate(tiny_model_dir: Path, fake_gpu: type[FakeGpuSession]) -> None:
    """Finding 1: TensorRT computes fp32 layers with TF32 tactics (no switch in ONNX Runtime): its fp32 sessions get
    the tf32 gate, which an error of TF32's size passes and the fp32 gate (max abs 1e-4) does not."""
    engine = OnnxRuntimeEngine(load_model_dir(tiny_model_dir), device="tensorrt", trt_cache_dir=None)
    assert engine.device == "tensorrt" and engine.checked_precision("encoder") == "tf32"
    arrays = self_check.load(tiny_model_dir / "selfcheck.npz")
    rng = np.random.default_rng(0)

    def tf32_like(name: str, feeds: dict[str, np.ndarray]) -> np.ndarray:  # 10-bit mantissa: ~5e-4 relative
        out = engine._run_loaded(name, feeds)
        return out * (1 + rng.uniform(-2**-11, 2**-11, out.shape)).astype(np.float32)

    check = self_check.check_encoder(arrays, "tf32", tf32_like)
    assert check.passed and check.max_abs_diff > self_check.FP32_MAX_ABS_DIFF, check
    assert not self_check.check_encoder(arrays, "fp32", tf32_like).passed


def test_tensorrt_gets_a_profile_over_every_batch_and_k_and_a_cache_outside_the_working_directory(
        tiny_model_dir: Path, fake_gpu: type[FakeGpuSession], tmp_path: Path) -> None:
    """Finding 6: an explicit optimization profile from batch 1 to max_batch and K 1 to L (no engine rebuilt inside
    a request for a new shape), engine and timing caches in the configured folder."""
    model_dir = load_model_dir(tiny_model_dir)
    a = model_dir.spec.architecture
    options = trt_options(model_dir.file("encoder", "fp16"), "fp16", 64, a.num_patches, tmp_path)
    image = f"{a.in_chans}x{a.img_size}x{a.img_size}"
    assert options["trt_profile_min_shapes"] == f"pixels:1x{image},ids_keep:1x1"
    assert options["trt_profile_opt_shapes"] == f"pixels:64x{image},ids_keep:64x{a.num_patches}"
    assert options["trt_profile_max_shapes"] == f"pixels:64x{image},ids_keep:64x{a.num_patches}"
    assert options["trt_fp16_enable"] and options["trt_engine_cache_path"] == str(tmp_path)
    assert options["trt_timing_cache_path"] == str(tmp_path)
    decoder = trt_options(model_dir.file("decoder"), "fp32", 8, a.num_patches, None)
    assert decoder["trt_profile_min_shapes"].startswith("latent:1x2x") and "trt_engine_cache_path" not in decoder
    assert decoder["trt_profile_max_shapes"].startswith(f"latent:8x{1 + a.num_patches}x")

    engine = OnnxRuntimeEngine(model_dir, device="tensorrt", max_batch=8, trt_cache_dir=tmp_path / "trt")
    encoder = next(s for s in fake_gpu.created if Path(s.path).name == "encoder.onnx")
    trt = dict(p for p in encoder.asked if isinstance(p, tuple))[TENSORRT]
    assert trt["trt_engine_cache_path"] == str(tmp_path / "trt") and (tmp_path / "trt").is_dir()
    assert engine.describe()["trt_cache_dir"] == str(tmp_path / "trt")
    assert Settings().trt_cache_dir.expanduser().is_relative_to(Path.home())


def test_embed_on_a_gpu_pools_on_the_device_and_copies_back_the_pooled_tokens_only(
        tiny_model_dir: Path, fake_gpu: type[FakeGpuSession]) -> None:
    """Finding 4: the latent stays bound to device memory and the pooling graph runs there; what comes back is
    [B, 2, D] (the bytes the observer counts), equal to the host pooling of the latent."""
    copied: list[tuple[str, int, int]] = []
    engine = OnnxRuntimeEngine(load_model_dir(tiny_model_dir), device="cuda",
                               on_run=lambda graph, batch, seconds, nbytes: copied.append((graph, batch, nbytes)))
    pixels = _pixels(tiny_model_dir, 5)
    tokens = engine.embed(pixels)
    encoder = next(s for s in fake_gpu.created if Path(s.path).name == "encoder.onnx")
    assert encoder.bound_to == ["cuda"]  # the latent's binding
    d = engine.arch.embed_dim
    assert tokens.shape == (5, 2, d) and copied == [("encoder", 5, 5 * 2 * d * 4)]
    host = pool_tokens(engine.encode(pixels, engine.all_patches(5)))
    np.testing.assert_allclose(tokens, host, atol=1e-6)
    assert copied[-1][2] == 5 * (1 + engine.arch.num_patches) * d * 4  # the latent, had it come back


def test_the_shipped_pooling_graph_is_what_its_generator_writes() -> None:
    import onnx

    from training.pool_graph import OUT, build

    assert OUT == engine_onnxruntime.POOL_GRAPH
    assert onnx.load(str(OUT)).graph == build().graph


def test_on_a_gpu_warm_up_runs_every_batch_size_the_batcher_sends(tiny_model_dir: Path,
                                                                  fake_gpu: type[FakeGpuSession]) -> None:
    """Finding 6 and 7: cuDNN picks a convolution per input shape and TensorRT loads its profile at the first call
    of a shape: warm-up makes those calls, so no request does."""
    sizes: dict[str, set[int]] = {}
    engine = OnnxRuntimeEngine(load_model_dir(tiny_model_dir), device="cuda", max_batch=6,
                               on_run=lambda graph, batch, *_: sizes.setdefault(graph, set()).add(batch))
    sizes.clear()
    engine.warm_up()
    assert sizes["encoder"] == set(range(1, 7)) and sizes["classifier"] == set(range(1, 7))


def test_gpu_defaults_apply_to_settings_not_given_and_are_reported(tiny_model_dir: Path,
                                                                   fake_gpu: type[FakeGpuSession]) -> None:
    """Finding 7: on a GPU, bigger full batches, a longer queue, more decode threads; an explicit setting stays;
    /info says which the device chose."""
    assert Settings().for_device("cpu") == Settings()
    gpu = Settings(max_queue=100).for_device("cuda")
    assert gpu.max_batch_size == GPU_DEFAULTS["max_batch_size"] and gpu.share_idle_slots is False
    assert gpu.max_queue == 100 and gpu.decode_threads >= 2
    with make_client(tiny_model_dir, device="cuda", max_batch_size=8) as client:
        batching = client.get("/info").json()["batching"]
    assert batching["max_batch_size"] == 8 and batching["share_idle_slots"] is False
    assert "max_batch_size" not in batching["device_defaults"] and "share_idle_slots" in batching["device_defaults"]
    with make_client(tiny_model_dir, device="cpu") as client:
        assert client.get("/info").json()["batching"]["device_defaults"] == []


def test_without_idle_slot_sharing_a_batch_fills_up() -> None:
    """Finding 7: the CPU's half batches for idle inference threads are off on a GPU: 8 waiting images with two idle
    slots make one batch of 8, not two of 4."""
    import asyncio
    import time
    from concurrent.futures import ThreadPoolExecutor

    from service.batcher import BatchTiming

    async def batch_sizes(share: bool) -> list[int]:
        sizes: list[int] = []
        gate = asyncio.Event()
        batcher = Batcher(ThreadPoolExecutor(2), max_batch_size=8, max_delay_s=0.0, max_queue=64, concurrency=2,
                          share_idle_slots=share)
        queue = batcher.queue("q", lambda items, alone=False: sizes.append(len(items)) or list(items))

        async def request(value: int) -> list[int]:
            with queue.reserve(1) as r:
                await gate.wait()  # all eight submit in the same turn of the loop
                return await r.submit([value], time.monotonic() + 30, BatchTiming())

        tasks = [asyncio.create_task(request(i)) for i in range(8)]
        await asyncio.sleep(0)
        gate.set()
        assert [r[0] for r in await asyncio.gather(*tasks)] == list(range(8))
        await batcher.close()
        return sizes

    assert asyncio.run(batch_sizes(True)) == [4, 4]
    assert asyncio.run(batch_sizes(False)) == [8]


def _embed(url: str) -> httpx.Response:
    body = {"images": [base64.b64encode(sample_png()).decode()]}
    return httpx.post(f"{url}/embed", json=body, timeout=30)


def test_a_gpu_that_fails_after_start_up_makes_the_server_unready(tiny_model_dir: Path,
                                                                  fake_gpu: type[FakeGpuSession],
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    """Finding 9, MAE_DEVICE_FAILOVER=unready (the default): the failing batch's request gets a 503, readiness turns
    503 with the reason, the failure is logged and counted, later requests are refused without touching the
    device; liveness stays (the process is fine, the orchestrator replaces it by readiness)."""
    with live_server(create_app(Settings(model_dir=tiny_model_dir, device="cuda"))) as (url, _):
        assert _embed(url).status_code == 200
        fake_gpu.fail = EPFail(EP_ERROR)
        with caplog.at_level(logging.ERROR, logger="service.engine"):
            r = _embed(url)
        assert r.status_code == 503 and r.json()["error"]["type"] == "not_ready", r.text
        assert any("the cuda device failed" in m and EP_ERROR in m for m in caplog.messages), caplog.messages
        ready = httpx.get(f"{url}/health/ready")
        assert ready.status_code == 503 and EP_ERROR in ready.json()["error"]["message"]
        assert _embed(url).status_code == 503
        metrics = httpx.get(f"{url}/metrics").text
        assert metric(metrics, "mae_device_failures_total", device="cuda") == 1  # the refused one did not run
        assert httpx.get(f"{url}/health/live").status_code == 200
        assert httpx.get(f"{url}/info").json()["runtime"]["device_failure"].startswith("cuda failed")


def test_a_gpu_that_fails_with_failover_moves_to_the_cpu_and_keeps_serving(tiny_model_dir: Path,
                                                                           fake_gpu: type[FakeGpuSession]) -> None:
    """Finding 9, MAE_DEVICE_FAILOVER=cpu: the failing batch runs again on the CPU (its request gets its answer),
    the server stays ready, the metrics' device label and /info say cpu."""
    with live_server(create_app(Settings(model_dir=tiny_model_dir, device="cuda", device_failover="cpu"))) as (url, _):
        before = _embed(url)
        fake_gpu.fail = EPFail(EP_ERROR)
        after = _embed(url)
        assert after.status_code == 200, after.text
        np.testing.assert_allclose(after.json()["data"][0]["embedding"], before.json()["data"][0]["embedding"],
                                   atol=1e-5)
        assert httpx.get(f"{url}/health/ready").status_code == 200
        runtime = httpx.get(f"{url}/info").json()["runtime"]
        assert runtime["device"] == "cpu" and runtime["embedding_pooled_on"] == "host"
        metrics = httpx.get(f"{url}/metrics").text
        assert metric(metrics, "mae_device_failures_total", device="cuda") == 1
        assert 'device="cpu"' in next(line for line in metrics.splitlines() if line.startswith("mae_model_info{"))


def test_an_input_error_on_a_gpu_is_not_a_device_failure(tiny_model_dir: Path, fake_gpu: type[FakeGpuSession]) -> None:
    """Only device errors count: a run that fails for its inputs raises as it is and leaves the engine ready."""
    engine = OnnxRuntimeEngine(load_model_dir(tiny_model_dir), device="cuda")
    with pytest.raises(Exception) as raised:
        engine.encode(np.zeros((1, 3, 5, 5), dtype=np.float32), engine.all_patches(1))
    assert not isinstance(raised.value, DeviceFailed) and engine.device_failure is None
