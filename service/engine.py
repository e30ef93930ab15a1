"""The engine interface: a model directory's graphs as calls over index tensors, whatever computes them.

Two engines implement it: ONNX Runtime (`service/engine_onnxruntime.py`, the default; CPU, CUDA, TensorRT) and
torch (`service/engine_torch.py`, the `torch` extra; CPU, CUDA), chosen by `MAE_ENGINE`; this module
imports neither (`service.server.open_engine` does, the torch one only when it is chosen, so the
ONNX-only install never loads torch). The tasks (`service/tasks.py`) call its graphs; the server opens
and warms it up; the routes only ask it, through the server, what it has and runs on (`has`,
`describe`: /info and the Open Inference Protocol's model list).
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from model_dir import self_check
from model_dir.schema import ModelDir
from service.masking import len_keep

log = logging.getLogger("service.engine")

ENGINES = ("onnxruntime", "torch")
WARMUP_MASK_RATIO = 0.75

# (graph, batch size, seconds, bytes of the outputs returned to the host) after each engine call
RunObserver = Callable[[str, int, float, int], None]
DeviceObserver = Callable[[str, str], None]  # (the device that failed, why) after a device failure
FAILOVER = ("unready", "cpu")  # what a device failure after start-up does: report not-ready, or move to the CPU
# in the message (lower-cased) of an error that the device raised: a CUDA, cuDNN, cuBLAS or TensorRT status
DEVICE_ERROR_WORDS = ("cuda", "cudnn", "cublas", "tensorrt")
DEVICE_ERROR_TYPES = ("EPFail", "AcceleratorError")  # ONNX Runtime's execution-provider failure; torch's device error


@dataclass(frozen=True)
class ClassifierOutputs:
    """The classifier graph's outputs for a batch: logits [B, num_classes] and, when the model directory declares
    them (`classifier.features`), the input of the head's last Linear [B, D], unnormalized."""

    logits: np.ndarray
    features: np.ndarray | None


def pool_tokens(latent: np.ndarray) -> np.ndarray:
    """latent [B, 1+L, D] -> [B, 2, D] float32: the cls token, and the mean of the patch tokens."""
    tokens = np.empty((len(latent), 2, latent.shape[-1]), dtype=np.float32)
    tokens[:, 0] = latent[:, 0]
    np.mean(latent[:, 1:], axis=1, dtype=np.float32, out=tokens[:, 1])
    return tokens


def is_device_error(error: BaseException) -> bool:
    """Whether an engine call failed for the device rather than for its inputs: ONNX Runtime's EPFail, torch's
    AcceleratorError, or an error whose message is a CUDA/cuDNN/cuBLAS/TensorRT status. Running out of device
    memory is the batch's doing, not a failed device."""
    message = str(error).lower()
    if "out of memory" in message:
        return False
    return type(error).__name__ in DEVICE_ERROR_TYPES or any(word in message for word in DEVICE_ERROR_WORDS)


class RuntimeConfigError(RuntimeError):
    """The requested engine, device or precision cannot be served here with this model directory."""


class DeviceFailed(RuntimeError):
    """The device failed under a call after start-up (a CUDA error; ONNX Runtime's EP failure) and the engine
    does not fail over: the call's batch is lost and the engine reports not-ready from now on."""


