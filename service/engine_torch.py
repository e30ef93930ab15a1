"""The torch engine: the model directory's graphs as the PyTorch MAE (`model/`), on CPU or CUDA.

Imported only when `MAE_ENGINE=torch` (the `torch` extra). Weights come from the directory's
`weights.safetensors` (hashed in model.json, checked at load) or, for a directory without it, are
recovered from the fp32 ONNX graphs and checked against those graphs' outputs before serving. On CUDA,
bf16 or fp16 run under autocast, attention through SDPA (the model's own kernel); `torch_compile`
compiles the three calls (at warm-up; the startup checks run them eager). The stored self-check runs
on this engine as on ONNX Runtime.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from model_dir import self_check
from model_dir.schema import ModelDir
from service.engine import ClassifierOutputs, Engine, RunObserver, RuntimeConfigError
from training.weights import build_modules, recover_weights, split_weights

log = logging.getLogger("service.engine_torch")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
RECOVERY_MAX_ABS_DIFF = self_check.FP32_MAX_ABS_DIFF  # recovered weights against their own fp32 graph


def _device(requested: str) -> torch.device:
    if requested == "tensorrt":
        raise RuntimeConfigError("device tensorrt is an ONNX Runtime provider; the torch engine runs on cpu or cuda")
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeConfigError(f"device cuda: torch {torch.__version__} sees no CUDA device "
                                 f"(built for CUDA {torch.version.cuda})")
    return torch.device("cuda" if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()) else "cpu")


def load_weights(model_dir: ModelDir, modules: dict[str, nn.Module]) -> str:
    """Load every module's weights (strict); returns where they came from."""
    if model_dir.spec.weights is not None:
        tensors = load_file(str(model_dir.root / model_dir.spec.weights.path))
        state = {role: split_weights(tensors, role) for role in modules}
        source = model_dir.spec.weights.path
    else:
        state, source = recover_weights(model_dir, modules), "recovered from the fp32 ONNX graphs"
    for role, module in modules.items():
        module.load_state_dict(state[role], strict=True)
    return source


