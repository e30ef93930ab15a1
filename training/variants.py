"""Precision variants of exported graphs: fp16 (GPU) and int8 (CPU) files derived from the fp32 ones, each
declared for model.json and opened in a CPU session checked against that declaration.

How close each variant stays to its reference is `training/verification.py`'s business.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import onnxruntime as ort

from model_dir.schema import FileSpec, TensorSpec, check_session_io, make_file_spec
from training.quantize import DEFAULT_RECIPE, quantize_int8

# Protobuf cannot hold a model over 2 GiB; above this many bytes of weights they go to a file beside the graph.
EXTERNAL_DATA_BYTES = 3 << 29  # 1.5 GiB
Sessions = dict[str, dict[str, ort.InferenceSession]]  # graph -> precision -> session


def variant_name(graph: str, precision: str) -> str:
    return f"{graph}.onnx" if precision == "fp32" else f"{graph}.{precision}.onnx"


def save_onnx(model: onnx.ModelProto, path: Path) -> None:
    weight_bytes = sum(len(t.raw_data) for t in model.graph.initializer)
    if weight_bytes > EXTERNAL_DATA_BYTES:
        onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data")
    else:
        onnx.save_model(model, path)


def external_data_files(path: Path) -> list[str]:
    """The external data files an .onnx file refers to (relative to its directory)."""
    model = onnx.load(path, load_external_data=False)
    locations = {
        entry.value for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
        for entry in t.external_data if entry.key == "location"
    }
    return sorted(locations)


def convert_fp16(src: Path, dst: Path) -> None:
    """fp16 weights and compute with float32 inputs and outputs (keep_io_types): callers feed the same arrays.

    Shape inference is skipped: the dynamo exporter already typed every intermediate, and
    onnx shape inference cannot run on protos over 2 GiB.
    """
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(src), keep_io_types=True, disable_shape_infer=True)
    save_onnx(model, dst)


def cpu_session(path: Path) -> ort.InferenceSession:
    quiet = ort.SessionOptions()
    quiet.log_severity_level = 3  # fp16 graphs warn that CPU cannot constant-fold fp16 Adds; harmless here
    return ort.InferenceSession(str(path), quiet, providers=["CPUExecutionProvider"])


def add_variant(root: Path, graph: str, precision: str, inputs: list[TensorSpec], outputs: list[TensorSpec],
                int8_recipe: str = DEFAULT_RECIPE) -> tuple[FileSpec, ort.InferenceSession]:
    """Derive `graph`'s fp16 or int8 file from its fp32 file in `root`; its declaration and a checked session."""
    src, dst = root / variant_name(graph, "fp32"), root / variant_name(graph, precision)
    if precision == "fp16":
        convert_fp16(src, dst)
    else:
        quantize_int8(src, dst, int8_recipe)
    return declare(root, dst.name, inputs, outputs, int8_recipe if precision == "int8" else None)


def declare(root: Path, name: str, inputs: list[TensorSpec], outputs: list[TensorSpec],
            quantization: str | None = None) -> tuple[FileSpec, ort.InferenceSession]:
    """The model.json entry of `root/name` and a CPU session checked against it (B and K symbolic)."""
    spec = make_file_spec(root, name, inputs, outputs, external_data_files(root / name))
    if quantization:
        spec = spec.model_copy(update={"quantization": quantization})
    session = cpu_session(root / name)
    check_session_io(spec, session)
    return spec, session
