"""`mae-export`: a checkpoint -> a model directory (ONNX graphs + model.json), verified against torch.

The graphs take index tensors, never draw random numbers: `encoder.onnx` (pixels, ids_keep ->
latent), `decoder.onnx` (latent, ids_restore -> pred) and, when there is a head,
`classifier.onnx` (pixels -> logits), with the batch B and kept-token count K as dynamic axes.
fp16 (GPU) and int8 (CPU) variants are derived from the fp32 files. Every variant is run in ONNX
Runtime against torch before the directory appears; the figures go into `model.json`.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import Tensor, nn

from model.checkpoint import CheckpointError, build_autoencoder, build_classifier, checkpoint_config, read_checkpoint
from model.configs import MAEConfig
from model.mae import MaskedAutoencoderViT, ViTClassifier, ViTEncoder
from service import self_check
from service.model_dir import (
    PRECISIONS,
    Architecture,
    ClassifierInfo,
    Embedding,
    FileSpec,
    ModelJson,
    Preprocessing,
    TensorSpec,
    Training,
    load_model_dir,
)
from training.cli import run_cli
from training.data import FASHION_MNIST_DIR, IMAGENET_MEAN, IMAGENET_STD, build_dataset
from training.quantize import DEFAULT_RECIPE, RECIPES
from training.variants import (
    EXTERNAL_DATA_BYTES,
    VERIFY_BATCHES,
    Sessions,
    add_variant,
    check_rows,
    declare,
    derive_variants,
    format_table,
    masking_cases,
    prepare_out_dir,
    publish,
    variant_name,
    verification,
    verify,
    write_self_check,
)
from training.weights import write_weights

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


@dataclass
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
        EncoderGraph(mae), (pixels, ids_keep), ({0: B}, {0: B, 1: K}),
        [pixels_spec, TensorSpec(name="ids_keep", shape=["B", "K"], dtype="int64")], [latent_spec],
        layer_norms=2 * c.depth + 1,
    )}
    if isinstance(mae, MaskedAutoencoderViT):
        T = torch.export.Dim("T", min=2, max=L + 1)  # 1+K tokens
        latent = torch.randn(2, ids_keep.shape[1] + 1, D, generator=g)
        graphs["decoder"] = GraphExport(
            DecoderGraph(mae), (latent, ids_restore), ({0: B, 1: T}, {0: B}),
            [latent_spec, TensorSpec(name="ids_restore", shape=["B", L], dtype="int64")],
            [TensorSpec(name="pred", shape=["B", L, c.patch_dim], dtype="float32")],
            layer_norms=2 * c.decoder_depth + 1,
        )
    if classifier is not None:
        num_classes = classifier.head_linear.out_features
        graphs["classifier"] = GraphExport(
            classifier, (pixels,), ({0: B},), [pixels_spec],
            [TensorSpec(name="logits", shape=["B", num_classes], dtype="float32")],
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
    """The torch modules as a (graph, feeds) -> output function, the reference the ONNX graphs are held to."""

    @torch.no_grad()
    def run(graph: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
        args = [torch.from_numpy(np.ascontiguousarray(v)) for v in feeds.values()]
        module = {"encoder": mae.forward_encoder, "decoder": getattr(mae, "forward_decoder", None),
                  "classifier": classifier}[graph]
        return module(*args).numpy()

    return run


def embedding_info(ckpt: dict, config) -> Embedding:
    """`/embed`'s default: the pooling the checkpoint's linear probe was measured on (cls without a probe)."""
    probe = ckpt.get("classifier") if ckpt.get("kind") == "probe" else None
    pooling = probe["pooling"] if probe else "cls"
    return Embedding(default_pooling=pooling, dim=config.embed_dim * (2 if pooling == "cls+mean" else 1))


def default_real_images(ckpt: dict[str, Any], config: MAEConfig | Architecture, count: int) -> Tensor | None:
    """A few test images of the checkpoint's data set when it is Fashion-MNIST and on disk, else None."""
    data = ckpt.get("data") or {}
    if data.get("dataset") != "fashion-mnist" or config.in_chans != 1 or not FASHION_MNIST_DIR.is_dir():
        return None
    try:
        ds = build_dataset("fashion-mnist", "test", config.img_size, config.in_chans, train=False, limit=count)
    except FileNotFoundError:
        return None
    return torch.stack([ds[i][0] for i in range(len(ds))])


def preprocessing(ckpt: dict[str, Any], config: MAEConfig) -> Preprocessing:
    """As the evaluation transform of training/data.py: square centre crop, bicubic resize, normalize."""
    data = ckpt.get("data") or {}
    mean, std = data.get("mean"), data.get("std")
    if mean is None or std is None:
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if config.in_chans == 3 else ((0.5,), (0.5,))
    return Preprocessing(resize=config.img_size, crop=config.img_size, interpolation="bicubic",
                         channels="L" if config.in_chans == 1 else "RGB", mean=list(mean), std=list(std))


