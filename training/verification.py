"""The proof of an export: every ONNX variant against a reference, the verification table stored in
model.json, and the self-check file (`selfcheck.npz`) the server reruns on the machine that loads it.

The reference is a `(graph, feeds) -> output` function: the torch modules at export
(`training/graphs.py`), or the directory's own fp32 ONNX graphs when variants are added to a
directory whose checkpoint is not at hand (`mae-export --from-model-dir`; those fp32 graphs were
verified against torch when they were exported).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from model_dir import self_check
from model_dir.schema import (
    PRECISIONS,
    ModelDir,
    SelfCheckSpec,
    TensorSpec,
    Verification,
    VerificationRow,
    sha256_file,
)
from training.variants import Sessions

VERIFY_BATCHES = (1, 3, 8)
CLASSIFIER_ROWS = ("classifier", self_check.FEATURES)  # the rows of the classifier graph's outputs, in order


class ExportVerificationError(ValueError):
    """ONNX Runtime disagreed with the reference beyond the limits; nothing was written."""


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
                expected = {"classifier": reference("classifier", {"pixels": pixels})}
                for precision, sess in sessions["classifier"].items():
                    outputs = dict(zip(CLASSIFIER_ROWS, sess.run(None, {"pixels": pixels}), strict=False))
                    for graph, actual in outputs.items():  # logits, and features when the graph has them
                        if graph not in expected:
                            expected[graph] = reference(graph, {"pixels": pixels})
                        rows.append(compare(graph, precision, kind, batch, None, expected[graph], actual))
    order = ["encoder", "encoder+decoder", *CLASSIFIER_ROWS]
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


def pixel_sets(shape: tuple[int, int, int], real_images: np.ndarray | None) -> dict[str, np.ndarray]:
    """The inputs of the verification: random pixels always, real images [N, C, H, W] when there are some."""
    sets = {"random": np.random.default_rng(0).standard_normal((max(VERIFY_BATCHES), *shape))}
    if real_images is not None:
        sets["real"] = real_images
    return sets


def verify_all(reference: self_check.RunGraph, sessions: Sessions, pixels: Mapping[str, np.ndarray],
               num_patches: int, log: Callable[[str], None]) -> list[VerificationRow]:
    """`verify`, the table logged, and ExportVerificationError when a row misses its limit."""
    rows = verify(reference, sessions, pixels, num_patches)
    log(format_table(rows))
    check_rows(rows)
    return rows


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
        def run(name: str, feeds: dict[str, np.ndarray], p: str = precision) -> np.ndarray:
            graph, output = self_check.graph_output(name)
            return sessions[graph].get(p, sessions[graph]["fp32"]).run(output and [output], feeds)[0]

        results = [self_check.check_encoder(arrays, precision, run)]
        if "decoder" in sessions:
            results.append(self_check.check_chain(arrays, precision, run))
        if "classifier" in sessions:
            results.append(self_check.check_classifier(arrays, precision, run))
        if "features" in arrays:
            results.append(self_check.check_features(arrays, precision, run))
        failed = [r for r in results if not r.passed]
        if failed:
            raise ExportVerificationError(f"self-check: {failed[0].graph} {precision} misses its gate "
                                          f"(cosine {failed[0].cosine:.6f}, max_abs_diff {failed[0].max_abs_diff:.2e})")


def session_reference(sessions: Mapping[str, ort.InferenceSession]) -> self_check.RunGraph:
    """ONNX Runtime sessions (the fp32 graphs of a directory) as the reference function (`classifier.features`:
    the classifier graph's `features` output)."""

    def run(name: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
        graph, output = self_check.graph_output(name)
        return sessions[graph].run(output and [output], feeds)[0]

    return run


def checked_outputs(outputs: Mapping[str, Sequence[TensorSpec]]) -> set[str]:
    """The graphs (and the classifier's features output) the self-check stores, from each graph's outputs."""
    classifier = [t.name for t in outputs.get("classifier", [])]
    return set(outputs) | ({self_check.FEATURES} if classifier[1:] == ["features"] else set())
