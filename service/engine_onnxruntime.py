"""The ONNX Runtime engine: sessions for one model directory, device and precision choice, batched calls.

Knows nothing about queues or HTTP: it takes stacked numpy batches and returns numpy outputs.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from model_dir import self_check
from model_dir.schema import ModelDir, check_session_io
from service.engine import ClassifierOutputs, Engine, RunObserver, RuntimeConfigError

log = logging.getLogger("service.engine_onnxruntime")

CPU, CUDA, TENSORRT = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"


@dataclass(frozen=True)
class GraphSession:
    precision: str
    path: str
    session: ort.InferenceSession

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()


def _session_options(intra_op_threads: int, spinning: bool, *, stop_spinning: bool = False) -> ort.SessionOptions:
    """Sequential execution (ORT's default: the graphs are one chain of operators, so there is no inter-op
    parallelism to have) on `intra_op_threads` threads (0: one per physical core). With `spinning` the threads
    spin between operators instead of sleeping; with `stop_spinning` too they stop the moment a run returns
    (`session.force_spinning_stop`) rather than spinning on, waiting for the next one."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = intra_op_threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    options.add_session_config_entry("session.force_spinning_stop", "1" if stop_spinning else "0")
    return options


def _wants_cuda(device: str) -> bool:
    """Whether `device` asks for a CUDA session: cuda and tensorrt, and auto where this build lists CUDA."""
    return device in ("cuda", "tensorrt") or (device == "auto" and CUDA in ort.get_available_providers())


def _provider_list(device: str, precision: str) -> list[Any]:
    """Providers to ask for, best first; `auto` asks for CUDA only when this build lists it."""
    if device == "tensorrt":
        return [(TENSORRT, {"trt_fp16_enable": precision == "fp16", "trt_engine_cache_enable": True}), CUDA, CPU]
    if _wants_cuda(device):
        return [CUDA, CPU]
    return [CPU]


CUDA_LIBRARIES = ("libcudart", "libcublas", "libcublasLt", "libcurand", "libcufft", "libnvrtc", "libcudnn")


def _loaded_cuda_libraries() -> list[str]:
    """The CUDA user-space libraries mapped into this process (from /proc/self/maps), by file path."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return []
    paths = {line.split()[-1] for line in maps.splitlines() if "/" in line}
    return sorted(p for p in paths if Path(p).name.split(".so")[0] in CUDA_LIBRARIES)


def preload_cuda() -> list[str]:
    """Load the CUDA 13 and cuDNN libraries of PyPI's nvidia-* wheels before the first CUDA session
    (`onnxruntime.preload_dlls`, ORT 1.21+), so that no LD_LIBRARY_PATH or CUDA base image is needed; a library
    it cannot find is left to the default search path. Returns the CUDA libraries loaded, by path."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        log.info("onnxruntime %s has no preload_dlls: CUDA libraries come from the default search path",
                 ort.__version__)
        return _loaded_cuda_libraries()
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):  # it prints what it could not load
        preload()
    for line in printed.getvalue().splitlines():
        if line.strip():
            log.warning("onnxruntime.preload_dlls: %s", line.strip())
    loaded = _loaded_cuda_libraries()
    log.info("CUDA libraries loaded: %s", ", ".join(loaded) or "none")
    return loaded


def _driver_problem() -> str | None:
    """Why the NVIDIA driver's libcuda.so.1 cannot be loaded, or None when it can."""
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError as e:
        return f"the NVIDIA driver's libcuda.so.1 cannot be loaded ({e}): no GPU is visible to this process"
    return None


def _device_reason(device: str, got: list[str], cuda_libraries: list[str]) -> str:
    """Why the sessions run where they run, for /info: the device asked for, and what stood in CUDA's way."""
    if CUDA in got or TENSORRT in got:
        return f"MAE_DEVICE={device}: {got[0]}"
    if device == "cpu":
        return "MAE_DEVICE=cpu"
    if CUDA not in ort.get_available_providers():
        return (f"MAE_DEVICE=auto: this onnxruntime build has no CUDA provider ({', '.join(ort.get_available_providers())}"
                "; onnxruntime-gpu has one)")
    problem = _driver_problem() or "the CUDA provider did not load (ONNX Runtime's error is in the log)"
    missing = "" if cuda_libraries else "; no CUDA user-space library was found either"
    return f"MAE_DEVICE=auto: {CUDA} is in this build but the sessions did not get it: {problem}{missing}"