def training_facts(ckpt: dict[str, Any], cls_ckpt: dict[str, Any] | None) -> Training:
    """Dataset, pretraining epochs and the scalar metrics of the checkpoints (fine-tune ones prefixed)."""
    data, metrics = ckpt.get("data") or {}, ckpt.get("metrics") or {}
    facts: dict[str, Any] = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}
    epochs = metrics.get("epochs", ckpt["epoch"] + 1 if isinstance(ckpt.get("epoch"), int) else None)
    if cls_ckpt is not None:
        facts.update({f"finetune_{k}" if not k.startswith("finetune") else k: v
                      for k, v in (cls_ckpt.get("metrics") or {}).items() if isinstance(v, (int, float, str))})
    for key in ("epochs", "dataset"):
        facts.pop(key, None)
    return Training(dataset=data.get("dataset"), epochs=epochs, **facts)


def class_labels(classifier: ViTClassifier, info: dict[str, Any], ckpt: dict[str, Any]) -> list[str]:
    """The head's label names: from the classifier info, else the training data's, else the class ids."""
    data_labels = (ckpt.get("data") or {}).get("labels")
    if not info.get("labels") and data_labels and len(data_labels) == len(classifier.labels):
        return list(data_labels)
    return list(classifier.labels)


def classifier_info(classifier: ViTClassifier, info: dict[str, Any]) -> ClassifierInfo:
    source = info["head_type"]
    metrics = info.get("metrics") or {}
    top1 = metrics.get(f"{source}_top1", metrics.get("top1"))
    return ClassifierInfo(source=source, pooling=classifier.pooling, top1=top1)


def load_models(checkpoint: str | Path, classifier_checkpoint: str | Path | None
                ) -> tuple[dict[str, Any], ViTEncoder, ViTClassifier | None, dict[str, Any] | None]:
    """(checkpoint, autoencoder, classifier or None, classifier checkpoint or None); bad combinations raise."""
    ckpt = read_checkpoint(checkpoint)
    if ckpt.get("kind") == "finetune":
        raise CheckpointError(f"{checkpoint}: a fine-tuned classifier has no MAE encoder latent to export; "
                              "pass the pretrained checkpoint and this one as --classifier")
    mae = build_autoencoder(ckpt, str(checkpoint))
    cls_ckpt = None
    if classifier_checkpoint is not None:
        cls_ckpt = read_checkpoint(classifier_checkpoint)
        classifier = build_classifier(cls_ckpt, str(classifier_checkpoint))
        if classifier is None:
            raise CheckpointError(f"{classifier_checkpoint}: carries no classifier (kind {cls_ckpt.get('kind')!r})")
        mine, theirs = checkpoint_config(ckpt).to_dict(), checkpoint_config(cls_ckpt).to_dict()
        mine.pop("norm_pix_loss"), theirs.pop("norm_pix_loss")
        if mine != theirs:
            raise CheckpointError(f"{classifier_checkpoint}: architecture differs from {checkpoint}")
    else:
        classifier = build_classifier(ckpt, str(checkpoint))
    return ckpt, mae, classifier, cls_ckpt


