"""`mae-export`: a checkpoint -> a model directory (ONNX graphs + model.json), verified against torch.

The graphs take index tensors, never draw random numbers: `encoder.onnx` (pixels, ids_keep ->
latent), `decoder.onnx` (latent, ids_restore -> pred) and, when there is a head,
`classifier.onnx` (pixels -> logits), with the batch B and kept-token count K as dynamic axes.
fp16 (GPU) and int8 (CPU) variants are derived from the fp32 files. Every variant is run in ONNX
Runtime against torch before the directory appears; the figures go into `model.json`.

This module is the orchestration; the pieces are `training/graphs.py` (the torch graphs and their
ONNX export), `training/variants.py` (fp16 / int8 files), `training/verification.py` (the proof)
and `training/model_json.py` (what model.json says about the model).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from model import Checkpoint, CheckpointError, MAEConfig, ViTClassifier
from model.mae import ViTEncoder
from model_dir.schema import (
    MODEL_JSON,
    PRECISIONS,
    Architecture,
    FileSpec,
    ModelJson,
    SelfCheckSpec,
    Verification,
    load_model_dir,
    write_model_json,
)
from training.cli import run_cli
from training.data import FASHION_MNIST_DIR, build_dataset
from training.graphs import DEFAULT_OPSET, OPSETS, GraphExport, export_graph, graph_exports, torch_reference
from training.model_json import describe, model_version
from training.quantize import DEFAULT_RECIPE, RECIPES
from training.variants import Sessions, add_variant, cpu_session, declare, variant_name
from training.verification import (
    VERIFY_BATCHES,
    check_rows,
    checked_outputs,
    pixel_sets,
    run_self_check,
    session_reference,
    verification,
    verify,
    verify_all,
    write_self_check,
)
from training.weights import build_modules, recover_weights, write_weights


def load_models(checkpoint: str | Path, classifier_checkpoint: str | Path | None
                ) -> tuple[Checkpoint, ViTEncoder, ViTClassifier | None, Checkpoint | None]:
    """(checkpoint, autoencoder, classifier or None, classifier checkpoint or None); bad combinations raise."""
    ckpt = Checkpoint.load(checkpoint)
    if ckpt.kind == "finetune":
        raise CheckpointError(f"{checkpoint}: a fine-tuned classifier has no MAE encoder latent to export; "
                              "pass the pretrained checkpoint and this one as --classifier")
    mae = ckpt.autoencoder(str(checkpoint))
    if classifier_checkpoint is None:
        return ckpt, mae, ckpt.classifier_model(str(checkpoint)), None
    cls_ckpt = Checkpoint.load(classifier_checkpoint)
    classifier = cls_ckpt.classifier_model(str(classifier_checkpoint))
    if classifier is None:
        raise CheckpointError(f"{classifier_checkpoint}: carries no classifier (kind {cls_ckpt.kind!r})")
    mine, theirs = ckpt.config.to_dict(), cls_ckpt.config.to_dict()
    mine.pop("norm_pix_loss"), theirs.pop("norm_pix_loss")
    if mine != theirs:
        raise CheckpointError(f"{classifier_checkpoint}: architecture differs from {checkpoint}")
    return ckpt, mae, classifier, cls_ckpt


def default_real_images(dataset: str | None, config: MAEConfig | Architecture, count: int) -> Tensor | None:
    """A few test images of the model's data set when it is Fashion-MNIST and on disk, else None."""
    if dataset != "fashion-mnist" or config.in_chans != 1 or not FASHION_MNIST_DIR.is_dir():
        return None
    try:
        ds = build_dataset("fashion-mnist", "test", config.img_size, config.in_chans, train=False, limit=count)
    except FileNotFoundError:
        return None
    return torch.stack([ds[i][0] for i in range(len(ds))])