class Engine(ABC):
    """The encoder, and the decoder and classifier when the model directory has them.

    `alone` (keyword): the batch runs alone (no other batch running or waiting), so an engine may give
    it every core; engines without such a mode ignore it.

    A device error after start-up goes through `device_failed`: with `failover` "unready" the engine records
    it (`device_failure`, which readiness reports) and the call raises DeviceFailed; with "cpu" the engine moves
    its graphs to the CPU and runs the call again there. Either way `on_device_failure` hears of it (metrics).
    """

    name: str  # "onnxruntime" or "torch"
    device: str  # where it computes: cpu, cuda or tensorrt
    lone_threads: int = 0  # threads of a batch that runs alone (0: no separate mode)
    self_check: dict[str, Any] | None = None  # the startup self-check's report, when one ran
    device_failure: str | None = None  # why the device stopped working after start-up (None: it works)
    max_batch: int = 32  # the largest batch the batcher sends (set by the server; a device warms up every size)

    def __init__(self, model_dir: ModelDir, on_run: RunObserver | None, failover: str = "unready"):
        if failover not in FAILOVER:
            raise RuntimeConfigError(f"failover {failover!r}: one of {', '.join(FAILOVER)}")
        self.model_dir = model_dir
        self.arch = model_dir.spec.architecture
        self.on_run = on_run
        self.failover = failover
        self.on_device_failure: DeviceObserver | None = None

    def device_failed(self, error: BaseException) -> bool:
        """A device error under a call: log it and tell the observer; True when the caller should move to the CPU
        and run the call again (failover "cpu"), else the failure is recorded and DeviceFailed is raised."""
        failed, reason = self.device, f"{type(error).__name__}: {error}".strip()
        log.error("the %s device failed under a call: %s (failover: %s)", failed, reason, self.failover)
        if self.on_device_failure:
            self.on_device_failure(failed, reason)
        if self.failover == "cpu":
            return True
        self.device_failure = f"{failed} failed after start-up: {reason}"
        raise DeviceFailed(self.device_failure) from error

    @abstractmethod
    def has(self, graph: str) -> bool:
        """Whether the graph (encoder, decoder, classifier) is loaded."""

    @abstractmethod
    def precision(self, graph: str) -> str:
        """The precision the graph runs in."""

    @abstractmethod
    def encode(self, pixels: np.ndarray, ids_keep: np.ndarray, *, alone: bool = False) -> np.ndarray:
        """pixels [B, C, H, W] float32, ids_keep [B, K] int64 -> latent [B, 1+K, D]."""

    @abstractmethod
    def decode(self, latent: np.ndarray, ids_restore: np.ndarray, *, alone: bool = False) -> np.ndarray:
        """latent [B, 1+K, D], ids_restore [B, L] int64 -> pred [B, L, p*p*C]."""

    @abstractmethod
    def classify(self, pixels: np.ndarray, *, alone: bool = False) -> ClassifierOutputs:
        """pixels [B, C, H, W] -> logits [B, num_classes] and features [B, D] (None without a features output)."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """What /info and the startup log report: engine, device, and per graph its precision and providers."""

    def embed(self, pixels: np.ndarray, *, alone: bool = False) -> np.ndarray:
        """pixels [B, C, H, W] -> [B, 2, D] float32: the cls token and the mean of the patch tokens of the
        full-image latent (/embed's source=encoder). Here the latent comes back whole and is pooled on the host; an
        engine whose latent lives on a device pools it there and copies back only these 2 x D floats per image."""
        return pool_tokens(self.encode(pixels, self.all_patches(len(pixels)), alone=alone))

    def all_patches(self, batch: int) -> np.ndarray:
        """ids_keep [B, L] that keeps every patch (the full-image embedding)."""
        return np.tile(np.arange(self.arch.num_patches, dtype=np.int64), (batch, 1))

    def warm_up_cases(self, batch: int) -> list[tuple[str, tuple[np.ndarray, ...]]]:
        """The calls that warm a batch size up, as (graph, inputs): the full-image encoder, the encoder at the
        warm-up mask ratio's K and the decoder after it, the classifier."""
        a = self.arch
        pixels = np.zeros((batch, a.in_chans, a.img_size, a.img_size), dtype=np.float32)
        patches = self.all_patches(batch)
        keep = len_keep(a.num_patches, WARMUP_MASK_RATIO)
        cases: list[tuple[str, tuple[np.ndarray, ...]]] = [("encoder", (pixels, patches)),
                                                           ("encoder", (pixels, patches[:, :keep]))]
        if self.has("decoder"):
            cases.append(("decoder", (np.zeros((batch, 1 + keep, a.embed_dim), dtype=np.float32), patches)))
        if self.has("classifier"):
            cases.append(("classifier", (pixels,)))
        return cases

    def warm_up(self) -> None:
        """The warm-up cases (allocations, kernel choice) at batch 1 in every lone-batch mode; on a device at every
        batch size up to max_batch as well (cuDNN picks a convolution per input shape, TensorRT loads its
        profile), so that no request pays for it."""
        calls = {"encoder": self.encode, "decoder": self.decode, "classifier": self.classify}
        sizes = range(1, self.max_batch + 1) if self.device != "cpu" else range(1, 2)
        for alone in (False, True) if self.lone_threads else (False,):
            for batch in sizes:
                cases = self.warm_up_cases(batch)
                for graph, inputs in cases:
                    calls[graph](*inputs, alone=alone)
                if self.device != "cpu":  # /embed's path on a device, its pooling there included
                    pixels = cases[0][1][0]  # the full-image encoder's
                    self.embed(pixels, alone=alone)

    def checked_precision(self, graph: str) -> str:
        """The precision whose gate the self-check applies to the graph: its precision, unless the device computes
        it in another (TensorRT's fp32 in TF32)."""
        return self.precision(graph)

    def run_self_checks(self, arrays: dict[str, np.ndarray], run: self_check.RunGraph) -> list[self_check.CheckResult]:
        """The stored self-check cases that apply to the loaded graphs, run through `run`."""
        precision = self.checked_precision
        results = [self_check.check_encoder(arrays, precision("encoder"), run)]
        if self.has("decoder") and self_check.keeps(arrays) and f"pred_{self_check.keeps(arrays)[0]}" in arrays:
            reduced = [precision(g) for g in ("decoder", "encoder") if precision(g) != "fp32"]
            results.append(self_check.check_chain(arrays, (reduced or ["fp32"])[0], run))
        if self.has("classifier") and "logits" in arrays:
            results.append(self_check.check_classifier(arrays, precision("classifier"), run))
        if self.has("classifier") and "features" in arrays and self.model_dir.spec.classifier_features_dim():
            results.append(self_check.check_features(arrays, precision("classifier"), run))
        return results