def export_model_dir(checkpoint: str | Path, out_dir: str | Path, classifier_checkpoint: str | Path | None = None,
                     precisions: Sequence[str] = ("fp32",), name: str | None = None, opset: int = DEFAULT_OPSET,
                     verify_data: Tensor | None = None, log: Callable[[str], None] = print,
                     int8_recipe: str = DEFAULT_RECIPE) -> Path:
    """Export, verify and write the model directory `out_dir`; returns its path.

    fp32 is always exported (the other precisions derive from it). `verify_data`: real normalized
    images [N, C, H, W] for the verification (default: Fashion-MNIST test images when the checkpoint
    was trained on it and they are on disk; random pixels are always used too). Raises
    CheckpointError / ValueError on bad input and ExportVerificationError when ORT disagrees with
    torch; in every failure no directory is left at `out_dir`.
    """
    t0 = time.perf_counter()
    out = Path(out_dir).resolve()
    unknown = [p for p in precisions if p not in PRECISIONS]
    if unknown:
        raise ValueError(f"unknown precision(s) {unknown}; choose from {', '.join(PRECISIONS)}")
    if opset not in OPSETS:
        raise ValueError(f"opset {opset} not supported (choose {OPSETS.start}-{OPSETS.stop - 1})")
    precisions = ["fp32", *[p for p in PRECISIONS[1:] if p in precisions]]
    prepare_out_dir(out)
    ckpt, mae, classifier, cls_ckpt = load_models(checkpoint, classifier_checkpoint)
    config = mae.config
    real_images = verify_data if verify_data is not None else default_real_images(ckpt, config, max(VERIFY_BATCHES))

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the server may run as another user
    try:
        graphs = graph_exports(mae, classifier)
        files: dict[str, dict[str, FileSpec]] = {}
        sessions: Sessions = {}
        for graph, spec in graphs.items():
            for precision in precisions:
                t = time.perf_counter()
                if precision == "fp32":
                    export_graph(spec, tmp / variant_name(graph, precision), opset)
                    file_spec, session = declare(tmp, variant_name(graph, precision), spec.inputs, spec.outputs)
                else:
                    file_spec, session = add_variant(tmp, graph, precision, spec.inputs, spec.outputs, int8_recipe)
                files.setdefault(graph, {})[precision] = file_spec
                sessions.setdefault(graph, {})[precision] = session
                log(f"mae-export: {file_spec.path} ({file_spec.bytes / 1e6:.1f} MB) in {time.perf_counter() - t:.1f} s")

        t = time.perf_counter()
        reference = torch_reference(mae, classifier)
        shape = (config.in_chans, config.img_size, config.img_size)
        pixel_sets = {"random": np.random.default_rng(0).standard_normal((max(VERIFY_BATCHES), *shape))}
        if real_images is not None:
            pixel_sets["real"] = real_images.numpy()
        rows = verify(reference, sessions, pixel_sets, config.num_patches)
        log(format_table(rows))
        log(f"mae-export: verified {len(rows)} cases in {time.perf_counter() - t:.1f} s")
        check_rows(rows)

        info = (cls_ckpt or ckpt).get("classifier") if classifier is not None else None
        model_json = ModelJson(
            name=name or (ckpt.get("args") or {}).get("model") or Path(checkpoint).stem,
            version=files["encoder"]["fp32"].sha256[:12],
            architecture=Architecture(**{k: v for k, v in config.to_dict().items() if k != "norm_pix_loss"},
                                      num_patches=config.num_patches, grid_size=config.grid_size),
            preprocessing=preprocessing(ckpt, config),
            norm_pix_loss=config.norm_pix_loss,
            labels=class_labels(classifier, info, ckpt) if classifier is not None else None,
            embedding=embedding_info(ckpt, config),
            classifier=classifier_info(classifier, info) if classifier is not None else None,
            training=training_facts(ckpt, cls_ckpt),
            files=files,
            verification=verification(rows),
            self_check=write_self_check(tmp, reference, "torch", set(graphs), shape, config.num_patches,
                                        None if real_images is None else real_images.numpy()),
            weights=write_weights(tmp, {"autoencoder": mae, "classifier": classifier}),
        )
        publish(tmp, out, model_json, sessions)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"mae-export: wrote {out} ({', '.join(files)} x {', '.join(precisions)}) in {time.perf_counter() - t0:.0f} s")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("mae-export", description="Export a checkpoint to an ONNX model directory.")
    source = p.add_mutually_exclusive_group()  # one of them, checked in main (a config file may give it)
    source.add_argument("--checkpoint", type=Path, help="mae, encoder or probe checkpoint")
    source.add_argument("--from-model-dir", type=Path, default=None,
                        help="add the --precision variants and a self-check to this model directory, without its "
                        "checkpoint: its fp32 graphs are the reference (--out may be the same directory)")
    p.add_argument("--out", required=True, type=Path, help="model directory to write (replaced if it is one)")
    p.add_argument("--classifier", type=Path, default=None,
                   help="fine-tuned (or probe) checkpoint for classifier.onnx (default: the checkpoint's probe head)")
    p.add_argument("--precision", default="fp32", help="comma-separated: fp32 (always), fp16, int8")
    p.add_argument("--name", default=None, help="model name in model.json (default: the training config name)")
    p.add_argument("--int8-recipe", default=DEFAULT_RECIPE, choices=[r.name for r in RECIPES.values()
                                                                     if r.mode == "dynamic"],
                   help="int8 quantization (training/quantize.py; the README's int8 table measures each on CPUs with "
                   "and without VNNI); the default holds its gate on both kinds")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset ({OPSETS.start}-{OPSETS.stop - 1})")
    return p


def quiet_library_logs() -> None:
    """Drop the exporter's and quantizer's advisory log lines, which would bury the verification table."""
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    logging.getLogger().addFilter(lambda r: not r.getMessage().startswith("Please consider to run pre-processing"))
    warnings.filterwarnings("ignore", category=FutureWarning)


def main(args: argparse.Namespace) -> None:
    quiet_library_logs()
    precisions = [p.strip() for p in args.precision.split(",") if p.strip()]
    if (args.checkpoint is None) == (args.from_model_dir is None):
        raise ValueError("give one of --checkpoint and --from-model-dir")
    if args.from_model_dir is not None:
        spec = load_model_dir(args.from_model_dir).spec
        real = default_real_images({"data": {"dataset": spec.training.dataset}}, spec.architecture, max(VERIFY_BATCHES))
        derive_variants(args.from_model_dir, args.out, precisions, None if real is None else real.numpy(),
                        int8_recipe=args.int8_recipe)
        return
    export_model_dir(args.checkpoint, args.out, args.classifier, precisions, args.name, args.opset,
                     int8_recipe=args.int8_recipe)


def cli(argv: Sequence[str] | None = None) -> None:
    run_cli(main, build_parser(), argv)


if __name__ == "__main__":
    cli()
