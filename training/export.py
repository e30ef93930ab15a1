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
import os
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
import onnxruntime as ort
import torch
from torch import Tensor, nn

from model.checkpoint import CheckpointError, build_autoencoder, build_classifier, checkpoint_config, read_checkpoint
from model.configs import MAEConfig
from model.mae import MaskedAutoencoderViT, ViTClassifier, ViTEncoder
from service import self_check
from service.model_dir import (
    MODEL_JSON,
    PRECISIONS,
    Architecture,
    ClassifierInfo,
    Embedding,
    FileSpec,
    ModelDir,
    ModelJson,
    Preprocessing,
    SelfCheckSpec,
    TensorSpec,
    Training,
    Verification,
    VerificationRow,
    check_session_io,
    load_model_dir,
    make_file_spec,
    sha256_file,
    write_model_json,
)
from training.cli import run_cli
from training.data import FASHION_MNIST_DIR, IMAGENET_MEAN, IMAGENET_STD, build_dataset
from training.quantize import DEFAULT_RECIPE, quantize_int8

DEFAULT_OPSET = 20  # attention stays decomposed (fusable by ORT); Attention-23 is not on every EP yet
OPSETS = range(18, 23)
# Protobuf cannot hold a model over 2 GiB; above this many bytes of weights they go to a file beside the graph.
EXTERNAL_DATA_BYTES = 3 << 29  # 1.5 GiB
VERIFY_BATCHES = (1, 3, 8)


