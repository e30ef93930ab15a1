"""The pooling graph the ONNX Runtime engine runs on a GPU beside the encoder (`service/graphs/pool_tokens.onnx`).

latent [B, T, D] float32 -> tokens [B, 2, D]: the cls token and the mean of the T-1 patch tokens, as
`service.engine.pool_tokens` computes them on the host. The server has no `onnx` package, so the file is
written here and shipped; tests/service/test_gpu_path.py checks the shipped file against `build()`.

    python -m training.pool_graph   # rewrites service/graphs/pool_tokens.onnx
"""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import TensorProto, helper

OUT = Path(__file__).resolve().parents[1] / "service" / "graphs" / "pool_tokens.onnx"
OPSET, IR_VERSION = 18, 8  # opset 18: ReduceMean takes its axes as an input; IR 8: any onnxruntime >= 1.14


def build() -> onnx.ModelProto:
    latent = helper.make_tensor_value_info("latent", TensorProto.FLOAT, ["B", "T", "D"])
    tokens = helper.make_tensor_value_info("tokens", TensorProto.FLOAT, ["B", 2, "D"])
    constants = [helper.make_tensor(name, TensorProto.INT64, [1], [value])
                 for name, value in (("zero", 0), ("one", 1), ("end", 2**62), ("axis", 1))]
    nodes = [helper.make_node("Slice", ["latent", "zero", "one", "axis"], ["cls"]),
             helper.make_node("Slice", ["latent", "one", "end", "axis"], ["patches"]),
             helper.make_node("ReduceMean", ["patches", "axis"], ["mean"], keepdims=1),
             helper.make_node("Concat", ["cls", "mean"], ["tokens"], axis=1)]
    graph = helper.make_graph(nodes, "pool_tokens", [latent], [tokens], constants)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="mae-service")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


if __name__ == "__main__":
    OUT.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(build(), OUT)
    print(OUT)
