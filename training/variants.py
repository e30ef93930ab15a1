"""Precision variants of exported graphs and their proof: fp16 and int8 files, verification against a
reference, and the stored self-check the server reruns on the machine that loads the directory.

The reference is a `(graph, feeds) -> output` function: the torch modules at export
(`training/export.py`), or the directory's own fp32 ONNX graphs when variants are added to a
directory whose checkpoint is not at hand (`derive_variants`; those fp32 graphs were verified
against torch when they were exported).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from model_dir import self_check
from model_dir.schema import (
    MODEL_JSON,
    PRECISIONS,
    FileSpec,
    ModelDir,
    ModelJson,
    SelfCheckSpec,
    TensorSpec,
    Verification,
    VerificationRow,
    check_session_io,
    load_model_dir,
    make_file_spec,
    sha256_file,
    write_model_json,
)
from training.quantize import DEFAULT_RECIPE, quantize_int8

VERIFY_BATCHES = (1, 3, 8)
# Protobuf cannot hold a model over 2 GiB; above this many bytes of weights they go to a file beside the graph.
EXTERNAL_DATA_BYTES = 3 << 29  # 1.5 GiB
Sessions = dict[str, dict[str, ort.InferenceSession]]  # graph -> precision -> session


class ExportVerificationError(ValueError):
    """ONNX Runtime disagreed with the reference beyond the limits; nothing was written."""


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


def masking_cases(num_patches: int, batch: int, rng: np.random.Generator) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """K -> (ids_keep [B, K], ids_restore [B, L]) for K = L, L//4, 1: random masks, lowest noise kept."""
    cases = {}
    for keep in sorted({num_patches, max(1, num_patches // 4), 1}, reverse=True):
        ids_shuffle = np.argsort(rng.random((batch, num_patches)), axis=1, kind="stable")
        cases[keep] = (ids_shuffle[:, :keep].astype(np.int64),
                       np.argsort(ids_shuffle, axis=1, kind="stable").astype(np.int64))
    return cases


def compare(graph: str, precision: str, inputs: str, batch: int, keep: int | None,
            expected: np.ndarray, actual: np.ndarray) -> VerificationRow:
    if actual.shape != expected.shape:
        raise ExportVerificationError(f"{graph} ({precision}): output shape {actual.shape}, "
                                      f"the reference gives {expected.shape}")
    max_abs = float(np.abs(actual - expected).max())
    cosine = float(self_check.cosine_per_image(expected, actual).min())
    return VerificationRow(graph=graph, precision=precision, inputs=inputs, batch=batch, keep=keep,
                           max_abs_diff=max_abs, cosine=cosine,
                           passed=self_check.passes(graph, precision, max_abs, cosine))


def verify(reference: self_check.RunGraph, sessions: Sessions, pixel_sets: Mapping[str, np.ndarray],
           num_patches: int, seed: int = 0) -> list[VerificationRow]:
    """Every session against the reference, per pixel set, B in VERIFY_BATCHES, K in (L, L//4, 1)."""
    rng = np.random.default_rng(seed)
    rows = []
    for kind, pixels_all in pixel_sets.items():
        for batch in (b for b in VERIFY_BATCHES if b <= len(pixels_all)):
            pixels = np.ascontiguousarray(pixels_all[:batch], dtype=np.float32)
            for keep, (ids_keep, ids_restore) in masking_cases(num_patches, batch, rng).items():
                latent = reference("encoder", {"pixels": pixels, "ids_keep": ids_keep})
                pred = reference("decoder", {"latent": latent, "ids_restore": ids_restore}) \
                    if "decoder" in sessions else None
                for precision, enc in sessions["encoder"].items():
                    ort_latent = enc.run(None, {"pixels": pixels, "ids_keep": ids_keep})[0]
                    rows.append(compare("encoder", precision, kind, batch, keep, latent, ort_latent))
                    if pred is not None and precision in sessions["decoder"]:
                        ort_pred = sessions["decoder"][precision].run(
                            None, {"latent": ort_latent, "ids_restore": ids_restore})[0]
                        rows.append(compare("encoder+decoder", precision, kind, batch, keep, pred, ort_pred))
            if "classifier" in sessions:
                logits = reference("classifier", {"pixels": pixels})
                for precision, sess in sessions["classifier"].items():
                    rows.append(compare("classifier", precision, kind, batch, None, logits,
                                        sess.run(None, {"pixels": pixels})[0]))
    order = ["encoder", "encoder+decoder", "classifier"]
    return sorted(rows, key=lambda r: (order.index(r.graph), PRECISIONS.index(r.precision), r.inputs))


def check_rows(rows: Sequence[VerificationRow]) -> None:
    failed = [r for r in rows if not r.passed]
    if failed:
        f = failed[0]
        raise ExportVerificationError(
            f"{len(failed)} of {len(rows)} verification cases failed (fp32 max_abs_diff > "
            f"{self_check.FP32_MAX_ABS_DIFF}, or cosine below {self_check.MIN_COSINE}, "
            f"{self_check.MIN_COSINE_CHAINED} for encoder+decoder); first: {f.graph} {f.precision} "
            f"B={f.batch} K={f.keep}: max_abs_diff {f.max_abs_diff:.2e}, cosine {f.cosine:.6f}")


def verification(rows: list[VerificationRow]) -> Verification:
    return Verification(fp32_max_abs_diff=self_check.FP32_MAX_ABS_DIFF, min_cosine=self_check.MIN_COSINE,
                        min_cosine_chained=self_check.MIN_COSINE_CHAINED, rows=rows)


def format_table(rows: Sequence[VerificationRow]) -> str:
    lines = ["| graph | precision | inputs | B | K | max_abs_diff | cosine | ok |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r.graph} | {r.precision} | {r.inputs} | {r.batch} | {'' if r.keep is None else r.keep} | "
              f"{r.max_abs_diff:.2e} | {r.cosine:.6f} | {'yes' if r.passed else 'NO'} |" for r in rows]
    return "\n".join(lines)


def write_self_check(root: Path, reference: self_check.RunGraph, reference_name: str, graphs: set[str],
                     shape: tuple[int, int, int], num_patches: int, real_images: np.ndarray | None,
                     seed: int = 1) -> SelfCheckSpec:
    """`selfcheck.npz`: a few real images (random pixels without a data set), masks at K = L, L//4, 1, and
    the reference outputs; returns its model.json entry."""
    n = self_check.SELF_CHECK_IMAGES
    rng = np.random.default_rng(seed)
    if real_images is not None:
        pixels, kind = np.asarray(real_images[:n], dtype=np.float32), "real"
    else:
        pixels, kind = rng.standard_normal((n, *shape)).astype(np.float32), "random"
    cases = masking_cases(num_patches, len(pixels), rng)
    path = root / self_check.SELF_CHECK_FILE
    self_check.save(path, self_check.reference_arrays(pixels, cases, reference, graphs))
    return SelfCheckSpec(path=path.name, sha256=sha256_file(path), bytes=path.stat().st_size, images=len(pixels),
                         inputs=kind, reference=reference_name, keeps=sorted(cases, reverse=True))


def run_self_check(model_dir: ModelDir, sessions: Sessions) -> None:
    """Every variant on the stored self-check, with the server's checks; raises if one misses its gate."""
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


def prepare_out_dir(out: Path) -> None:
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


def session_reference(sessions: Mapping[str, ort.InferenceSession]) -> self_check.RunGraph:
    return lambda graph, feeds: sessions[graph].run(None, feeds)[0]


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
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        shutil.copytree(src.root, tmp, dirs_exist_ok=True)
        tmp.chmod(0o755)
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
        pixel_sets = {"random": np.random.default_rng(0).standard_normal((max(VERIFY_BATCHES), *shape))}
        if real_images is not None:
            pixel_sets["real"] = real_images
        rows = verify(session_reference(fp32), new, pixel_sets, a.num_patches)
        log(format_table(rows))
        check_rows(rows)
        kept = [r for r in (src.spec.verification.rows if src.spec.verification else []) if r.precision not in wanted]
        spec = src.spec.model_copy(update={
            "files": files, "verification": verification(kept + rows),
            "self_check": write_self_check(tmp, session_reference(fp32), "onnxruntime-fp32", set(files), shape,
                                           a.num_patches, real_images)})
        publish(tmp, out, spec, {g: {"fp32": fp32.pop(g), **new.pop(g)} for g in files})
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"mae-export: wrote {out} with {', '.join(wanted)} variants derived from {src.root}")
    return out
