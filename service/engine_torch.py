"""The torch engine: the model directory's graphs as the PyTorch MAE (`model/`), on CPU or CUDA.

Imported only when `MAE_ENGINE=torch` (the `torch` extra). Weights come from the directory's
`weights.safetensors` (hashed in model.json, checked at load) or, for a directory without it, are
recovered from the fp32 ONNX graphs and checked against those graphs' outputs: on the CPU in fp32,
before the modules move to the device, so that the check judges the recovery and not the device's
arithmetic. On CUDA, fp32 means fp32: TF32 is turned off for matmuls and for cuDNN's convolutions
(on by default; the patch embedding's TF32 convolution misses the 1e-4 fp32 gates); bf16 or fp16 run
under autocast, attention through SDPA (the model's own kernel). The stored self-check runs on this
engine as on ONNX Runtime. /embed pools the latent on the device and copies back [B, 2, D].

`torch_compile`: warm-up compiles every graph at every batch bucket (the powers of two below
`max_batch`, and `max_batch`; the encoder at the full image's K and at the warm-up mask ratio's) and
a request's batch is padded up to its bucket. Compiled code runs under one lock (dynamo's compiled
functions are not thread-safe, and one GPU runs one stream anyway; transfers stay outside the lock) in
the stance that never compiles; a shape not compiled at warm-up (another K, a larger batch) runs
eager. Inductor builds its CPU kernels with a C++ compiler and Triton its CUDA launchers with a C
compiler: without one the engine refuses to compile.

A device error under a call (CUDA) goes through `Engine.device_failed`; failover "cpu" moves every
module to the CPU in fp32 and runs the call again there.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np
import onnxruntime as ort
import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from model.mae import pool_latent
from model_dir import self_check
from model_dir.schema import ModelDir
from service.engine import ClassifierOutputs, Engine, RunObserver, RuntimeConfigError, is_device_error
from training.weights import build_modules, recover_weights, split_weights

log = logging.getLogger("service.engine_torch")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
RECOVERY_MAX_ABS_DIFF = self_check.FP32_MAX_ABS_DIFF  # recovered weights against their own fp32 graph
# What torch.compile's kernels are built with, per device, looked up as Inductor (CPU: $CXX, else g++) and Triton
# (CUDA: $CC, else gcc, else clang) look it up: (language, variable, names on PATH, the Debian packages to install)
COMPILERS = {"cpu": ("C++", "CXX", ("g++",), "g++"), "cuda": ("C", "CC", ("gcc", "clang"), "gcc libc6-dev")}

ShapeKey = tuple[str, tuple[tuple[int, ...], ...]]  # a graph and its input shapes
T = TypeVar("T")


def _device(requested: str) -> torch.device:
    if requested == "tensorrt":
        raise RuntimeConfigError("device tensorrt is an ONNX Runtime provider; the torch engine runs on cpu or cuda")
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeConfigError(f"device cuda: torch {torch.__version__} sees no CUDA device "
                                 f"(built for CUDA {torch.version.cuda})")
    return torch.device("cuda" if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()) else "cpu")


def check_compiler(device: str) -> None:
    """Refuse torch.compile at startup, not at warm-up, where no compiler for its kernels is found."""
    language, variable, names, packages = COMPILERS[device]
    if os.environ.get(variable) or any(shutil.which(name) for name in names):
        return
    raise RuntimeConfigError(f"MAE_TORCH_COMPILE on {device} needs a {language} compiler for the compiled kernels "
                             f"(${variable}, or {' or '.join(names)} on PATH) and none is found: install one "
                             f"(Debian: apt-get install {packages}) or turn MAE_TORCH_COMPILE off")


def batch_buckets(max_batch: int) -> tuple[int, ...]:
    """The batch sizes compiled at warm-up: the powers of two below max_batch, and max_batch."""
    return (*(1 << i for i in range(max_batch.bit_length()) if 1 << i < max_batch), max_batch)


def _pad(array: np.ndarray, batch: int) -> np.ndarray:
    """The array with its last row repeated up to `batch` rows: valid inputs, whose outputs are dropped."""
    return np.pad(array, [(0, batch - len(array))] + [(0, 0)] * (array.ndim - 1), mode="edge")


def _c_order(array: np.ndarray) -> np.ndarray:
    """The array in C order with a fresh array's strides: numpy calls a batch-1 slice of a wider array C-contiguous
    and keeps its strides, which torch and the device copy keep too, and compiled code is guarded on strides."""
    array = np.ascontiguousarray(array)
    strides = tuple(int(s) for s in np.cumprod([array.itemsize, *array.shape[:0:-1]])[::-1])
    return array if array.strides == strides else np.lib.stride_tricks.as_strided(array, strides=strides)


def _shape_key(graph: str, shapes: Sequence[Sequence[int]]) -> ShapeKey:
    return graph, tuple(tuple(shape) for shape in shapes)


def _outputs(out: Tensor | tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """A call's outputs as a tuple (the classifier's: logits, features)."""
    return out if isinstance(out, tuple) else (out,)


def graph_calls(model_dir: ModelDir, modules: Mapping[str, nn.Module]) -> dict[str, Callable[..., Any]]:
    """The module method that computes each of the directory's graphs, with the graph's inputs and outputs."""
    mae = modules["autoencoder"]
    calls: dict[str, Callable[..., Any]] = {"encoder": mae.forward_encoder}
    if model_dir.has("decoder"):
        calls["decoder"] = mae.forward_decoder
    if "classifier" in modules:
        calls["classifier"] = modules["classifier"].forward_with_features
    return calls


def check_recovered(model_dir: ModelDir, calls: Mapping[str, Callable[..., Any]]) -> None:
    """Recovered weights against the fp32 graphs they came from (ONNX Runtime's CPU provider), the modules computing
    on the CPU in fp32: a check of the recovery alone, which no device arithmetic (TF32) can fail."""
    a = model_dir.spec.architecture
    rng = np.random.default_rng(0)
    pixels = rng.standard_normal((2, a.in_chans, a.img_size, a.img_size)).astype(np.float32)
    ids = np.stack([rng.permutation(a.num_patches) for _ in range(2)]).astype(np.int64)
    keep = max(1, a.num_patches // 4)
    feeds = {"encoder": {"pixels": pixels, "ids_keep": np.sort(ids[:, :keep], axis=1)},
             "classifier": {"pixels": pixels}}

    def run(graph: str) -> list[np.ndarray]:
        with torch.inference_mode():
            return [t.numpy() for t in _outputs(calls[graph](*map(torch.from_numpy, feeds[graph].values())))]

    if "decoder" in calls:
        feeds["decoder"] = {"latent": run("encoder")[0], "ids_restore": np.argsort(ids, axis=1).astype(np.int64)}
    for graph in calls:
        session = ort.InferenceSession(str(model_dir.path(graph)), providers=["CPUExecutionProvider"])
        diff = max(float(np.abs(expected - actual).max()) for expected, actual in zip(
            session.run(None, feeds[graph]), run(graph), strict=False))  # every output the graph has
        if diff > RECOVERY_MAX_ABS_DIFF:
            raise RuntimeConfigError(f"{model_dir.path(graph)}: the weights recovered from it give outputs "
                                     f"{diff:.2e} away from the graph's (limit {RECOVERY_MAX_ABS_DIFF})")


def load_weights(model_dir: ModelDir, modules: Mapping[str, nn.Module]) -> str:
    """Load every module's weights (strict); returns where they came from. Recovered weights are checked
    (check_recovered), so the modules must still be on the CPU, in eval mode."""
    if model_dir.spec.weights is not None:
        tensors = load_file(str(model_dir.root / model_dir.spec.weights.path))
        for role, module in modules.items():
            module.load_state_dict(split_weights(tensors, role), strict=True)
        return model_dir.spec.weights.path
    for role, state in recover_weights(model_dir, modules).items():
        modules[role].load_state_dict(state, strict=True)
    check_recovered(model_dir, graph_calls(model_dir, modules))
    return "recovered from the fp32 ONNX graphs"


class TorchEngine(Engine):
    """The PyTorch MAE and classifier in eval mode, called with the graphs' inputs and outputs.

    `max_batch`: the largest batch the batcher sends (settings.max_batch_size), whose buckets warm-up compiles."""

    name = "torch"

    def __init__(self, model_dir: ModelDir, *, device: str = "auto", precision: str = "fp32", threads: int = 0,
                 compile: bool = False, on_run: RunObserver | None = None, self_check_policy: str = "fallback",
                 failover: str = "unready", max_batch: int = 32):
        super().__init__(model_dir, on_run, failover)
        self.torch_device = _device(device)
        self.device = self.torch_device.type
        if precision not in DTYPES or (precision == "fp16" and self.device == "cpu"):
            raise RuntimeConfigError(f"precision {precision}: the torch engine runs fp32, bf16 (autocast) and, on "
                                     "cuda, fp16 (int8 graphs are ONNX Runtime's)")
        if compile:
            check_compiler(self.device)
        self.dtype = DTYPES[precision]
        self.max_batch, self.threads = max_batch, threads
        if self.device == "cpu" and threads:
            torch.set_num_threads(threads)
        self.modules = {role: module.eval() for role, module in build_modules(model_dir).items()}
        self.weights = load_weights(model_dir, self.modules)
        if self.device == "cuda":  # fp32 in fp32 (the gates assume it); autocast's bf16/fp16 ops do not use TF32
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        for module in self.modules.values():
            module.to(self.torch_device)
        self.graphs = graph_calls(model_dir, self.modules)  # eager
        self.features = model_dir.spec.classifier_features_dim() is not None  # as the graph's outputs declare
        # dynamic=False: one static graph per bucket, not a dynamic one once a second batch size shows up. The startup
        # checks run eager (nothing is compiled before warm-up; compiling every checked shape takes minutes on a CPU).
        self.compiled = {g: torch.compile(f, dynamic=False) for g, f in self.graphs.items()} if compile else {}
        self.compiled_shapes: set[ShapeKey] = set()  # the shapes warm-up compiled, the only ones run compiled
        self.buckets: tuple[int, ...] = ()  # the batch sizes a batch is padded up to (set at warm-up)
        self._lock = threading.Lock()  # around every compiled call, and the failover
        self.self_check = self._self_check(self_check_policy)

    def has(self, graph: str) -> bool:
        return graph in self.graphs

    def precision(self, graph: str) -> str:
        return next(name for name, dtype in DTYPES.items() if dtype == self.dtype)

    @contextlib.contextmanager
    def _autocast(self) -> Iterator[None]:
        with torch.inference_mode(), torch.autocast(self.torch_device.type, dtype=self.dtype,
                                                    enabled=self.dtype != torch.float32):
            yield

    def _to_device(self, array: np.ndarray) -> Tensor:
        """A host array on the engine's device: every input goes through here."""
        return torch.from_numpy(_c_order(array)).to(self.torch_device, non_blocking=True)

    def _forward(self, graph: str, arrays: Sequence[np.ndarray]) -> tuple[Tensor, ...]:
        """The graph's outputs on the device: the compiled code when the batch padded up to its bucket has a shape
        that warm-up compiled (under the lock, in the stance that never compiles), else the eager modules."""
        batch = len(arrays[0])
        bucket = next((b for b in self.buckets if b >= batch), batch)
        if _shape_key(graph, [(bucket, *a.shape[1:]) for a in arrays]) not in self.compiled_shapes:
            return _outputs(self.graphs[graph](*map(self._to_device, arrays)))
        tensors = [self._to_device(_pad(a, bucket)) for a in arrays]
        with self._lock, torch.compiler.set_stance("eager_on_recompile"):
            out = _outputs(self.compiled[graph](*tensors))
        return tuple(t[:batch] for t in out)

    def _call(self, graph: str, arrays: Sequence[np.ndarray], pool: bool = False) -> list[np.ndarray]:
        """Every output of the call on the host, as the graph's outputs (the classifier: logits, features); `pool`:
        the encoder's latent pooled on the device first, [B, 2, D] (Engine.embed's cls token and patch mean)."""
        with self._autocast():
            out = self._forward(graph, arrays)
            if pool:
                out = (pool_latent(out[0].float(), "cls+mean").unflatten(-1, (2, -1)),)
            return [t.float().cpu().numpy() for t in out]

    def _guarded(self, call: Callable[[], T]) -> T:
        """The call; a device error goes through device_failed (DeviceFailed, or with failover "cpu" the modules
        move to the CPU and the call runs again). Other errors, and any error on the CPU, stay errors."""
        device = self.device
        try:
            return call()
        except Exception as error:
            with self._lock:
                if self.device == device:  # else another thread has failed over under this call: run it again
                    if device == "cpu" or not is_device_error(error) or not self.device_failed(error):
                        raise
                    self._move_to_cpu()
        return call()

    def _move_to_cpu(self) -> None:
        """Failover (under the lock): every module on the CPU in fp32, eager (the compiled code was the device's)."""
        for module in self.modules.values():
            module.to("cpu")
        failed = self.device
        self.torch_device, self.device, self.dtype = torch.device("cpu"), "cpu", torch.float32
        self.compiled, self.compiled_shapes = {}, set()
        if self.threads:
            torch.set_num_threads(self.threads)
        log.warning("serving on the CPU in fp32 from now on: the %s device failed (MAE_DEVICE_FAILOVER=cpu)", failed)

    def _run(self, graph: str, *arrays: np.ndarray, pool: bool = False) -> list[np.ndarray]:
        start = time.perf_counter()
        outputs = self._guarded(functools.partial(self._call, graph, arrays, pool))
        if self.on_run:
            self.on_run(graph, len(arrays[0]), time.perf_counter() - start, sum(o.nbytes for o in outputs))
        return outputs

    def encode(self, pixels: np.ndarray, ids_keep: np.ndarray, *, alone: bool = False) -> np.ndarray:
        return self._run("encoder", pixels, ids_keep)[0]

    def decode(self, latent: np.ndarray, ids_restore: np.ndarray, *, alone: bool = False) -> np.ndarray:
        return self._run("decoder", latent, ids_restore)[0]

    def classify(self, pixels: np.ndarray, *, alone: bool = False) -> ClassifierOutputs:
        logits, features = self._run("classifier", pixels)
        return ClassifierOutputs(logits, features if self.features else None)

    def embed(self, pixels: np.ndarray, *, alone: bool = False) -> np.ndarray:
        """The full-image latent pooled where it was computed: only the [B, 2, D] tokens come back to the host."""
        return self._run("encoder", pixels, self.all_patches(len(pixels)), pool=True)[0]

    def _compile(self, graph: str, arrays: Sequence[np.ndarray]) -> None:
        """Compile the graph for these inputs' shapes (warm-up), under the lock and autocast as every compiled call."""
        with self._autocast():
            tensors = [self._to_device(a) for a in arrays]
            with self._lock:
                if graph in self.compiled:  # not after a failover
                    self.compiled[graph](*tensors)
                    self.compiled_shapes.add(_shape_key(graph, [t.shape for t in tensors]))

    def warm_up(self) -> None:
        """Without torch_compile, Engine.warm_up. With it, every graph compiled at every bucket of max_batch, the
        encoder at the full image's K and the warm-up mask ratio's, the decoder after the latter: no request
        compiles."""
        if not self.compiled:
            return super().warm_up()
        start = time.perf_counter()
        self.buckets = batch_buckets(self.max_batch)
        # one static graph per bucket and K: more than dynamo's default limit per function (cache_size_limit: the
        # name every torch from 2.6 has)
        limit = max(torch._dynamo.config.cache_size_limit, 2 * len(self.buckets))
        with torch._dynamo.config.patch(cache_size_limit=limit):
            for batch in self.buckets:
                for graph, arrays in self.warm_up_cases(batch):
                    self._guarded(functools.partial(self._compile, graph, arrays))
        log.info("torch.compile: %d shapes at batch sizes %s in %.1f s", len(self.compiled_shapes),
                 ", ".join(map(str, self.buckets)), time.perf_counter() - start)

    def _feeds_run(self, name: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
        graph, output = self_check.graph_output(name)
        return self._call(graph, list(feeds.values()))[1 if output == "features" else 0]

    def _self_check(self, policy: str) -> dict[str, Any] | None:
        """The stored self-check on this engine; below its gate in bf16/fp16: fp32 instead (or refuse)."""
        spec = self.model_dir.spec.self_check
        if policy == "off" or spec is None:
            return None
        arrays = self_check.load(self.model_dir.root / spec.path)
        fell_back: list[dict[str, Any]] = []
        results = self.run_self_checks(arrays, self._feeds_run)
        failed = [r for r in results if not r.passed]
        if failed and policy == "refuse":
            raise RuntimeConfigError(f"self-check: torch {failed[0].graph} {failed[0].precision} misses its gate "
                                     f"(cosine {failed[0].cosine:.6f}, max_abs_diff {failed[0].max_abs_diff:.2e}) "
                                     "(MAE_SELF_CHECK=refuse)")
        if failed and self.dtype != torch.float32:
            log.error("self-check: torch %s misses its gate (cosine %.6f); serving fp32 instead",
                      failed[0].precision, failed[0].cosine)
            fell_back = [{"graph": r.graph, "precision": r.precision, "cosine": r.cosine} for r in failed]
            self.dtype = torch.float32
            results = self.run_self_checks(arrays, self._feeds_run)
        for r in results:
            if not r.passed:
                log.error("self-check: torch %s %s max_abs_diff %.2e, cosine %.6f misses its gate; serving it anyway",
                          r.graph, r.precision, r.max_abs_diff, r.cosine)
        log.info("self-check on %d stored images (torch): %s", spec.images,
                 ", ".join(f"{r.graph} {r.precision} cosine {r.cosine:.6f}" for r in results))
        return {"reference": spec.reference, "images": spec.images, "inputs": spec.inputs,
                "results": [r.describe() for r in results], "fell_back": fell_back}

    def describe(self) -> dict[str, Any]:
        provider = f"torch-{self.device}"
        return {
            "engine": self.name,
            "device": self.device,
            "device_failure": self.device_failure,
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "compiled": bool(self.compiled),
            "compiled_batch_sizes": list(self.buckets) if self.compiled else [],
            "weights": self.weights,
            "lone_batch_threads": 0,
            "self_check": self.self_check,
            "graphs": {g: {"file": self.weights, "precision": self.precision(g), "providers": [provider]}
                       for g in self.graphs},
        }