@contextlib.contextmanager
def staging_dir(out: Path) -> Iterator[Path]:
    """A fresh directory beside `out` to build the new one in; removed again when anything fails."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the server may run as another user
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def prepare_out_dir(out: Path) -> None:
    """Refuse to replace anything but a model directory (or an empty one); make its parent."""
    if out.exists() and not (out.is_dir() and ((out / MODEL_JSON).is_file() or not any(out.iterdir()))):
        raise ValueError(f"{out}: exists and is not a model directory; refusing to overwrite it")
    out.parent.mkdir(parents=True, exist_ok=True)


def move_into_place(tmp: Path, out: Path) -> None:
    """Replace `out` by `tmp` with renames, so a reader sees the old directory or the new one, never half."""
    prepare_out_dir(out)
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old)


def publish(tmp: Path, out: Path, spec: ModelJson, sessions: Sessions) -> None:
    """Write model.json into `tmp`, run the server's loader and self-check there, then move `tmp` to `out`."""
    write_model_json(tmp, spec)
    run_self_check(load_model_dir(tmp), sessions)  # the server's own checks, before the directory is visible
    sessions.clear()  # close the sessions before their files move
    move_into_place(tmp, out)


def export_graphs(root: Path, graphs: dict[str, GraphExport], precisions: Sequence[str], opset: int,
                  int8_recipe: str, log: Callable[[str], None]) -> tuple[dict[str, dict[str, FileSpec]], Sessions]:
    """Every graph in every precision into `root`: the model.json entries and a checked CPU session of each."""
    files: dict[str, dict[str, FileSpec]] = {}
    sessions: Sessions = {}
    for graph, spec in graphs.items():
        for precision in precisions:
            t = time.perf_counter()
            if precision == "fp32":
                export_graph(spec, root / variant_name(graph, precision), opset)
                file_spec, session = declare(root, variant_name(graph, precision), spec.inputs, spec.outputs)
            else:
                file_spec, session = add_variant(root, graph, precision, spec.inputs, spec.outputs, int8_recipe)
            files.setdefault(graph, {})[precision] = file_spec
            sessions.setdefault(graph, {})[precision] = session
            log(f"mae-export: {file_spec.path} ({file_spec.bytes / 1e6:.1f} MB) in {time.perf_counter() - t:.1f} s")
    return files, sessions