class ExportVerificationError(ValueError):
    """ONNX Runtime disagreed with torch beyond the limits; nothing was written."""


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
    ids_keep, ids_restore = masking_ids(mae, 2, max(2, L // 4), g)
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


def masking_ids(mae: ViTEncoder, batch: int, keep: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """ids_keep [B, keep] and ids_restore [B, L] of a random masking, by the model's own `random_masking`."""
    noise = torch.rand(batch, mae.config.num_patches, generator=g)
    ids_shuffle, ids_restore, _ = mae.random_masking(batch, 0.0, noise)  # ratio 0: ids_keep is the whole shuffle
    return ids_shuffle[:, :keep].contiguous(), ids_restore


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


def variant_name(graph: str, precision: str) -> str:
    return f"{graph}.onnx" if precision == "fp32" else f"{graph}.{precision}.onnx"


def compare(graph: str, precision: str, inputs: str, batch: int, keep: int | None,
            expected: Tensor, actual: np.ndarray) -> VerificationRow:
    ref = expected.numpy()
    if actual.shape != ref.shape:
        raise ExportVerificationError(f"{graph} ({precision}): output shape {actual.shape}, torch gives {ref.shape}")
    max_abs = float(np.abs(actual - ref).max())
    cosine = float(self_check.cosine_per_image(ref, actual).min())
    return VerificationRow(graph=graph, precision=precision, inputs=inputs, batch=batch, keep=keep,
                           max_abs_diff=max_abs, cosine=cosine, passed=self_check.passes(graph, precision, max_abs, cosine))


@torch.no_grad()
def verify(mae: ViTEncoder, classifier: ViTClassifier | None, sessions: dict[str, dict[str, ort.InferenceSession]],
           real_images: Tensor | None, seed: int = 0) -> list[VerificationRow]:
    """ORT vs torch for every session, on random and real pixels, B in VERIFY_BATCHES, K in (1, L//4, L)."""
    c = mae.config
    L = c.num_patches
    g = torch.Generator().manual_seed(seed)
    pixel_sets = {"random": torch.randn(max(VERIFY_BATCHES), c.in_chans, c.img_size, c.img_size, generator=g)}
    if real_images is not None:
        pixel_sets["real"] = real_images
    rows = []
    for kind, pixels_all in pixel_sets.items():
        for batch in VERIFY_BATCHES:
            if batch > len(pixels_all):
                continue
            pixels = pixels_all[:batch].contiguous()
            feeds_pixels = pixels.numpy()
            for keep in sorted({1, max(1, L // 4), L}):
                ids_keep, ids_restore = masking_ids(mae, batch, keep, g)
                latent = mae.forward_encoder(pixels, ids_keep)
                pred = mae.forward_decoder(latent, ids_restore) if "decoder" in sessions else None
                for precision, enc in sessions["encoder"].items():
                    ort_latent = enc.run(None, {"pixels": feeds_pixels, "ids_keep": ids_keep.numpy()})[0]
                    rows.append(compare("encoder", precision, kind, batch, keep, latent, ort_latent))
                    if pred is not None:
                        dec = sessions["decoder"][precision]
                        ort_pred = dec.run(None, {"latent": ort_latent, "ids_restore": ids_restore.numpy()})[0]
                        rows.append(compare("encoder+decoder", precision, kind, batch, keep, pred, ort_pred))
            if classifier is not None:
                logits = classifier(pixels)
                for precision, sess in sessions["classifier"].items():
                    rows.append(compare("classifier", precision, kind, batch, None, logits,
                                        sess.run(None, {"pixels": feeds_pixels})[0]))
    order = ["encoder", "encoder+decoder", "classifier"]
    return sorted(rows, key=lambda r: (order.index(r.graph), PRECISIONS.index(r.precision), r.inputs))


def torch_reference(mae: ViTEncoder, classifier: ViTClassifier | None) -> self_check.RunGraph:
    """The torch modules as a (graph, feeds) -> output function, the reference the ONNX graphs are held to."""

    @torch.no_grad()
    def run(graph: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
        args = [torch.from_numpy(np.ascontiguousarray(v)) for v in feeds.values()]
        module = {"encoder": mae.forward_encoder, "decoder": getattr(mae, "forward_decoder", None),
                  "classifier": classifier}[graph]
        return module(*args).numpy()

    return run


def write_self_check(root: Path, mae: ViTEncoder, classifier: ViTClassifier | None,
                     real_images: Tensor | None, seed: int = 1) -> SelfCheckSpec:
    """`selfcheck.npz`: a few real images (random pixels without a data set), masks at K = L, L//4, 1, torch outputs."""
    c = mae.config
    n = self_check.SELF_CHECK_IMAGES
    rng = np.random.default_rng(seed)
    if real_images is not None:
        pixels, kind = real_images[:n].numpy(), "real"
    else:
        pixels, kind = rng.standard_normal((n, c.in_chans, c.img_size, c.img_size)).astype(np.float32), "random"
    cases = {}
    for keep in sorted({c.num_patches, max(1, c.num_patches // 4), 1}, reverse=True):
        ids_shuffle = np.argsort(rng.random((len(pixels), c.num_patches)), axis=1, kind="stable")
        cases[keep] = (ids_shuffle[:, :keep], np.argsort(ids_shuffle, axis=1, kind="stable"))
    graphs = {"encoder"} | ({"decoder"} if isinstance(mae, MaskedAutoencoderViT) else set()) | \
        ({"classifier"} if classifier is not None else set())
    arrays = self_check.reference_arrays(pixels, cases, torch_reference(mae, classifier), graphs)
    path = root / self_check.SELF_CHECK_FILE
    self_check.save(path, arrays)
    return SelfCheckSpec(path=path.name, sha256=sha256_file(path), bytes=path.stat().st_size, images=len(pixels),
                         inputs=kind, reference="torch", keeps=sorted(cases, reverse=True))


def run_self_check(model_dir: ModelDir, sessions: dict[str, dict[str, ort.InferenceSession]]) -> None:
    """Every exported variant on the stored self-check, with the server's checks; raises if one misses its gate."""
    arrays = self_check.load(model_dir.root / model_dir.spec.self_check.path)
    for precision in sessions["encoder"]:
        run = lambda graph, feeds, p=precision: sessions[graph].get(p, sessions[graph]["fp32"]).run(None, feeds)[0]
        results = [self_check.check_encoder(arrays, precision, run)]
        if "decoder" in sessions:
            results.append(self_check.check_chain(arrays, precision, run))
        if "classifier" in sessions:
            results.append(self_check.check_classifier(arrays, precision, run))
        failed = [r for r in results if not r.passed]
        if failed:
            raise ExportVerificationError(f"self-check: {failed[0].graph} {precision} misses its gate "
                                          f"(cosine {failed[0].cosine:.6f}, max_abs_diff {failed[0].max_abs_diff:.2e})")


def embedding_info(ckpt: dict, config) -> Embedding:
    """`/embed`'s default: the pooling the checkpoint's linear probe was measured on (cls without a probe)."""
    probe = ckpt.get("classifier") if ckpt.get("kind") == "probe" else None
    pooling = probe["pooling"] if probe else "cls"
    return Embedding(default_pooling=pooling, dim=config.embed_dim * (2 if pooling == "cls+mean" else 1))


def format_table(rows: Sequence[VerificationRow]) -> str:
    lines = ["| graph | precision | inputs | B | K | max_abs_diff | cosine | ok |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r.graph} | {r.precision} | {r.inputs} | {r.batch} | {'' if r.keep is None else r.keep} | "
              f"{r.max_abs_diff:.2e} | {r.cosine:.6f} | {'yes' if r.passed else 'NO'} |" for r in rows]
    return "\n".join(lines)


def default_real_images(ckpt: dict[str, Any], config: MAEConfig, count: int) -> Tensor | None:
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


def _prepare_out_dir(out: Path) -> None:
    if out.exists() and not (out.is_dir() and ((out / MODEL_JSON).is_file() or not any(out.iterdir()))):
        raise ValueError(f"{out}: exists and is not a model directory; refusing to overwrite it")
    out.parent.mkdir(parents=True, exist_ok=True)


def _move_into_place(tmp: Path, out: Path) -> None:
    """Replace `out` by `tmp` with renames, so a reader sees the old directory or the new one, never half."""
    _prepare_out_dir(out)
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old)


def export_model_dir(checkpoint: str | Path, out_dir: str | Path, classifier_checkpoint: str | Path | None = None,
                     precisions: Sequence[str] = ("fp32",), name: str | None = None, opset: int = DEFAULT_OPSET,
                     verify_data: Tensor | None = None, log: Callable[[str], None] = print) -> Path:
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
    _prepare_out_dir(out)
    ckpt, mae, classifier, cls_ckpt = load_models(checkpoint, classifier_checkpoint)
    config = mae.config
    real_images = verify_data if verify_data is not None else default_real_images(ckpt, config, max(VERIFY_BATCHES))

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the server may run as another user
    try:
        graphs = graph_exports(mae, classifier)
        files: dict[str, dict[str, FileSpec]] = {}
        sessions: dict[str, dict[str, ort.InferenceSession]] = {}
        quiet = ort.SessionOptions()
        quiet.log_severity_level = 3  # fp16 graphs warn that CPU cannot constant-fold fp16 Adds; harmless here
        for graph, spec in graphs.items():
            for precision in precisions:
                t = time.perf_counter()
                path = tmp / variant_name(graph, precision)
                if precision == "fp32":
                    export_graph(spec, path, opset)
                elif precision == "fp16":
                    convert_fp16(tmp / variant_name(graph, "fp32"), path)
                else:
                    quantize_int8(tmp / variant_name(graph, "fp32"), path)
                file_spec = make_file_spec(tmp, path.name, spec.inputs, spec.outputs, external_data_files(path))
                if precision == "int8":
                    file_spec = file_spec.model_copy(update={"quantization": DEFAULT_RECIPE})
                session = ort.InferenceSession(str(path), quiet, providers=["CPUExecutionProvider"])
                check_session_io(file_spec, session)  # also proves B and K came out symbolic
                files.setdefault(graph, {})[precision] = file_spec
                sessions.setdefault(graph, {})[precision] = session
                log(f"mae-export: {path.name} ({file_spec.bytes / 1e6:.1f} MB) in {time.perf_counter() - t:.1f} s")

        t = time.perf_counter()
        rows = verify(mae, classifier, sessions, real_images)
        table = format_table(rows)
        log(table)
        log(f"mae-export: verified {len(rows)} cases in {time.perf_counter() - t:.1f} s")
        failed = [r for r in rows if not r.passed]
        if failed:
            raise ExportVerificationError(
                f"{len(failed)} of {len(rows)} verification cases failed (fp32 max_abs_diff > "
                f"{self_check.FP32_MAX_ABS_DIFF}, or cosine below {self_check.MIN_COSINE}, "
                f"{self_check.MIN_COSINE_CHAINED} for encoder+decoder); "
                f"first: {failed[0].graph} {failed[0].precision} "
                f"B={failed[0].batch} K={failed[0].keep}: max_abs_diff {failed[0].max_abs_diff:.2e}, "
                f"cosine {failed[0].cosine:.6f}")

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
            verification=Verification(fp32_max_abs_diff=self_check.FP32_MAX_ABS_DIFF,
                                      min_cosine=self_check.MIN_COSINE,
                                      min_cosine_chained=self_check.MIN_COSINE_CHAINED, rows=rows),
            self_check=write_self_check(tmp, mae, classifier, real_images),
        )
        write_model_json(tmp, model_json)
        run_self_check(load_model_dir(tmp), sessions)  # the server's own checks, before the directory is visible
        sessions.clear()
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"mae-export: wrote {out} ({', '.join(files)} x {', '.join(precisions)}) in {time.perf_counter() - t0:.0f} s")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("mae-export", description="Export a checkpoint to an ONNX model directory.")
    p.add_argument("--checkpoint", required=True, type=Path, help="mae, encoder or probe checkpoint")
    p.add_argument("--out", required=True, type=Path, help="model directory to write (replaced if it is one)")
    p.add_argument("--classifier", type=Path, default=None,
                   help="fine-tuned (or probe) checkpoint for classifier.onnx (default: the checkpoint's probe head)")
    p.add_argument("--precision", default="fp32", help="comma-separated: fp32 (always), fp16, int8")
    p.add_argument("--name", default=None, help="model name in model.json (default: the training config name)")
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
    export_model_dir(args.checkpoint, args.out, args.classifier, precisions, args.name, args.opset)


def cli(argv: Sequence[str] | None = None) -> None:
    run_cli(main, build_parser(), argv)


if __name__ == "__main__":
    cli()
