"""The graphs `mae-export` writes, as torch modules with their contract: `encoder` (pixels, ids_keep ->
latent), `decoder` (latent, ids_restore -> pred) and `classifier` (pixels -> logits, features), B and K dynamic;
their export to ONNX, and the torch reference every ONNX variant is verified against.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import Tensor, nn

from model.mae import MaskedAutoencoderViT, ViTClassifier, ViTEncoder
from model_dir import self_check
from model_dir.schema import TensorSpec
from training.variants import EXTERNAL_DATA_BYTES
from training.verification import masking_cases

DEFAULT_OPSET = 20  # attention stays decomposed (fusable by ORT); Attention-23 is not on every EP yet
OPSETS = range(18, 23)


class EncoderGraph(nn.Module):
    """pixels [B, C, H, W], ids_keep [B, K] -> latent [B, 1+K, D] (after the final norm)."""

    def __init__(self, mae: ViTEncoder):
        super().__init__()
        self.mae = mae

    def forward(self, pixels: Tensor, ids_keep: Tensor) -> Tensor:
        return self.mae.forward_encoder(pixels, ids_keep)


class DecoderGraph(nn.Module):
    """latent [B, 1+K, D], ids_restore [B, L] -> pred [B, L, p*p*C]."""

    def __init__(self, mae: MaskedAutoencoderViT):
        super().__init__()
        self.mae = mae

    def forward(self, latent: Tensor, ids_restore: Tensor) -> Tensor:
        return self.mae.forward_decoder(latent, ids_restore)


class ClassifierGraph(nn.Module):
    """pixels [B, C, H, W] -> logits [B, num_classes], features [B, D] (the input of the head's last Linear)."""

    def __init__(self, classifier: ViTClassifier):
        super().__init__()
        self.classifier = classifier

    def forward(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        return self.classifier.forward_with_features(pixels)


@dataclass(frozen=True, kw_only=True)
class GraphExport:
    """One graph to export: the module, example inputs, dynamic axes and the I/O declared in model.json."""

    module: nn.Module
    example: tuple[Tensor, ...]
    dynamic_shapes: tuple[dict[int, Any], ...]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    layer_norms: int  # LayerNormalization nodes the graph must contain (one per nn.LayerNorm used)


def graph_exports(mae: ViTEncoder, classifier: ViTClassifier | None) -> dict[str, GraphExport]:
    """The graphs of this model with their contract (names and shapes from DESIGN.md)."""
    c = mae.config
    L, D = c.num_patches, c.embed_dim
    B = torch.export.Dim("B", min=1)
    K = torch.export.Dim("K", min=1, max=L)
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(2, c.in_chans, c.img_size, c.img_size, generator=g)  # B, K >= 2: no 0/1 specialization
    ids_keep, ids_restore = (torch.from_numpy(a) for a in masking_cases(L, 2, np.random.default_rng(0))[max(2, L // 4)])
    pixels_spec = TensorSpec(name="pixels", shape=["B", c.in_chans, c.img_size, c.img_size], dtype="float32")
    latent_spec = TensorSpec(name="latent", shape=["B", "1+K", D], dtype="float32")
    graphs = {"encoder": GraphExport(
        module=EncoderGraph(mae), example=(pixels, ids_keep), dynamic_shapes=({0: B}, {0: B, 1: K}),
        inputs=[pixels_spec, TensorSpec(name="ids_keep", shape=["B", "K"], dtype="int64")], outputs=[latent_spec],
        layer_norms=2 * c.depth + 1,
    )}
    if isinstance(mae, MaskedAutoencoderViT):
        T = torch.export.Dim("T", min=2, max=L + 1)  # 1+K tokens
        latent = torch.randn(2, ids_keep.shape[1] + 1, D, generator=g)
        graphs["decoder"] = GraphExport(
            module=DecoderGraph(mae), example=(latent, ids_restore), dynamic_shapes=({0: B, 1: T}, {0: B}),
            inputs=[latent_spec, TensorSpec(name="ids_restore", shape=["B", L], dtype="int64")],
            outputs=[TensorSpec(name="pred", shape=["B", L, c.patch_dim], dtype="float32")],
            layer_norms=2 * c.decoder_depth + 1,
        )
    if classifier is not None:
        head = classifier.head_linear
        graphs["classifier"] = GraphExport(
            module=ClassifierGraph(classifier), example=(pixels,), dynamic_shapes=({0: B},), inputs=[pixels_spec],
            outputs=[TensorSpec(name="logits", shape=["B", head.out_features], dtype="float32"),
                     TensorSpec(name="features", shape=["B", head.in_features], dtype="float32")],
            layer_norms=2 * c.depth + 1,
        )
    return graphs


def export_graph(graph: GraphExport, path: Path, opset: int) -> None:
    """torch.onnx.export (dynamo) to `path`, weights beside it in `<name>.data` when over the protobuf limit."""
    input_names = [t.name for t in graph.inputs]
    weight_bytes = sum(t.numel() * t.element_size() for t in graph.module.state_dict().values())
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will not be used, since it shares the same shape constraints.*")
        program = torch.onnx.export(
            graph.module.eval(), graph.example, dynamo=True, opset_version=opset, input_names=input_names,
            output_names=[t.name for t in graph.outputs], dynamic_shapes=graph.dynamic_shapes, verbose=False,
        )
    if program is None:
        raise RuntimeError(f"torch.onnx.export returned no program for {path.name}")
    program.save(path, external_data=weight_bytes > EXTERNAL_DATA_BYTES)
    check_layer_norms(onnx.load(path, load_external_data=False), graph.layer_norms, path.name)


def check_layer_norms(model: onnx.ModelProto, expected: int, what: str) -> None:
    """LayerNorm must be one LayerNormalization node each: a decomposed one (Pow, ReduceMean) overflows in fp16."""
    ops = [n.op_type for n in model.graph.node]
    if ops.count("LayerNormalization") != expected or "Pow" in ops:
        raise RuntimeError(f"{what}: expected {expected} LayerNormalization nodes and no Pow, found "
                           f"{ops.count('LayerNormalization')} and {ops.count('Pow')} (opset too old?)")


def torch_reference(mae: ViTEncoder, classifier: ViTClassifier | None) -> self_check.RunGraph:
    """The torch modules as a (graph, feeds) -> output function, the reference the ONNX graphs are held to
    (`classifier.features`: the classifier graph's second output)."""

    @torch.no_grad()
    def run(graph: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
        args = [torch.from_numpy(np.ascontiguousarray(v)) for v in feeds.values()]
        module = {"encoder": mae.forward_encoder, "decoder": getattr(mae, "forward_decoder", None),
                  "classifier": classifier, self_check.FEATURES: getattr(classifier, "head_features", None)}[graph]
        return module(*args).numpy()

    return run