class OnnxRuntimeEngine(Engine):
    """The ONNX Runtime engine: one session per graph, and a second one on every core for lone batches."""

    name = "onnxruntime"

    def __init__(self, model_dir: ModelDir, *, device: str = "auto", precision: str = "fp32",
                 intra_op_threads: int = 0, spinning: bool = False, on_run: RunObserver | None = None,
                 lone_threads: int = 0, self_check_policy: str = "fallback", failover: str = "unready"):
        super().__init__(model_dir, on_run, failover)
        self.cuda_libraries = preload_cuda() if _wants_cuda(device) else []
        if device in ("cuda", "tensorrt"):
            need = CUDA if device == "cuda" else TENSORRT
            if need not in ort.get_available_providers():
                raise RuntimeConfigError(f"device {device} needs {need}, but this onnxruntime build has "
                                         f"{ort.get_available_providers()} (install onnxruntime-gpu)")
        # Spinning threads would take the cores that the event loop needs to parse the next requests.
        options = _session_options(intra_op_threads, spinning)
        self.sessions = {graph: self._open(graph, device, precision, options)
                         for graph in ("encoder", "decoder", "classifier") if model_dir.has(graph)}
        self.self_check = self._self_check(self_check_policy, device, options)
        providers = self.sessions["encoder"].providers
        self.device = "tensorrt" if TENSORRT in providers else "cuda" if CUDA in providers else "cpu"
        self.device_reason = _device_reason(device, providers, self.cuda_libraries)
        if self.device == "cpu" and _wants_cuda(device):
            log.warning("running on the CPU: %s", self.device_reason)
        # A batch that runs alone may take every core (nothing else needs them then): a second session per
        # graph, on a CPU only (GPU sessions do not compute on threads). Its threads spin within a run (a sleeping
        # thread's wake-up between two operators made a lone request of the bundled model 1.57 ms instead of
        # 1.15 at batch 1) and stop when it returns: spin tails after short runs took the cores from the next
        # request's HTTP work (small models, 2 clients). With `spinning` they spin on after a run as well.
        self.lone_threads = lone_threads if self.device == "cpu" and 0 < intra_op_threads < lone_threads else 0
        self.lone_sessions: dict[str, GraphSession] = {}
        if self.lone_threads:
            lone_options = _session_options(self.lone_threads, True, stop_spinning=not spinning)
            self.lone_sessions = {graph: self._open(graph, device, s.precision, lone_options)
                                  for graph, s in self.sessions.items()}

    def _open(self, graph: str, device: str, precision: str, options: ort.SessionOptions) -> GraphSession:
        available = self.model_dir.precisions(graph)
        chosen = precision if precision in available else "fp32"
        if chosen != precision:
            if graph == "encoder":
                raise RuntimeConfigError(f"{self.model_dir.root}: no {precision} variant of the encoder "
                                         f"(available: {', '.join(available)})")
            log.warning("no %s variant of the %s graph; using fp32", precision, graph)
        spec = self.model_dir.file(graph, chosen)
        path = str(self.model_dir.root / spec.path)
        session = ort.InferenceSession(path, sess_options=options, providers=_provider_list(device, chosen))
        got = session.get_providers()
        if (device == "cuda" and CUDA not in got) or (device == "tensorrt" and TENSORRT not in got):
            why = _driver_problem() or "ONNX Runtime's error is in the log"
            raise RuntimeConfigError(f"{path}: asked for {device} but the session only got {got}: {why} "
                                     "(MAE_DEVICE=auto falls back to the CPU)")
        if device == "auto" and CUDA in ort.get_available_providers() and CUDA not in got:
            log.warning("%s: CUDA is listed but the session did not get it; running on %s", path, got)
        check_session_io(spec, session)
        return GraphSession(precision=chosen, path=path, session=session)

    def _self_check(self, policy: str, device: str, options: ort.SessionOptions) -> dict[str, Any] | None:
        """Run the loaded graphs on the directory's self-check; replace (or refuse) a variant below its gate."""
        spec = self.model_dir.spec.self_check
        if policy == "off" or spec is None:
            if spec is None:
                log.info("%s carries no self-check (exported before it existed): variants are not checked on "
                         "this machine", self.model_dir.root)
            return None
        arrays = self_check.load(self.model_dir.root / spec.path)
        cpu = self_check.cpu_features()
        fell_back: list[dict[str, Any]] = []
        while True:
            results = self.run_self_checks(arrays, self._run_loaded)
            failed = [(r, self._culprit(r)) for r in results if not r.passed]
            # One replacement per round, in the order encoder, chain, classifier: an encoder that fell back
            # may be all the chain needed. fp32 failures are reported once nothing is left to replace.
            replaceable = [(r, graph) for r, graph in failed if graph is not None][:1]
            for r, graph in replaceable or failed:
                message = self._self_check_failure(r, graph, spec.reference, cpu)
                if policy == "refuse":
                    raise RuntimeConfigError(message + " (MAE_SELF_CHECK=refuse)")
                if graph is None:
                    log.error("%s; nothing to fall back to, serving it anyway", message)
                    continue
                log.error("%s; serving %s (fp32) instead", message, self.model_dir.file(graph).path)
                fell_back.append({"graph": graph, "precision": self.sessions[graph].precision, "cosine": r.cosine})
                self.sessions[graph] = self._open(graph, device, "fp32", options)
            if not replaceable:
                break
        log.info("self-check on %d stored images: %s", spec.images,
                 ", ".join(f"{r.graph} {r.precision} cosine {r.cosine:.6f}" for r in results))
        return {"reference": spec.reference, "images": spec.images, "inputs": spec.inputs, "cpu": cpu,
                "results": [r.describe() for r in results], "fell_back": fell_back}

    def _self_check_failure(self, r: self_check.CheckResult, graph: str | None, reference: str,
                            cpu: dict[str, Any]) -> str:
        """The log line of a failed check: the file, the figure against its gate, this CPU and its features."""
        file = self.sessions[graph or self_check.graph_output(r.graph)[0]].path.rsplit("/", 1)[-1]
        limit = (f"cosine {r.cosine:.6f} < {self_check.gate(r.graph, r.precision)}" if graph else
                 f"max_abs_diff {r.max_abs_diff:.2e} > {self_check.FP32_MAX_ABS_DIFF}")
        flags = " ".join(cpu["flags"]) or "none of " + " ".join(self_check.CPU_FLAGS)
        return (f"self-check: {file} fails its gate on this CPU ({cpu['model']}; flags {flags}): "
                f"{r.graph} {r.precision} {limit} against the {reference} reference")

    def _run_loaded(self, name: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
        graph, output = self_check.graph_output(name)
        return self.sessions[graph].session.run(output and [output], feeds)[0]

    def _culprit(self, result: self_check.CheckResult) -> str | None:
        """The reduced-precision graph behind a failed check (the decoder first, for the chain), or None."""
        graphs = ("decoder", "encoder") if result.graph == "encoder+decoder" else (self_check.graph_output(result.graph)[0],)
        return next((g for g in graphs if self.sessions[g].precision != "fp32"), None)

    def has(self, graph: str) -> bool:
        return graph in self.sessions

    def precision(self, graph: str) -> str:
        return self.sessions[graph].precision

    def _run(self, graph: str, feeds: dict[str, np.ndarray], alone: bool) -> list[np.ndarray]:
        """One session run, every output; `alone` (the batch runs alone): on the all-core session when there is one."""
        session = (self.lone_sessions if alone and self.lone_sessions else self.sessions)[graph].session
        start = time.perf_counter()
        outputs = session.run(None, feeds)
        if self.on_run:
            self.on_run(graph, len(next(iter(feeds.values()))), time.perf_counter() - start)
        return outputs

    def encode(self, pixels: np.ndarray, ids_keep: np.ndarray, *, alone: bool = False) -> np.ndarray:
        return self._run("encoder", {"pixels": pixels, "ids_keep": ids_keep}, alone)[0]

    def decode(self, latent: np.ndarray, ids_restore: np.ndarray, *, alone: bool = False) -> np.ndarray:
        return self._run("decoder", {"latent": latent, "ids_restore": ids_restore}, alone)[0]

    def classify(self, pixels: np.ndarray, *, alone: bool = False) -> ClassifierOutputs:
        logits, *features = self._run("classifier", {"pixels": pixels}, alone)  # features: declared in model.json
        return ClassifierOutputs(logits, features[0] if features else None)

    def describe(self) -> dict[str, Any]:
        """What /info and the startup log report: device, and per graph its file, precision and providers."""
        return {
            "engine": self.name,
            "device": self.device,
            "device_reason": self.device_reason,
            "cuda_libraries": self.cuda_libraries,
            "onnxruntime": ort.__version__,
            "lone_batch_threads": self.lone_threads,
            "self_check": self.self_check,
            "graphs": {g: {"file": s.path.rsplit("/", 1)[-1], "precision": s.precision, "providers": s.providers}
                       for g, s in self.sessions.items()},
        }