def export_model_dir(checkpoint: str | Path, out_dir: str | Path, classifier_checkpoint: str | Path | None = None,
                     precisions: Sequence[str] = ("fp32",), name: str | None = None, opset: int = DEFAULT_OPSET,
                     verify_data: Tensor | None = None, log: Callable[[str], None] = print,
                     int8_recipe: str = DEFAULT_RECIPE, weights: bool = True) -> Path:
    """Export, verify and write the model directory `out_dir`; returns its path.

    fp32 is always exported (the other precisions derive from it). `verify_data`: real normalized
    images [N, C, H, W] for the verification (default: Fashion-MNIST test images when the checkpoint
    was trained on it and they are on disk; random pixels are always used too). Raises
    CheckpointError / ValueError on bad input and ExportVerificationError when ORT disagrees with
    torch; in every failure no directory is left at `out_dir`. `weights`: also write `weights.safetensors` (the
    torch engine's weights; without it, it reads them back from the fp32 graphs).
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
    real = verify_data if verify_data is not None else default_real_images(ckpt.data.get("dataset"), config,
                                                                            max(VERIFY_BATCHES))

    def spec_of(tmp: Path, files: dict[str, dict[str, FileSpec]], checked: Verification,
                self_check: SelfCheckSpec) -> ModelJson:
        return describe(ckpt=ckpt, cls_ckpt=cls_ckpt, classifier=classifier, name=name, checkpoint=checkpoint,
                        files=files, verification=checked, self_check=self_check,
                        weights=write_weights(tmp, {"autoencoder": mae, "classifier": classifier}) if weights else None)

    graphs = build_model_dir(out, mae, classifier, precisions, opset, int8_recipe,
                             None if real is None else real.numpy(), spec_of, log)
    log(f"mae-export: wrote {out} ({', '.join(graphs)} x {', '.join(precisions)}) in {time.perf_counter() - t0:.0f} s")
    return out


SpecOf = Callable[[Path, dict[str, dict[str, FileSpec]], Verification, SelfCheckSpec], ModelJson]


def build_model_dir(out: Path, mae: ViTEncoder, classifier: ViTClassifier | None, precisions: Sequence[str],
                    opset: int, int8_recipe: str, real: np.ndarray | None, spec_of: SpecOf,
                    log: Callable[[str], None]) -> list[str]:
    """Export the torch modules' graphs in every precision, verify them against torch, write the self-check and
    publish `out` atomically; `spec_of(staging dir, files, verification, self-check)` gives model.json.
    Returns the graphs written."""
    config = mae.config
    with staging_dir(out) as tmp:
        graphs = graph_exports(mae, classifier)
        files, sessions = export_graphs(tmp, graphs, precisions, opset, int8_recipe, log)
        t = time.perf_counter()
        reference = torch_reference(mae, classifier)
        shape = (config.in_chans, config.img_size, config.img_size)
        rows = verify_all(reference, sessions, pixel_sets(shape, real), config.num_patches, log)
        log(f"mae-export: verified {len(rows)} cases in {time.perf_counter() - t:.1f} s")
        self_check = write_self_check(tmp, reference, "torch", checked_outputs({g: s.outputs for g, s in graphs.items()}),
                                      shape, config.num_patches, real)
        publish(tmp, out, spec_of(tmp, files, verification(rows), self_check), sessions)
    return list(graphs)


def reexport_model_dir(src_dir: str | Path, out_dir: str | Path, real_images: np.ndarray | None,
                       log: Callable[[str], None] = print, opset: int = DEFAULT_OPSET) -> Path:
    """Export a model directory's graphs again from the weights in its fp32 graphs, its checkpoint not at hand.

    The weights are recovered as the torch engine recovers them (`training/weights.py`) and must reproduce the
    old fp32 graphs' outputs; the new graphs carry what this exporter adds (the classifier's `features`
    output). Name, labels, preprocessing, training facts, precisions and int8 recipe stay; the files,
    verification (against torch on the recovered weights), self-check and version are new. Written atomically.
    """
    src = load_model_dir(src_dir)
    out = Path(out_dir).resolve()
    prepare_out_dir(out)
    modules = build_modules(src)
    state = recover_weights(src, modules)
    for role, module in modules.items():
        module.load_state_dict(state[role], strict=True)
        module.eval()
    mae, classifier = modules["autoencoder"], modules.get("classifier")
    a = src.spec.architecture
    old = {g: {"fp32": cpu_session(src.path(g))} for g in src.spec.files}
    check_rows(verify(torch_reference(mae, classifier), old, pixel_sets((a.in_chans, a.img_size, a.img_size),
                                                                        real_images), a.num_patches))
    precisions = [p for p in PRECISIONS if p in src.precisions("encoder")]
    recipes = {f.quantization for by_precision in src.spec.files.values() for f in by_precision.values()
               if f.quantization}
    if len(recipes) > 1:
        raise ValueError(f"{src.root}: int8 graphs of different recipes {sorted(recipes)}; re-export one at a time")
    int8_recipe = recipes.pop() if recipes else DEFAULT_RECIPE

    def spec_of(tmp: Path, files: dict[str, dict[str, FileSpec]], checked: Verification,
                self_check: SelfCheckSpec) -> ModelJson:
        info = src.spec.classifier
        return src.spec.model_copy(update={
            "version": model_version(files), "files": files, "verification": checked,
            "self_check": self_check, "classifier": info and info.model_copy(update={"features": True}),
            "weights": write_weights(tmp, modules) if src.spec.weights is not None else None})

    build_model_dir(out, mae, classifier, precisions, opset, int8_recipe, real_images, spec_of, log)
    log(f"mae-export: wrote {out}, re-exported from the fp32 graphs of {src.root}")
    return out


def derive_variants(src_dir: str | Path, out_dir: str | Path, precisions: Sequence[str],
                    real_images: np.ndarray | None, log: Callable[[str], None] = print,
                    int8_recipe: str = DEFAULT_RECIPE) -> Path:
    """Add `precisions` variants and a self-check to a model directory whose checkpoint is not at hand.

    The directory's fp32 graphs are the reference (they were verified against torch at export, and those
    rows are kept); the self-check records that (`reference: onnxruntime-fp32`). Written atomically.
    """
    src = load_model_dir(src_dir)
    out = Path(out_dir).resolve()
    wanted = [p for p in PRECISIONS[1:] if p in precisions]
    with staging_dir(out) as tmp:
        shutil.copytree(src.root, tmp, dirs_exist_ok=True)
        tmp.chmod(0o755)  # copytree gave it the source directory's mode
        files = {g: dict(by_precision) for g, by_precision in src.spec.files.items()}
        fp32 = {g: cpu_session(tmp / files[g]["fp32"].path) for g in files}
        new: Sessions = {g: {} for g in files}
        for graph, precision in ((g, p) for g in files for p in wanted):
            t = time.perf_counter()
            files[graph][precision], new[graph][precision] = add_variant(
                tmp, graph, precision, files[graph]["fp32"].inputs, files[graph]["fp32"].outputs, int8_recipe)
            log(f"mae-export: {variant_name(graph, precision)} ({files[graph][precision].bytes / 1e6:.1f} MB) "
                f"in {time.perf_counter() - t:.1f} s")
        a = src.spec.architecture
        shape = (a.in_chans, a.img_size, a.img_size)
        rows = verify_all(session_reference(fp32), new, pixel_sets(shape, real_images), a.num_patches, log)
        kept = [r for r in (src.spec.verification.rows if src.spec.verification else []) if r.precision not in wanted]
        spec = src.spec.model_copy(update={
            "files": files, "verification": verification(kept + rows),
            "self_check": write_self_check(tmp, session_reference(fp32), "onnxruntime-fp32",
                                           checked_outputs({g: files[g]["fp32"].outputs for g in files}), shape,
                                           a.num_patches, real_images)})
        publish(tmp, out, spec, {g: {"fp32": fp32.pop(g), **new.pop(g)} for g in files})
    log(f"mae-export: wrote {out} with {', '.join(wanted)} variants derived from {src.root}")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("mae-export", description="Export a checkpoint to an ONNX model directory.")
    source = p.add_mutually_exclusive_group()  # one of them, checked in main (a config file may give it)
    source.add_argument("--checkpoint", type=Path, help="mae, encoder or probe checkpoint")
    source.add_argument("--from-model-dir", type=Path, default=None,
                        help="add the --precision variants and a self-check to this model directory, without its "
                        "checkpoint: its fp32 graphs are the reference (--out may be the same directory)")
    p.add_argument("--reexport", action="store_true",
                   help="with --from-model-dir: export its graphs again from the weights in its fp32 graphs (same "
                   "name, labels, training facts, precisions and int8 recipe), so they gain what this exporter "
                   "adds, such as the classifier's features output; --precision does not apply")
    p.add_argument("--out", required=True, type=Path, help="model directory to write (replaced if it is one)")
    p.add_argument("--classifier", type=Path, default=None,
                   help="fine-tuned (or probe) checkpoint for classifier.onnx (default: the checkpoint's probe head)")
    p.add_argument("--precision", default="fp32", help="comma-separated: fp32 (always), fp16, int8")
    p.add_argument("--name", default=None, help="model name in model.json (default: the training config name)")
    p.add_argument("--int8-recipe", default=DEFAULT_RECIPE, choices=[r.name for r in RECIPES.values()
                                                                     if r.mode == "dynamic"],
                   help="int8 quantization (training/quantize.py; the README's int8 table measures each on CPUs with "
                   "and without VNNI); the default holds its gate on both kinds")
    p.add_argument("--no-weights", dest="weights", action="store_false",
                   help="leave out weights.safetensors (the torch engine then reads the weights back from the fp32 "
                   "graphs, checked at startup); the bundled model does, to stay small")
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
    if args.reexport and args.from_model_dir is None:
        raise ValueError("--reexport needs --from-model-dir")
    if args.from_model_dir is not None:
        spec = load_model_dir(args.from_model_dir).spec
        real = default_real_images(spec.training.dataset, spec.architecture, max(VERIFY_BATCHES))
        if args.reexport:
            reexport_model_dir(args.from_model_dir, args.out, None if real is None else real.numpy(), opset=args.opset)
            return
        derive_variants(args.from_model_dir, args.out, precisions, None if real is None else real.numpy(),
                        int8_recipe=args.int8_recipe)
        return
    export_model_dir(args.checkpoint, args.out, args.classifier, precisions, args.name, args.opset,
                     int8_recipe=args.int8_recipe, weights=args.weights)


def cli(argv: Sequence[str] | None = None) -> None:
    run_cli(main, build_parser(), argv)


if __name__ == "__main__":
    cli()
