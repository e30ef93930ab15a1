"""mae-embed in process against the raw engine on the same images: images/s, and their ratio.

The raw engine is `engine.embed` on images decoded beforehand, at each batch size of `--batch-sizes`, in two
modes (the fastest of all counts): mae-embed's engine (an engine thread per call) with as many calls at once as
mae-embed has workers, and one call at a time on an engine with every core in one session; mae-embed is
`embed_files` on the PNG files on disk (reading, decoding, the EmbedTask's pooling and normalization, the Parquet
row groups and their merge included), on the same engine opened once (opening it is not counted for either).
Rounds interleave the two, so that a machine that slows down slows both; the ratio is the median of the
rounds' ratios (mae-embed over the round's fastest raw batch). The images are
the Fashion-MNIST test split, written as PNG files first.

    python benchmarks/bulk_embed.py                                  # 5 rounds of 2000 images
    python benchmarks/bulk_embed.py --images 200 --rounds 1 --out /tmp/bulk.json   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.bulk_embed import LocalEmbedder, embed_files, find_inputs  # noqa: E402
from service.engine import Engine  # noqa: E402
from service.server import open_engine  # noqa: E402
from service.settings import Settings, usable_cores  # noqa: E402
from training.data import FASHION_MNIST_DIR, FASHION_MNIST_LABELS, read_idx  # noqa: E402


def write_pngs(root: Path, count: int) -> None:
    """The first `count` test-split images as an ImageFolder tree of PNG files."""
    images = read_idx(FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz")[:count]
    labels = read_idx(FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz")[:count]
    for index, (image, label) in enumerate(zip(images, labels, strict=True)):
        folder = root / FASHION_MNIST_LABELS[label].replace("/", "_")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image, "L").save(folder / f"{index:05d}.png")


def raw_rate(engine: Engine, pixels: np.ndarray, batch: int, calls: int) -> float:
    """Images/s of engine.embed over every image at `batch`, `calls` calls at once (a thread each)."""
    chunks = [pixels[start:start + batch] for start in range(0, len(pixels), batch)]
    started = time.perf_counter()
    with ThreadPoolExecutor(calls) as pool:
        list(pool.map(engine.embed, chunks))
    return len(pixels) / (time.perf_counter() - started)


def mae_embed_rate(embedder: LocalEmbedder, tree: Path, out: Path) -> float:
    """Images/s of mae-embed's embedding step on the tree's files, into a fresh Parquet file."""
    items = find_inputs([str(tree)])
    options = {"source": "encoder", "pooling": None, "normalize": True}
    rows, bad, now, seconds = embed_files(embedder, items, out, options=options, rows_per_group=4096, progress=False)
    assert rows == now == len(items) and bad == 0, (rows, now, bad)
    out.unlink()
    return now / seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batch-sizes", default="8,16,32,64,128", help="the raw engine's")
    p.add_argument("--batch-size", type=int, help="mae-embed's (default: its own, MAE_MAX_BATCH_SIZE)")
    p.add_argument("--workers", type=int, help="mae-embed's (default: its own, one per usable core)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bulk_embed.json")
    args = p.parse_args()
    sizes = [int(s) for s in args.batch_sizes.split(",")]

    embedder = LocalEmbedder(Settings(), {"source": "encoder", "pooling": None, "normalize": True},
                             args.batch_size, args.workers)
    # the raw engine at its best: mae-embed's engine (an engine thread per call) with as many calls at once as it
    # has workers, and one call at a time on an engine with every core in one session
    cores = usable_cores()
    all_cores = open_engine(embedder.model_dir, Settings(intra_op_threads=cores, lone_batch_all_cores=False))
    modes = {f"{embedder.workers} calls at once": (embedder.engine, embedder.workers),
             f"1 call on {cores} threads": (all_cores, 1)}
    work = Path(tempfile.mkdtemp(prefix="bulk-embed-bench-"))
    try:
        write_pngs(work / "tree", args.images)
        files = [Path(i.path).read_bytes() for i in find_inputs([str(work / "tree")])]
        pixels = np.stack([embedder.decode(data).pixels for data in files])
        raw: dict[str, list[float]] = {f"{mode}, batch {b}": [] for mode in modes for b in sizes}
        ours: list[float] = []
        for engine, calls in modes.values():  # first-call allocations at every size
            for b in sizes:
                raw_rate(engine, pixels[:b * calls], b, calls)
        mae_embed_rate(embedder, work / "tree", work / "out.parquet")  # the same first calls, and the page cache
        for r in range(args.rounds):
            for mode, (engine, calls) in modes.items():
                for b in sizes:
                    raw[f"{mode}, batch {b}"].append(raw_rate(engine, pixels, b, calls))
            ours.append(mae_embed_rate(embedder, work / "tree", work / "out.parquet"))
            print(f"round {r + 1}/{args.rounds}: mae-embed {ours[-1]:.0f} images/s; raw best "
                  f"{max(v[-1] for v in raw.values()):.0f}", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work)

    raw_median = {k: statistics.median(v) for k, v in raw.items()}
    best = max(raw_median, key=raw_median.__getitem__)
    ours_median = statistics.median(ours)
    per_round = [ours[r] / max(v[r] for v in raw.values()) for r in range(args.rounds)]
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {"cpu": platform.processor() or platform.machine(), "usable_cores": usable_cores()},
        "model": embedder.model, "device": embedder.engine.device, "images": args.images, "rounds": args.rounds,
        "mae_embed": {"batch_size": embedder.batch_size, "workers": embedder.workers,
                      "engine_threads_per_call": embedder.settings.ort_threads_per_call(),
                      "images_per_s": ours, "median": ours_median},
        "raw_engine": {"images_per_s": raw, "median": raw_median, "best": best},
        # each round's mae-embed over that round's fastest raw batch: the two measured minutes apart at most
        "ratio_per_round": per_round,
        "ratio": statistics.median(per_round),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"mae-embed {ours_median:.0f} images/s (batch {embedder.batch_size}, {embedder.workers} workers); "
          f"raw engine best {raw_median[best]:.0f} images/s ({best}); ratio {report['ratio']:.3f} (median of the "
          f"rounds') -> {args.out}")


if __name__ == "__main__":
    main()
