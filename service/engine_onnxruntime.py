"""The ONNX Runtime engine: sessions for one model directory, device and precision choice, batched calls.

Knows nothing about queues or HTTP: it takes stacked numpy batches and returns numpy outputs.

On CUDA (and TensorRT), fp32 means fp32: the CUDA provider's TF32 MatMul/Conv (`use_tf32`, on by
default) is turned off, so the stored self-check holds its fp32 gate there as on a CPU. TensorRT
picks TF32 tactics for fp32 layers by its own default (ONNX Runtime has no switch for it), so its
fp32 sessions are checked against a TF32 gate (`self_check.MIN_COSINE["tf32"]`). TensorRT gets an
optimization profile over every batch size up to `max_batch` and every K (no engine rebuild inside a
request) and caches its engines and timings under `trt_cache_dir`. /embed pools the latent on the
device (`POOL_GRAPH`, bound with IO binding) and copies back 2 x D floats per image, not the latent.
ONNX Runtime's silent move of a failing CUDA session to the CPU is turned off: a device error goes to
`Engine.device_failed` (not-ready, or a move to the CPU by setting).
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from model_dir import self_check
from model_dir.schema import FileSpec, ModelDir, check_session_io
from service.engine import ClassifierOutputs, DeviceFailed, Engine, RunObserver, RuntimeConfigError, is_device_error

log = logging.getLogger("service.engine_onnxruntime")

CPU, CUDA, TENSORRT = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"
# latent [B, T, D] -> tokens [B, 2, D]: the cls token and the mean of the patch tokens, as Engine.embed pools on the
# host (written by training/pool_graph.py; a test checks the file against it)
POOL_GRAPH = Path(__file__).resolve().parent / "graphs" / "pool_tokens.onnx"


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


# The CUDA provider's options: no TF32 (fp32 MatMul/Conv in fp32, as the fp32 self-check gate assumes).
CUDA_OPTIONS = {"use_tf32": "0"}


def _dims(shape: list[int | str], max_batch: int, num_patches: int) -> tuple[list[int], list[int], list[int]]:
    """A declared input shape (model.json: ints, and the symbols B, K, 1+K) -> its min, opt and max shapes for a
    TensorRT profile: batch 1..max_batch (opt max_batch), K 1..L (opt L: the full-image embedding)."""
    ranges = {"B": (1, max_batch, max_batch), "K": (1, num_patches, num_patches),
              "1+K": (2, 1 + num_patches, 1 + num_patches)}
    picked = [ranges[d] if isinstance(d, str) else (d, d, d) for d in shape]
    return [p[0] for p in picked], [p[1] for p in picked], [p[2] for p in picked]


def trt_options(spec: FileSpec, precision: str, max_batch: int, num_patches: int, cache_dir: Path | None
                ) -> dict[str, Any]:
    """The TensorRT provider's options for one graph: fp16 for the fp16 variant, one explicit optimization profile
    covering every shape the batcher sends (so no engine is built inside a request), and the engine and timing
    caches under `cache_dir` (None: no cache, an engine is built at every start)."""
    profiles = [_dims(list(i.shape), max_batch, num_patches) for i in spec.inputs]
    text = [",".join(f"{i.name}:{'x'.join(map(str, p[which]))}" for i, p in zip(spec.inputs, profiles, strict=True))
            for which in range(3)]
    options: dict[str, Any] = {"trt_fp16_enable": precision == "fp16", "trt_profile_min_shapes": text[0],
                               "trt_profile_opt_shapes": text[1], "trt_profile_max_shapes": text[2]}
    if cache_dir is not None:
        options.update(trt_engine_cache_enable=True, trt_engine_cache_path=str(cache_dir),
                       trt_timing_cache_enable=True, trt_timing_cache_path=str(cache_dir))
    return options


def _provider_list(device: str, trt: dict[str, Any] | None = None) -> list[Any]:
    """Providers to ask for, best first (TensorRT with its options `trt`); `auto` asks for CUDA only when this
    build lists it."""
    if device == "tensorrt":
        return [(TENSORRT, trt or {}), (CUDA, CUDA_OPTIONS), CPU]
    if _wants_cuda(device):
        return [(CUDA, CUDA_OPTIONS), CPU]
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


def gpu_name(device_id: int = 0) -> str | None:
    """The GPU's name from the NVIDIA driver (cuDeviceGetName), or None where no driver answers."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
        device, name = ctypes.c_int(), ctypes.create_string_buffer(256)
        if cuda.cuInit(0) or cuda.cuDeviceGet(ctypes.byref(device), device_id) or cuda.cuDeviceGetName(name, 256, device):
            return None
    except (OSError, AttributeError):
        return None
    return name.value.decode(errors="replace") or None


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
                 lone_threads: int = 0, self_check_policy: str = "fallback", failover: str = "unready",
                 max_batch: int = 32, trt_cache_dir: Path | None = None):
        super().__init__(model_dir, on_run, failover)
        self.max_batch, self.trt_cache_dir = max_batch, trt_cache_dir
        if device == "tensorrt" and trt_cache_dir is not None:
            try:
                trt_cache_dir.mkdir(parents=True, exist_ok=True)
            except OSError as e:  # a read-only root filesystem without a volume there: serve, and say what it costs
                log.warning("TensorRT cache %s cannot be created (%s): engines are built at every start; mount a "
                            "writable volume there or set MAE_TRT_CACHE_DIR", trt_cache_dir, e)
                self.trt_cache_dir = None
        self.cuda_libraries = preload_cuda() if _wants_cuda(device) else []
        if device in ("cuda", "tensorrt"):
            need = CUDA if device == "cuda" else TENSORRT
            if need not in ort.get_available_providers():
                raise RuntimeConfigError(f"device {device} needs {need}, but this onnxruntime build has "
                                         f"{ort.get_available_providers()} (install onnxruntime-gpu)")
        # Spinning threads would take the cores that the event loop needs to parse the next requests.
        self.options = _session_options(intra_op_threads, spinning)
        self.sessions = {graph: self._open(graph, device, precision, self.options)
                         for graph in ("encoder", "decoder", "classifier") if model_dir.has(graph)}
        providers = self.sessions["encoder"].providers
        self.device = "tensorrt" if TENSORRT in providers else "cuda" if CUDA in providers else "cpu"
        self.device_reason = _device_reason(device, providers, self.cuda_libraries)
        if self.device == "cpu" and _wants_cuda(device):
            log.warning("running on the CPU: %s", self.device_reason)
        self.self_check = self._self_check(self_check_policy, device, self.options)
        # /embed's pooling where the latent is: on the device, only the pooled tokens come back
        self.pool = self._open_pool("cuda") if self.device != "cpu" else None
        self._failover_lock = threading.Lock()
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
        trt = trt_options(spec, chosen, self.max_batch, self.arch.num_patches, self.trt_cache_dir) if (
            device == "tensorrt") else None
        session = ort.InferenceSession(path, sess_options=options, providers=_provider_list(device, trt))
        got = session.get_providers()
        if CUDA in got or TENSORRT in got:
            session.disable_fallback()  # a device error raises (device_failed) instead of moving the session silently
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
        gpu = gpu_name() if self.device != "cpu" else None
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
        return {"reference": spec.reference, "images": spec.images, "inputs": spec.inputs, "device": self.device,
                "cpu": cpu, "gpu": gpu, "results": [r.describe() for r in results], "fell_back": fell_back}

    def _self_check_failure(self, r: self_check.CheckResult, graph: str | None, reference: str,
                            cpu: dict[str, Any]) -> str:
        """The log line of a failed check: the file, the figure against its gate, and the device that computed it
        (a CPU with its model and features, or the GPU and its provider)."""
        file = self.sessions[graph or self_check.graph_output(r.graph)[0]].path.rsplit("/", 1)[-1]
        floor = self_check.gate(r.graph, r.precision)
        limit = (f"cosine {r.cosine:.6f} < {floor}" if floor is not None else
                 f"max_abs_diff {r.max_abs_diff:.2e} > {self_check.FP32_MAX_ABS_DIFF}")
        if self.device == "cpu":
            flags = " ".join(cpu["flags"]) or "none of " + " ".join(self_check.CPU_FLAGS)
            where = f"this CPU ({cpu['model']}; flags {flags})"
        else:
            where = f"this GPU ({gpu_name() or 'an NVIDIA GPU'}; {self.sessions['encoder'].providers[0]})"
        return (f"self-check: {file} fails its gate on {where}: "
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

    def checked_precision(self, graph: str) -> str:
        """tf32 for TensorRT's fp32 sessions (TensorRT picks TF32 tactics by its own default), else the precision."""
        precision = self.precision(graph)
        return "tf32" if precision == "fp32" and self.device == "tensorrt" else precision

    def _open_pool(self, device: str) -> ort.InferenceSession:
        """The pooling graph's session on `device` ("cuda": the latent stays there; "cpu": the same path on the host,
        which tests take)."""
        providers = [(CUDA, CUDA_OPTIONS), CPU] if device == "cuda" else [CPU]
        session = ort.InferenceSession(str(POOL_GRAPH), sess_options=_session_options(1, False), providers=providers)
        self.pool_device = device
        return session

    def _guarded(self, graph: str, batch: int, call: Callable[[], list[np.ndarray]]) -> list[np.ndarray]:
        """A call on the sessions, timed for the observer; a device error goes to device_failed (raises, or moves
        every graph to the CPU and runs the call again there)."""
        if self.device_failure:  # unready since the device failed: nothing more goes to it
            raise DeviceFailed(self.device_failure)
        start = time.perf_counter()
        try:
            outputs = call()
        except Exception as e:
            if self.device == "cpu" or not is_device_error(e) or not self.device_failed(e):
                raise
            self._move_to_cpu()
            outputs = call()
        if self.on_run:
            self.on_run(graph, batch, time.perf_counter() - start, sum(o.nbytes for o in outputs))
        return outputs

    def _move_to_cpu(self) -> None:
        """Failover: every graph reopened on the CPU in the precision it had (once, whichever thread gets here
        first); the pooling goes back to the host."""
        with self._failover_lock:
            if self.device == "cpu":
                return
            self.sessions = {g: self._open(g, "cpu", s.precision, self.options) for g, s in self.sessions.items()}
            self.pool, self.device = None, "cpu"
            self.device_reason = f"moved to the CPU after a device failure (MAE_DEVICE_FAILOVER=cpu); {self.device_reason}"
            log.warning("serving on the CPU from now on: %s", self.device_reason)

    def _run(self, graph: str, feeds: dict[str, np.ndarray], alone: bool) -> list[np.ndarray]:
        """One session run, every output; `alone` (the batch runs alone): on the all-core session when there is one."""
        def call() -> list[np.ndarray]:
            return (self.lone_sessions if alone and self.lone_sessions else self.sessions)[graph].session.run(None, feeds)

        return self._guarded(graph, len(next(iter(feeds.values()))), call)

    def embed(self, pixels: np.ndarray, *, alone: bool = False) -> np.ndarray:
        """On a device: the encoder's latent bound to device memory (IO binding) and pooled there by the pooling
        graph; only the [B, 2, D] tokens are copied back. On the CPU: the host pooling of Engine.embed."""
        if self.pool is None:
            return super().embed(pixels, alone=alone)
        ids_keep = self.all_patches(len(pixels))

        def call() -> list[np.ndarray]:
            if self.pool is None:  # moved to the CPU by a failover
                return [super(OnnxRuntimeEngine, self).embed(pixels)]
            encoder = self.sessions["encoder"].session
            binding = encoder.io_binding()
            binding.bind_cpu_input("pixels", pixels)
            binding.bind_cpu_input("ids_keep", ids_keep)
            binding.bind_output("latent", self.pool_device)
            encoder.run_with_iobinding(binding)
            pooling = self.pool.io_binding()
            pooling.bind_ortvalue_input("latent", binding.get_outputs()[0])
            pooling.bind_output("tokens", "cpu")
            self.pool.run_with_iobinding(pooling)
            return pooling.copy_outputs_to_cpu()

        return self._guarded("encoder", len(pixels), call)[0]

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
            "embedding_pooled_on": self.pool_device if self.pool is not None else "host",
            "device_failure": self.device_failure,
            "trt_cache_dir": str(self.trt_cache_dir) if self.device == "tensorrt" else None,
            "self_check": self.self_check,
            "graphs": {g: {"file": s.path.rsplit("/", 1)[-1], "precision": s.precision, "providers": s.providers}
                       for g, s in self.sessions.items()},
        }
