"""The torch engine's weights: `weights.safetensors` written at export, or recovered from the fp32 ONNX graphs.

Layout: one flat safetensors file, the autoencoder's state dict under `mae.` (the official key
layout) and the classifier's under `classifier.`, the same prefixes the exported graphs give their
initializers. A directory exported before this file existed (the bundled model among them) still
serves on the torch engine: `recover_state_dict` reads the weights back out of the fp32 graph, where
the exporter's optimizer has stored each Linear weight transposed (a MatMul operand), left zero conv
biases out and folded the position embedding into `pos_embed[:, 1:]` and `cls_token + pos_embed[:, :1]`.
The caller checks what it recovered against the graph's own outputs.
"""

from __future__ import annotations

import ast
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from safetensors.torch import save_file
from torch import nn

from model.configs import MAEConfig
from model.mae import EncoderOnlyMAE, MaskedAutoencoderViT, ViTClassifier
from model_dir.schema import ModelDir, WeightsSpec, sha256_file

WEIGHTS_FILE = "weights.safetensors"
PREFIXES = {"autoencoder": "mae.", "classifier": "classifier."}
DECODER_KEYS = ("decoder_", "mask_token")  # the autoencoder's keys that live in the decoder graph
SCOPES_KEY = "pkg.torch.onnx.name_scopes"  # node metadata: the module path from the exported root down to the op


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
    """An ONNX graph's initializers, and its parameters by the module each node came from.

    The exporter records every node's module path (`pkg.torch.onnx.name_scopes`); names of initializers
    cannot be trusted, since identical tensors (the ones and zeros of an untrained LayerNorm or bias) are
    stored once under the first name."""

    def __init__(self, path: Path):
        model = onnx.load(str(path))  # external data, when there is some, loads from beside the file
        self.initializers = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        self.params: dict[str, np.ndarray] = {}
        for node in model.graph.node:
            scopes = next((ast.literal_eval(p.value) for p in node.metadata_props if p.key == SCOPES_KEY), [])
            if len(scopes) >= 2:
                self._record(node, scopes[-2])

    def _record(self, node: onnx.NodeProto, module: str) -> None:
        """The parameters one node holds, under `module.weight` etc., as torch lays them out."""
        inputs = [self.initializers.get(name) for name in node.input]
        if node.op_type in ("LayerNormalization", "Conv"):
            self.params[f"{module}.weight"] = inputs[1]
            if node.op_type == "Conv" and len(inputs) < 3:  # a zero bias is left out of the graph
                self.params[f"{module}.bias"] = np.zeros(inputs[1].shape[0], inputs[1].dtype)
            if len(inputs) > 2 and inputs[2] is not None:
                self.params[f"{module}.bias"] = inputs[2]
        elif node.op_type == "MatMul" and inputs[1] is not None and inputs[1].ndim == 2:  # x @ weight.T
            self.params[f"{module}.weight"] = inputs[1].T
            self.params.setdefault(f"{module}.bias", np.zeros(inputs[1].shape[1], inputs[1].dtype))
        elif node.op_type == "Add" and f"{module}.weight" in self.params:  # the Linear's bias, after its MatMul
            bias = next((x for x in inputs if x is not None), None)
            if bias is not None:
                self.params[f"{module}.bias"] = bias
        elif node.op_type == "Gemm":
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            self.params[f"{module}.weight"] = inputs[1] if trans_b else inputs[1].T
            if len(inputs) > 2 and inputs[2] is not None:
                self.params[f"{module}.bias"] = inputs[2]
        elif node.op_type == "BatchNormalization":
            self.params[f"{module}.running_mean"], self.params[f"{module}.running_var"] = inputs[3], inputs[4]

    def unique(self, shape: tuple[int, ...], taken: set[str]) -> str:
        names = [n for n, a in self.initializers.items() if a.shape == shape and n not in taken]
        if len(names) != 1:
            raise ValueError(f"expected one initializer of shape {list(shape)}, found {names}")
        return names[0]


