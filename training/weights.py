"""The torch engine's weights: `weights.safetensors` written at export, or recovered from the fp32 ONNX graphs.

Layout: one flat safetensors file, the autoencoder's state dict under `mae.` (the official key
layout) and the classifier's under `classifier.`, the same prefixes the exported graphs give their
initializers. A directory exported before this file existed (the bundled model among them) still
serves on the torch engine: `recover_state_dict` reads the weights back out of the fp32 graph, where
the exporter's optimizer has stored each Linear weight transposed (as the MatMul operand beside its
named bias) and folded the position embedding into `pos_embed[:, 1:]` and `cls_token + pos_embed[:, :1]`.
The caller checks what it recovered against the graph's own outputs.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from safetensors.torch import save_file
from torch import nn

from service.model_dir import WeightsSpec, sha256_file

WEIGHTS_FILE = "weights.safetensors"
PREFIXES = {"autoencoder": "mae.", "classifier": "classifier."}


def write_weights(root: Path, modules: Mapping[str, nn.Module | None]) -> WeightsSpec:
    """`root/weights.safetensors` from the modules (keys of PREFIXES); returns its model.json entry."""
    tensors = {PREFIXES[role] + key: value.detach().contiguous().cpu()
               for role, module in modules.items() if module is not None
               for key, value in module.state_dict().items()}
    path = root / WEIGHTS_FILE
    save_file(tensors, str(path))
    return WeightsSpec(path=WEIGHTS_FILE, sha256=sha256_file(path), bytes=path.stat().st_size)


def split_weights(tensors: Mapping[str, torch.Tensor], role: str) -> dict[str, torch.Tensor]:
    """One module's state dict out of the flat file's tensors."""
    prefix = PREFIXES[role]
    return {key[len(prefix):]: value for key, value in tensors.items() if key.startswith(prefix)}


class _Graph:
    """An ONNX graph's initializers and who produces and consumes each value."""

    def __init__(self, path: Path):
        model = onnx.load(str(path))  # external data, when there is some, loads from beside the file
        self.initializers = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        self.producer = {out: node for node in model.graph.node for out in node.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in model.graph.node:
            for name in node.input:
                self.consumers[name].append(node)

    def linear_weight(self, bias: str) -> np.ndarray | None:
        """The [out, in] weight of the Linear whose bias initializer is `bias`: MatMul(x, W^T) + bias, or Gemm."""
        for node in self.consumers.get(bias, []):
            if node.op_type == "Gemm":
                trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
                w = self.initializers.get(node.input[1])
                return None if w is None else (w if trans_b else w.T)
            if node.op_type == "Add":
                other = next(x for x in node.input if x != bias)
                matmul = self.producer.get(other)
                if matmul is not None and matmul.op_type == "MatMul" and matmul.input[1] in self.initializers:
                    return self.initializers[matmul.input[1]].T
        return None

    def unique(self, shape: tuple[int, ...], taken: set[str]) -> str:
        names = [n for n, a in self.initializers.items() if a.shape == shape and n not in taken]
        if len(names) != 1:
            raise ValueError(f"expected one initializer of shape {list(shape)}, found {names}")
        return names[0]


def recover_state_dict(path: Path, template: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of `template` (a module's state dict: keys and shapes) that the graph at `path` uses,
    read from its initializers (named `prefix + key`, or folded as described above)."""
    graph = _Graph(path)
    out: dict[str, np.ndarray] = {}
    for key, ref in template.items():
        shape, name = tuple(ref.shape), prefix + key
        if name in graph.initializers and graph.initializers[name].shape == shape:
            out[key] = graph.initializers[name]
        elif key.endswith(".weight") and (w := graph.linear_weight(f"{name[:-len('weight')]}bias")) is not None:
            if w.shape != shape:
                raise ValueError(f"{path.name}: {name} has shape {list(w.shape)}, the module wants {list(shape)}")
            out[key] = w
        elif key.endswith("num_batches_tracked"):  # a training counter, not used in eval
            out[key] = ref.numpy()
    if "pos_embed" in template and "pos_embed" not in out and "cls_token" not in out:
        _, tokens, dim = template["pos_embed"].shape
        taken = {prefix + k for k in out}
        patch_pos = graph.initializers[graph.unique((1, tokens - 1, dim), taken)]
        # only cls_token + pos_embed[:, :1] is in the graph: a zero pos_embed row 0 (as the sin-cos table has)
        # and that sum as cls_token compute the same tokens
        out["cls_token"] = graph.initializers[graph.unique((1, 1, dim), taken)]
        out["pos_embed"] = np.concatenate([np.zeros((1, 1, dim), np.float32), patch_pos], axis=1)
    return {key: torch.from_numpy(np.array(value)) for key, value in out.items()}
