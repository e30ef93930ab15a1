"""The model directory's self-check: a few stored inputs and their fp32 reference outputs, run through every
loaded graph variant on the machine that loads it.

Reduced-precision kernels differ by CPU (int8 above all: u8 x s8 products saturate on x86 without
VNNI), so a variant verified where it was exported can miss its gate elsewhere. `mae-export` writes
`selfcheck.npz` (hashed in model.json like every file); the server runs it at startup and refuses or
replaces a variant below its gate. The gates and the cosine are defined here, once, for both.
Torch-free.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SELF_CHECK_FILE = "selfcheck.npz"
SELF_CHECK_IMAGES = 8
FP32_MAX_ABS_DIFF = 1e-4
# Minimum per-image cosine against the fp32 reference for the reduced-precision variants: on the
# encoder's latent and the classifier's logits, and on the decoder's pred after the same-precision
# encoder (`encoder+decoder`): two quantised graphs in a chain, and at K=1 every one of the L predicted
# patches comes from a single visible token, so the errors compound; hence the looser floor there.
# tf32: fp32 graphs that TensorRT computes with TF32 tactics (10 mantissa bits in the products, fp32 sums).
MIN_COSINE = {"fp16": 0.999, "bf16": 0.999, "int8": 0.999, "tf32": 0.9999}  # bf16: the torch engine's autocast
MIN_COSINE_CHAINED = {"fp16": 0.99, "bf16": 0.99, "int8": 0.99, "tf32": 0.999}
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "amx_bf16", "asimddp", "i8mm")

# (graph, feeds) -> the graph's first output, as the loaded session computes it; `graph.output` names another
# output (`classifier.features`)
RunGraph = Callable[[str, dict[str, np.ndarray]], np.ndarray]
FEATURES = "classifier.features"  # the classifier graph's features output, as RunGraph and the checks name it


def graph_output(name: str) -> tuple[str, str | None]:
    """A RunGraph or check name -> (the graph that computes it, the output's name or None for the first):
    `classifier.features` -> (classifier, features), `encoder+decoder` -> (decoder, None)."""
    graph, _, output = name.split("+")[-1].partition(".")
    return graph, output or None


def cosine_per_image(reference: np.ndarray, actual: np.ndarray) -> np.ndarray:
    """Cosine similarity of two outputs flattened per image (float64), one value per batch row."""
    a = reference.reshape(len(reference), -1).astype(np.float64)
    b = actual.reshape(len(actual), -1).astype(np.float64)
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)


def gate(graph: str, precision: str) -> float | None:
    """The minimum cosine a reduced-precision output must reach (None for fp32: max_abs_diff decides)."""
    if precision == "fp32":
        return None
    return (MIN_COSINE_CHAINED if graph == "encoder+decoder" else MIN_COSINE)[precision]


def passes(graph: str, precision: str, max_abs_diff: float, cosine: float) -> bool:
    floor = gate(graph, precision)
    return max_abs_diff <= FP32_MAX_ABS_DIFF if floor is None else cosine >= floor


def cpu_features() -> dict[str, object]:
    """This CPU's model name and the instruction-set flags that pick ONNX Runtime's kernels (Linux /proc/cpuinfo)."""
    model, flags = "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "Model") and model == "unknown":
                model = value.strip()
            elif key in ("flags", "Features") and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return {"model": model, "flags": [f for f in CPU_FLAGS if f in flags]}


@dataclass(frozen=True, kw_only=True)
class CheckResult:
    """One graph variant against the stored reference: the worst case over the stored inputs."""

    graph: str  # encoder, encoder+decoder or classifier
    precision: str
    max_abs_diff: float
    cosine: float
    passed: bool

    def describe(self) -> dict[str, object]:
        return {"graph": self.graph, "precision": self.precision, "max_abs_diff": self.max_abs_diff,
                "cosine": self.cosine, "gate": gate(self.graph, self.precision), "passed": self.passed}


def keeps(arrays: Mapping[str, np.ndarray]) -> list[int]:
    """The kept-patch counts K the self-check file holds cases for, largest first."""
    return sorted((int(k.rsplit("_", 1)[1]) for k in arrays if k.startswith("ids_keep_")), reverse=True)


def load(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def _worst(graph: str, precision: str, pairs: list[tuple[np.ndarray, np.ndarray]]) -> CheckResult:
    max_abs = max(float(np.abs(out - ref).max()) for ref, out in pairs)
    cosine = min(float(cosine_per_image(ref, out).min()) for ref, out in pairs)
    return CheckResult(graph=graph, precision=precision, max_abs_diff=max_abs, cosine=cosine,
                       passed=passes(graph, precision, max_abs, cosine))


def check_encoder(arrays: Mapping[str, np.ndarray], precision: str, run: RunGraph) -> CheckResult:
    """The encoder's latent at every stored K."""
    pairs = [(arrays[f"latent_{k}"], run("encoder", {"pixels": arrays["pixels"], "ids_keep": arrays[f"ids_keep_{k}"]}))
             for k in keeps(arrays)]
    return _worst("encoder", precision, pairs)


def check_chain(arrays: Mapping[str, np.ndarray], precision: str, run: RunGraph) -> CheckResult:
    """The decoder's pred after the encoder, as /reconstruct chains them, at every stored K."""
    pairs = []
    for k in keeps(arrays):
        latent = run("encoder", {"pixels": arrays["pixels"], "ids_keep": arrays[f"ids_keep_{k}"]})
        pairs.append((arrays[f"pred_{k}"], run("decoder", {"latent": latent, "ids_restore": arrays[f"ids_restore_{k}"]})))
    return _worst("encoder+decoder", precision, pairs)


def check_classifier(arrays: Mapping[str, np.ndarray], precision: str, run: RunGraph) -> CheckResult:
    return _worst("classifier", precision, [(arrays["logits"], run("classifier", {"pixels": arrays["pixels"]}))])


def check_features(arrays: Mapping[str, np.ndarray], precision: str, run: RunGraph) -> CheckResult:
    """The classifier graph's features output (stored by exports whose classifier graph has it)."""
    return _worst(FEATURES, precision, [(arrays["features"], run(FEATURES, {"pixels": arrays["pixels"]}))])


def reference_arrays(pixels: np.ndarray, cases: Mapping[int, tuple[np.ndarray, np.ndarray]], run: RunGraph,
                     graphs: set[str]) -> dict[str, np.ndarray]:
    """The self-check file's content from a reference `run` (torch at export): inputs and outputs per K.

    `cases`: K -> (ids_keep [N, K], ids_restore [N, L]); `graphs` may name FEATURES too.
    """
    arrays = {"pixels": pixels.astype(np.float32)}
    for k, (ids_keep, ids_restore) in cases.items():
        arrays[f"ids_keep_{k}"] = ids_keep.astype(np.int64)
        arrays[f"latent_{k}"] = run("encoder", {"pixels": arrays["pixels"], "ids_keep": arrays[f"ids_keep_{k}"]})
        if "decoder" in graphs:
            arrays[f"ids_restore_{k}"] = ids_restore.astype(np.int64)
            arrays[f"pred_{k}"] = run("decoder", {"latent": arrays[f"latent_{k}"],
                                                  "ids_restore": arrays[f"ids_restore_{k}"]})
    if "classifier" in graphs:
        arrays["logits"] = run("classifier", {"pixels": arrays["pixels"]})
    if FEATURES in graphs:
        arrays["features"] = run(FEATURES, {"pixels": arrays["pixels"]})
    return arrays


def save(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    with open(path, "wb") as f:
        np.savez(f, **arrays)