def recover_state_dict(path: Path, template: Mapping[str, torch.Tensor], *prefixes: str) -> dict[str, torch.Tensor]:
    """The entries of `template` (a module's state dict: keys and shapes) that the graph at `path` uses, read from
    its nodes (module path `prefix + key`, the first of `prefixes` the graph has) or, for tokens, its initializers
    (named, or folded as described above)."""
    graph = _Graph(path)
    prefix = next((p for p in prefixes if any(k.startswith(p) for k in graph.params)), prefixes[-1])
    out: dict[str, np.ndarray] = {}
    for key, ref in template.items():
        shape, name = tuple(ref.shape), prefix + key
        found = graph.params.get(name, graph.initializers.get(name))
        if found is not None:
            if found.shape != shape:
                raise ValueError(f"{path.name}: {name} has shape {list(found.shape)}, the module wants {list(shape)}")
            out[key] = found
        elif key.endswith("num_batches_tracked"):  # a training counter, not used in eval
            out[key] = ref.numpy()
    if "pos_embed" in template and "pos_embed" not in out and "cls_token" not in out:
        _, tokens, dim = template["pos_embed"].shape
        patch_pos = graph.initializers[graph.unique((1, tokens - 1, dim), set())]
        # only cls_token + pos_embed[:, :1] is in the graph: a zero pos_embed row 0 (as the sin-cos table has)
        # and that sum as cls_token compute the same tokens
        out["cls_token"] = graph.initializers[graph.unique((1, 1, dim), set())]
        out["pos_embed"] = np.concatenate([np.zeros((1, 1, dim), np.float32), patch_pos], axis=1)
    return {key: torch.from_numpy(np.array(value)) for key, value in out.items()}


def build_modules(model_dir: ModelDir) -> dict[str, nn.Module]:
    """The modules the directory's graphs were exported from, randomly initialised: `autoencoder` (with the
    decoder when there is a decoder graph) and `classifier` when there is a classifier graph."""
    spec = model_dir.spec
    config = MAEConfig.from_dict({**{k: v for k, v in spec.architecture.model_dump().items()
                                     if k not in ("num_patches", "grid_size")}, "norm_pix_loss": spec.norm_pix_loss})
    modules: dict[str, nn.Module] = {
        "autoencoder": MaskedAutoencoderViT(config) if model_dir.has("decoder") else EncoderOnlyMAE(config)}
    if spec.classifier is not None:
        num_classes = int(model_dir.file("classifier").outputs[0].shape[-1])
        modules["classifier"] = ViTClassifier(config, num_classes=num_classes, head_type=spec.classifier.source,
                                              pooling=spec.classifier.pooling)
    return modules


def recover_weights(model_dir: ModelDir, modules: Mapping[str, nn.Module]) -> dict[str, dict[str, torch.Tensor]]:
    """Per module role, its state dict recovered from the directory's fp32 graphs: the autoencoder's encoder
    part from the encoder graph, its decoder part from the decoder graph, the classifier from its own."""
    template = modules["autoencoder"].state_dict()
    parts = {"encoder": {k: v for k, v in template.items() if not k.startswith(DECODER_KEYS)},
             "decoder": {k: v for k, v in template.items() if k.startswith(DECODER_KEYS)}}
    state = {"autoencoder": {}}
    for graph, part in parts.items():
        if model_dir.has(graph):
            state["autoencoder"] |= recover_state_dict(model_dir.path(graph), part, "mae.")
    if "classifier" in modules:
        # ClassifierGraph wraps the classifier (`classifier.*`) since the graph has a features output; before, the
        # classifier was the graph's root module.
        state["classifier"] = recover_state_dict(model_dir.path("classifier"), modules["classifier"].state_dict(),
                                                 PREFIXES["classifier"], "")
    return state