class TorchEngine(Engine):
    """The PyTorch MAE and classifier in eval mode, called with the graphs' inputs and outputs."""

    name = "torch"

    def __init__(self, model_dir: ModelDir, *, device: str = "auto", precision: str = "fp32", threads: int = 0,
                 compile: bool = False, on_run: RunObserver | None = None, self_check_policy: str = "fallback",
                 failover: str = "unready"):
        super().__init__(model_dir, on_run, failover)
        self.torch_device = _device(device)
        self.device = self.torch_device.type
        if precision not in DTYPES or (precision == "fp16" and self.device == "cpu"):
            raise RuntimeConfigError(f"precision {precision}: the torch engine runs fp32, bf16 (autocast) and, on "
                                     "cuda, fp16 (int8 graphs are ONNX Runtime's)")
        self.dtype = DTYPES[precision]
        if self.device == "cpu" and threads:
            torch.set_num_threads(threads)
        modules = build_modules(model_dir)
        self.weights = load_weights(model_dir, modules)
        for module in modules.values():
            module.eval().to(self.torch_device)
        self.compiled = compile
        mae = modules["autoencoder"]
        calls: dict[str, Callable[..., Tensor]] = {"encoder": mae.forward_encoder}
        if model_dir.has("decoder"):
            calls["decoder"] = mae.forward_decoder
        if "classifier" in modules:
            calls["classifier"] = modules["classifier"].forward_with_features
        self.features = model_dir.spec.classifier_features_dim() is not None  # as the graph's outputs declare
        # The startup checks run the eager calls (compiling every checked shape would take minutes on a CPU);
        # the compiled ones, the same computation, compile at warm-up.
        self.eager = calls
        self.graphs = {g: torch.compile(f) if compile else f for g, f in calls.items()}
        if model_dir.spec.weights is None:
            self._check_against_onnx()
        self.self_check = self._self_check(self_check_policy)

    def has(self, graph: str) -> bool:
        return graph in self.graphs

    def precision(self, graph: str) -> str:
        return next(name for name, dtype in DTYPES.items() if dtype == self.dtype)

    @contextlib.contextmanager
    def _autocast(self) -> Iterator[None]:
        with torch.inference_mode(), torch.autocast(self.device, dtype=self.dtype,
                                                    enabled=self.dtype != torch.float32):
            yield

    def _call(self, calls: dict[str, Callable[..., Any]], graph: str, *arrays: np.ndarray) -> list[np.ndarray]:
        """Every output of the call, as the graph's outputs (the classifier: logits, features)."""
        with self._autocast():
            tensors = [torch.from_numpy(np.ascontiguousarray(a)).to(self.torch_device, non_blocking=True)
                       for a in arrays]
            out = calls[graph](*tensors)
            return [t.float().cpu().numpy() for t in (out if isinstance(out, tuple) else (out,))]

    def _run(self, graph: str, *arrays: np.ndarray) -> list[np.ndarray]:
        start = time.perf_counter()
        out = self._call(self.graphs, graph, *arrays)
        if self.on_run:
            self.on_run(graph, len(arrays[0]), time.perf_counter() - start)
        return out

    def encode(self, pixels: np.ndarray, ids_keep: np.ndarray, *, alone: bool = False) -> np.ndarray:
        return self._run("encoder", pixels, ids_keep)[0]

    def decode(self, latent: np.ndarray, ids_restore: np.ndarray, *, alone: bool = False) -> np.ndarray:
        return self._run("decoder", latent, ids_restore)[0]

    def classify(self, pixels: np.ndarray, *, alone: bool = False) -> ClassifierOutputs:
        logits, features = self._run("classifier", pixels)
        return ClassifierOutputs(logits, features if self.features else None)

    def _feeds_run(self, name: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
        graph, output = self_check.graph_output(name)
        return self._call(self.eager, graph, *feeds.values())[1 if output == "features" else 0]

    def _check_against_onnx(self) -> None:
        """Recovered weights, in fp32, against the fp32 graphs they came from (ONNX Runtime on the CPU)."""
        a = self.arch
        rng = np.random.default_rng(0)
        pixels = rng.standard_normal((2, a.in_chans, a.img_size, a.img_size)).astype(np.float32)
        ids = np.stack([rng.permutation(a.num_patches) for _ in range(2)]).astype(np.int64)
        keep = max(1, a.num_patches // 4)
        feeds = {"encoder": {"pixels": pixels, "ids_keep": np.sort(ids[:, :keep], axis=1)},
                 "classifier": {"pixels": pixels}}
        dtype, self.dtype = self.dtype, torch.float32
        try:
            if self.has("decoder"):
                latent = self._feeds_run("encoder", feeds["encoder"])
                feeds["decoder"] = {"latent": latent, "ids_restore": np.argsort(ids, axis=1).astype(np.int64)}
            for graph in self.graphs:
                session = ort.InferenceSession(str(self.model_dir.path(graph)), providers=["CPUExecutionProvider"])
                diff = max(float(np.abs(expected - actual).max()) for expected, actual in zip(
                    session.run(None, feeds[graph]), self._call(self.eager, graph, *feeds[graph].values()),
                    strict=False))  # every output the graph has
                if diff > RECOVERY_MAX_ABS_DIFF:
                    raise RuntimeConfigError(f"{self.model_dir.path(graph)}: the weights recovered from it give "
                                             f"outputs {diff:.2e} away from the graph's (limit {RECOVERY_MAX_ABS_DIFF})")
        finally:
            self.dtype = dtype

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
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "compiled": self.compiled,
            "weights": self.weights,
            "lone_batch_threads": 0,
            "self_check": self.self_check,
            "graphs": {g: {"file": self.weights, "precision": self.precision(g), "providers": [provider]}
                       for g in self.graphs},
        }
