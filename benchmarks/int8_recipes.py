"""int8 recipes side by side: encoder-latent cosine against fp32 and int8/fp32 speed, on this CPU and on an emulated one.

For each model (the bundled one, and a ViT-B/16-shaped MAE with random weights) every recipe of
`training/quantize.py` quantizes the fp32 encoder; static recipes calibrate on training-split
images. Then, on real test images (`tests/fixtures/fmnist`, upscaled to RGB 224 for ViT-B) at K = L,
L//4 and 1 kept patches, the per-image cosine of the int8 latent against the fp32 ONNX Runtime
latent (itself within 1e-4 of torch, see mae-export's verification), and the median time of a batch
of 8 (fp32 and int8 interleaved).

With `--emulate` the cosine stage runs again under `qemu-x86_64 -cpu EPYC-Milan-v1`: an AMD Zen 3
without AVX-512 or VNNI, so ONNX Runtime takes its AVX2 integer kernels (VPMADDUBSW, saturating),
as on such a machine. Emulated floating point is very slow, so that stage reads the fp32 latents
computed natively and runs only the int8 graphs (emulated timings are not reported).

    .venv/bin/python -m benchmarks.int8_recipes [--models default,vitb] [--emulate] [--emulate-images 8]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from model_dir.self_check import cosine_per_image, cpu_features

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "fmnist"
RESULTS = Path(__file__).resolve().parent / "results" / "int8_recipes.json"
EMULATED_CPU = "EPYC-Milan-v1"


def session(path: Path, threads: int = 0) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


# ---- preparation (native, with torch): fp32 graph, inputs, int8 graphs -------------------------------------

MODELS = {"default": None, "vitb": "mae_vit_base_patch16", "test": "mae_vit_test"}  # test: the suite's fixture


def prepare_model(name: str, work: Path) -> tuple[Path, Any, int]:
    """The fp32 encoder of `name` in `work`, its model.json preprocessing and its patch count L.

    `default` is the bundled model; the others are random-init MAEs (seed 0, as the test fixture).
    """
    from model_dir.schema import Preprocessing, load_model_dir

    if name == "default":
        model_dir = load_model_dir(ROOT / "service" / "default_model")
        shutil.copy(model_dir.path("encoder"), work / "encoder.onnx")
        return work / "encoder.onnx", model_dir.spec.preprocessing, model_dir.spec.architecture.num_patches
    import torch

    from model import MaskedAutoencoderViT, get_config
    from model.stats import FASHION_MNIST_MEAN, FASHION_MNIST_STD, IMAGENET_MEAN, IMAGENET_STD
    from training.export import quiet_library_logs
    from training.graphs import export_graph, graph_exports

    quiet_library_logs()
    torch.manual_seed(0)
    config = get_config(MODELS[name])
    mae = MaskedAutoencoderViT(config).eval()
    export_graph(graph_exports(mae, None)["encoder"], work / "encoder.onnx", 20)
    rgb = config.in_chans == 3
    prep = Preprocessing(resize=config.img_size, crop=config.img_size, channels="RGB" if rgb else "L",
                         mean=list(IMAGENET_MEAN if rgb else FASHION_MNIST_MEAN),
                         std=list(IMAGENET_STD if rgb else FASHION_MNIST_STD))
    return work / "encoder.onnx", prep, config.num_patches


def model_pixels(pngs: list[bytes], prep: Any) -> np.ndarray:
    from service.imaging import load_model_image

    return np.stack([load_model_image(data, prep, 1 << 30).pixels for data in pngs])


def test_images(count: int) -> list[bytes]:
    return [p.read_bytes() for p in sorted(FIXTURE.glob("test_*.png"))[:count]]


def train_images(count: int) -> list[bytes]:
    """Calibration images from the training split (Debian's dataset-fashion-mnist), encoded as PNG."""
    import io

    from PIL import Image

    from training.data import load_fashion_mnist

    images, _ = load_fashion_mnist("train")
    picks = np.random.default_rng(0).choice(len(images), count, replace=False)
    out = []
    for i in picks:
        buf = io.BytesIO()
        Image.fromarray(images[i, 0].numpy()).save(buf, "PNG")
        out.append(buf.getvalue())
    return out


def masks(num_patches: int, count: int, seed: int = 0) -> dict[int, np.ndarray]:
    """ids_keep [count, K] for K = L, L//4 and 1: random subsets, as /reconstruct draws them."""
    rng = np.random.default_rng(seed)
    out = {}
    for keep in sorted({num_patches, max(1, num_patches // 4), 1}, reverse=True):
        out[keep] = np.stack([np.sort(rng.permutation(num_patches)[:keep]) for _ in range(count)]).astype(np.int64)
    return out


def prepare(args: argparse.Namespace, name: str, work: Path) -> dict[str, Any]:
    """fp32 graph, eval and calibration inputs, fp32 reference latents, and every recipe's int8 graph."""
    from training.quantize import RECIPES, quantize_int8

    fp32, prep, L = prepare_model(name, work)
    pixels = model_pixels(test_images(args.images), prep)
    calib = model_pixels(train_images(args.calibration_images), prep)
    ids = masks(L, len(pixels))
    calib_ids = masks(L, len(calib), seed=1)
    calibration = [{"pixels": calib[i:i + 8], "ids_keep": calib_ids[k][i:i + 8]}
                   for k in calib_ids for i in range(0, len(calib), 8)]
    ref = session(fp32)
    arrays = {"pixels": pixels}
    for keep, ids_keep in ids.items():
        arrays[f"ids_keep_{keep}"] = ids_keep
        arrays[f"latent_{keep}"] = np.concatenate([
            ref.run(None, {"pixels": pixels[i:i + 8], "ids_keep": ids_keep[i:i + 8]})[0]
            for i in range(0, len(pixels), 8)])
    np.savez(work / "inputs.npz", **arrays)
    quantize_s = {}
    for recipe in args.recipes:
        t = time.perf_counter()
        quantize_int8(fp32, work / f"{recipe}.onnx", recipe, calibration if RECIPES[recipe].mode == "static" else None)
        quantize_s[recipe] = time.perf_counter() - t
    return {"num_patches": L, "keeps": sorted(ids, reverse=True), "quantize_s": quantize_s,
            "fp32_bytes": fp32.stat().st_size,
            "int8_bytes": {r: (work / f"{r}.onnx").stat().st_size for r in args.recipes}}


# ---- measurement (torch-free; also runs under emulation) ---------------------------------------------------

def measure(work: Path, recipes: list[str], images: int, batch: int) -> dict[str, Any]:
    """Per recipe and K: min and mean cosine of the int8 latent against the stored fp32 one."""
    data = np.load(work / "inputs.npz")
    keeps = sorted((int(k.split("_")[-1]) for k in data.files if k.startswith("ids_keep_")), reverse=True)
    out: dict[str, Any] = {}
    for recipe in recipes:
        sess = session(work / f"{recipe}.onnx")
        per_keep = {}
        for keep in keeps:
            pixels, ids_keep, ref = data["pixels"][:images], data[f"ids_keep_{keep}"][:images], data[f"latent_{keep}"]
            cos = np.concatenate([cosine_per_image(ref[i:i + batch], sess.run(None, {
                "pixels": pixels[i:i + batch], "ids_keep": ids_keep[i:i + batch]})[0]) for i in range(0, len(pixels), batch)])
            per_keep[str(keep)] = {"min": float(cos.min()), "mean": float(cos.mean()), "images": len(cos)}
        out[recipe] = {"by_keep": per_keep, "min": min(v["min"] for v in per_keep.values()),
                       "mean": float(np.mean([v["mean"] for v in per_keep.values()]))}
    return out


def speed(work: Path, recipes: list[str], batch: int, runs: int) -> dict[str, Any]:
    """Median seconds of one batch at K = L for fp32 and each recipe, interleaved round by round."""
    data = np.load(work / "inputs.npz")
    L = max(int(k.split("_")[-1]) for k in data.files if k.startswith("ids_keep_"))
    feeds = {"pixels": data["pixels"][:batch], "ids_keep": data[f"ids_keep_{L}"][:batch]}
    from benchmarks.export_vitb import time_sessions  # imports torch: not in the emulated child

    sessions = {"fp32": session(work / "encoder.onnx"), **{r: session(work / f"{r}.onnx") for r in recipes}}
    times = time_sessions(sessions, feeds, runs)
    medians = {k: float(np.median(v)) for k, v in times.items()}
    return {"batch": batch, "runs": runs, "median_s": medians,
            "speedup_vs_fp32": {r: medians["fp32"] / medians[r] for r in recipes}}


def emulated(work: Path, recipes: list[str], images: int, batch: int) -> dict[str, Any] | None:
    """`measure` in a child process under qemu-x86_64 as a CPU without AVX-512 and VNNI."""
    qemu = shutil.which("qemu-x86_64")
    if qemu is None:
        print("int8_recipes: qemu-x86_64 not found (Debian's qemu-user); no emulated stage", file=sys.stderr)
        return None
    cmd = [qemu, "-cpu", EMULATED_CPU, sys.executable, "-m", "benchmarks.int8_recipes", "--measure-only", str(work),
           "--recipes", ",".join(recipes), "--emulate-images", str(images), "--batch", str(batch)]
    t = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"emulated stage failed ({done.returncode}): {done.stderr[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {"cpu": EMULATED_CPU, "emulator": "qemu-x86_64 (TCG)", "wall_s": time.perf_counter() - t, **result}


def table(results: dict[str, Any]) -> str:
    host = results["cpu"]
    lines = [f"| model | recipe | {host['model']} ({', '.join(host['flags'])}) min / mean | "
             f"emulated {EMULATED_CPU} (avx2, no VNNI) min / mean | int8/fp32 speed, B={results['batch']} |",
             "|---|---|---|---|---|"]
    for model, r in results["models"].items():
        for recipe, m in r["native"].items():
            emu = (r.get("emulated") or {}).get("cosine", {}).get(recipe)
            emu_s = f"{emu['min']:.5f} / {emu['mean']:.5f} ({emu['by_keep'][str(r['keeps'][0])]['images']} img)" \
                if emu else "not run"
            lines.append(f"| {model} | {recipe} | {m['min']:.5f} / {m['mean']:.5f} | {emu_s} | "
                         f"{r['speed']['speedup_vs_fp32'][recipe]:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    from training.quantize import RECIPES

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="default,vitb")
    p.add_argument("--recipes", default=",".join(RECIPES))
    p.add_argument("--images", type=int, default=64, help="test images for the native cosine")
    p.add_argument("--calibration-images", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--runs", type=int, default=9, help="timed rounds (fp32 and every recipe each round)")
    p.add_argument("--emulate", action="store_true", help="also measure the cosine on an emulated CPU without VNNI")
    p.add_argument("--emulate-images", type=int, default=8, help="images for the emulated stage (it is slow)")
    p.add_argument("--emulate-recipes", default=None, help="recipes for the emulated stage (default: all)")
    p.add_argument("--measure-only", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    args.recipes = [r for r in args.recipes.split(",") if r]
    if args.measure_only:  # the emulated child: cosines only, JSON on the last line of stdout
        print(json.dumps({"cosine": measure(args.measure_only, args.recipes, args.emulate_images, args.batch)}))
        return
    results: dict[str, Any] = {"cpu": cpu_features(), "onnxruntime": ort.__version__, "batch": args.batch,
                               "date": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv),
                               "models": {}}
    for name in args.models.split(","):
        with tempfile.TemporaryDirectory(prefix=f"int8-{name}-") as tmp:
            work = Path(tmp)
            r = prepare(args, name, work)
            r["native"] = measure(work, args.recipes, args.images, args.batch)
            r["speed"] = speed(work, args.recipes, args.batch, args.runs)
            if args.emulate:
                emu_recipes = args.emulate_recipes.split(",") if args.emulate_recipes else args.recipes
                r["emulated"] = emulated(work, emu_recipes, args.emulate_images, min(args.batch, args.emulate_images))
            results["models"][name] = r
            print(f"int8_recipes: {name} done", file=sys.stderr)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
