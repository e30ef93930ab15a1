"""Which index /search should use: exact matmul against approximate indexes on the 60k Fashion-MNIST train split,
and /search itself end to end on that gallery.

The gallery is every train image (Debian's dataset-fashion-mnist) embedded by the model directory's fp32 encoder
as /embed embeds it (`knn_retrieval.Features`: the model's default pooling, L2-normalized); queries are test
images. The ground truth is the exact cosine top-k (float64). Per index: build time, memory, recall@k against the
ground truth, and the latency of one query (batch 1) and of a batch of 32, p50 and p99, in this process on one
thread (`--threads`):

  exact-numpy      float32 matmul + argpartition: what service/search.py runs
  faiss-flat       faiss IndexFlatIP (exact, BLAS)
  faiss-hnsw       faiss IndexHNSWFlat, M=32, efConstruction 40, efSearch 16 / 64 / 128
  faiss-ivf        faiss IndexIVFFlat, 256 lists, nprobe 4 / 16
  usearch-hnsw     usearch Index (cosine, f32, connectivity 16), expansion_search 16 / 64 / 128

A library that does not import is reported as missing and skipped (the dev extra installs faiss-cpu and usearch).
Then (unless --no-serve) the gallery is written as the Parquet file mae-embed writes, `mae-serve --gallery` is
started on it, and --serve-queries test images are sent one per request to POST /search (k=10) and to POST /embed
(the same images: what the search adds): p50 / p99 latency, and the recall@10 of /search's ids against the ground
truth.

    .venv/bin/python benchmarks/search_index.py [--queries 1000] [--serve-queries 500] [--threads 1]
    .venv/bin/python benchmarks/search_index.py --gallery-size 5000 --queries 100 --serve-queries 50  # smoke run
    .venv/bin/python benchmarks/search_index.py --write-bundled-gallery 1000  # service/gallery's file, and exit

Writes benchmarks/results/search_index.json and prints the table the README shows.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.knn_retrieval import Features, load_split  # noqa: E402
from benchmarks.serve import BUNDLED, Server  # noqa: E402
from model_dir.schema import load_model_dir  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "search_index.json"
K = 10
BATCH = 32

Search = Callable[[np.ndarray], np.ndarray]  # queries [Q, D] -> ids [Q, K]


def log(message: str) -> None:
    print(f"search_index: {message}", file=sys.stderr, flush=True)


def exact_top_k(gallery: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """The ground truth: ids of the k largest float64 cosine similarities per query."""
    scores = queries.astype(np.float64) @ gallery.astype(np.float64).T
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    """recall@k: the fraction of the true top-k ids found, averaged over queries."""
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth, strict=True)]))


def percentiles_ms(seconds: list[float]) -> dict[str, float]:
    a = np.asarray(seconds) * 1000
    return {"p50_ms": round(float(np.percentile(a, 50)), 3), "p99_ms": round(float(np.percentile(a, 99)), 3)}


def timed(search: Search, queries: np.ndarray, batch: int) -> tuple[np.ndarray, list[float]]:
    """The ids of every query, searched `batch` at a time, and each call's seconds (after one warm-up call)."""
    search(queries[:batch])
    ids, times = [], []
    for start in range(0, len(queries) - batch + 1, batch):
        t0 = time.perf_counter()
        ids.append(search(queries[start:start + batch]))
        times.append(time.perf_counter() - t0)
    return np.concatenate(ids), times


def numpy_exact(gallery: np.ndarray) -> tuple[dict[str, Search], int]:
    """What /search runs (service.search.Gallery.search), on these vectors."""
    from service.search import Embedding, Gallery

    g = Gallery(origin="benchmark", embedding=Embedding("encoder", None), paths=[None] * len(gallery),
                labels=[None] * len(gallery))
    g.set_vectors(gallery)
    return {"": lambda q: g.search(q, K)[0]}, g.vectors.nbytes


def faiss_indexes(gallery: np.ndarray) -> dict[str, tuple[Callable[[], tuple[dict[str, Search], int]], str]]:
    import faiss

    d = gallery.shape[1]

    def size(index: Any) -> int:
        return int(faiss.serialize_index(index).size)

    def flat() -> tuple[dict[str, Search], int]:
        index = faiss.IndexFlatIP(d)
        index.add(gallery)
        return {"": lambda q: index.search(q, K)[1]}, size(index)

    def hnsw() -> tuple[dict[str, Search], int]:
        index = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 40
        index.add(gallery)

        def at(ef: int) -> Search:
            def search(q: np.ndarray) -> np.ndarray:
                index.hnsw.efSearch = ef
                return index.search(q, K)[1]
            return search

        return {f"efSearch={ef}": at(ef) for ef in (16, 64, 128)}, size(index)

    def ivf() -> tuple[dict[str, Search], int]:
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, 256, faiss.METRIC_INNER_PRODUCT)
        index.train(gallery)
        index.add(gallery)

        def at(nprobe: int) -> Search:
            def search(q: np.ndarray) -> np.ndarray:
                index.nprobe = nprobe
                return index.search(q, K)[1]
            return search

        return {f"nprobe={n}": at(n) for n in (4, 16)}, size(index)

    return {"faiss-flat": (flat, faiss.__version__), "faiss-hnsw": (hnsw, faiss.__version__),
            "faiss-ivf": (ivf, faiss.__version__)}


def usearch_indexes(gallery: np.ndarray) -> dict[str, tuple[Callable[[], tuple[dict[str, Search], int]], str]]:
    import usearch
    from usearch.index import Index

    def hnsw() -> tuple[dict[str, Search], int]:
        index = Index(ndim=gallery.shape[1], metric="cos", dtype="f32", connectivity=16)
        index.add(np.arange(len(gallery)), gallery, threads=1)

        def at(ef: int) -> Search:
            def search(q: np.ndarray) -> np.ndarray:
                index.expansion_search = ef
                return index.search(q, K, threads=1).keys.reshape(len(q), K)
            return search

        return {f"expansion_search={ef}": at(ef) for ef in (16, 64, 128)}, int(index.memory_usage)

    return {"usearch-hnsw": (hnsw, usearch.__version__)}


def compare_indexes(gallery: np.ndarray, queries: np.ndarray, truth: np.ndarray) -> list[dict[str, Any]]:
    candidates: dict[str, tuple[Callable[[], tuple[dict[str, Search], int]], str]] = {
        "exact-numpy": (lambda: numpy_exact(gallery), np.__version__)}
    rows: list[dict[str, Any]] = []
    for name, library in (("faiss", faiss_indexes), ("usearch", usearch_indexes)):
        try:
            candidates.update(library(gallery))
        except ImportError as e:
            log(f"{name} is not installed, skipped ({e})")
            rows.append({"index": name, "missing": str(e)})
    results = []
    for name, (build, version) in candidates.items():
        t0 = time.perf_counter()
        searches, memory = build()
        build_s = time.perf_counter() - t0
        for setting, search in searches.items():
            found, one = timed(search, queries, 1)
            _, batched = timed(search, queries, BATCH)
            row = {"index": name, "setting": setting, "version": version, "build_s": round(build_s, 3),
                   "memory_mb": round(memory / 2**20, 1), f"recall@{K}": round(recall(found, truth[:len(found)]), 4),
                   "batch1": percentiles_ms(one), f"batch{BATCH}": percentiles_ms(batched)}
            log(json.dumps(row))
            results.append(row)
    return results + rows


def write_parquet(path: Path, vectors: np.ndarray, labels: np.ndarray, names: list[str], model: Any,
                  pooling: str) -> None:
    """The gallery as mae-embed writes it (service/bulk_embed.py's Parts: path, label, embedding; the model, source
    and pooling in the metadata), one part merged into `path`."""
    from service.bulk_embed import Item, Parts

    parts = Parts(path, {"source": "encoder", "pooling": pooling, "normalize": True, "model": model.name,
                         "model_version": model.version, "dim": int(vectors.shape[1]), "labels": True})
    parts.open()
    parts.commit([(Item(f"fashion-mnist/train/{i:05d}", names[c]), v)
                  for i, (c, v) in enumerate(zip(labels, vectors, strict=True))], [])
    parts.merge(npy=False)


def serve(model_dir: Path, parquet: Path, test_images: np.ndarray, truth: np.ndarray) -> dict[str, Any]:
    """/search and /embed of one image per request, on the 60k gallery: latency and /search's recall@10."""
    import httpx

    from service.imaging import encode_png

    pngs = [encode_png(i[:, :, None]) for i in test_images]
    t0 = time.perf_counter()
    server = Server(model_dir, "--gallery", str(parquet))
    startup_s = time.perf_counter() - t0
    try:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            def post(route: str, data: bytes, **options: Any) -> tuple[float, dict[str, Any]]:
                t = time.perf_counter()
                r = http.post(route, files={"image": ("q.png", data, "image/png")}, data=options)
                elapsed = time.perf_counter() - t
                r.raise_for_status()
                return elapsed, r.json()

            for data in pngs[:20]:  # warm-up: connections, the first batches
                post("/search", data, k=K)
                post("/embed", data)
            searched = [post("/search", data, k=K) for data in pngs]
            embedded = [post("/embed", data)[0] for data in pngs]
    finally:
        server.stop()
    ids = np.array([[n["id"] for n in body["data"][0]["neighbors"]] for _, body in searched])
    return {"startup_s": round(startup_s, 2), "requests": len(pngs),
            f"recall@{K}": round(recall(ids, truth[:len(ids)]), 4),
            "search": percentiles_ms([t for t, _ in searched]), "embed": percentiles_ms(embedded)}


def write_bundled(count: int) -> None:
    """The bundled model's gallery: the first `count` test images, their labels and indices (service/search.py)."""
    from service.search import BUNDLED_GALLERY, write_bundled_gallery
    from training.data import FASHION_MNIST_LABELS

    images, labels = load_split("test")
    write_bundled_gallery(BUNDLED_GALLERY, images[:count], labels[:count], FASHION_MNIST_LABELS, np.arange(count))
    print(f"{BUNDLED_GALLERY}: {count} test images, {BUNDLED_GALLERY.stat().st_size} bytes")


def table(rows: list[dict[str, Any]], served: dict[str, Any] | None, gallery_size: int) -> str:
    lines = [f"| index | setting | recall@{K} | batch 1 p50 / p99 (ms) | batch {BATCH} p50 / p99 (ms) | build (s) | "
             "memory (MB) |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if "missing" in r:
            lines.append(f"| {r['index']} | not installed | | | | | |")
            continue
        b1, bn = r["batch1"], r[f"batch{BATCH}"]
        lines.append(f"| {r['index']} {r['version']} | {r['setting'] or '-'} | {r[f'recall@{K}']:.4f} | "
                     f"{b1['p50_ms']:.3f} / {b1['p99_ms']:.3f} | {bn['p50_ms']:.3f} / {bn['p99_ms']:.3f} | "
                     f"{r['build_s']:.2f} | {r['memory_mb']:.1f} |")
    if served:
        lines += ["", f"`POST /search` on the {gallery_size}-image gallery, one image per request, k={K}: recall@{K} "
                  f"{served[f'recall@{K}']:.4f} against exact float64 search, p50 {served['search']['p50_ms']:.2f} ms "
                  f"/ p99 {served['search']['p99_ms']:.2f} ms (`POST /embed` of the same images: p50 "
                  f"{served['embed']['p50_ms']:.2f} ms / p99 {served['embed']['p99_ms']:.2f} ms), "
                  f"{served['requests']} requests; server ready {served['startup_s']:.1f} s after start."]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", type=Path, default=BUNDLED)
    p.add_argument("--gallery-size", type=int, default=60_000, help="the first N train images (60000: all)")
    p.add_argument("--queries", type=int, default=1000, help="test images searched in process")
    p.add_argument("--serve-queries", type=int, default=500, help="test images sent to /search (0: no server run)")
    p.add_argument("--threads", type=int, default=1, help="BLAS / OpenMP threads in this process")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--write-bundled-gallery", type=int, metavar="N",
                   help="write test images 0..N-1 as the bundled model's gallery (service/gallery) and exit")
    args = p.parse_args()
    if args.write_bundled_gallery:
        write_bundled(args.write_bundled_gallery)
        return
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = str(args.threads)
    try:
        import threadpoolctl
        threadpoolctl.threadpool_limits(args.threads)
    except ImportError:
        pass
    try:
        import faiss
        faiss.omp_set_num_threads(args.threads)
    except ImportError:
        pass
    directory = load_model_dir(args.model_dir)
    spec = directory.spec
    pooling = spec.embedding.default_pooling
    from training.data import FASHION_MNIST_LABELS

    (train, y_train), (test, _) = load_split("train"), load_split("test")
    train, y_train = train[:args.gallery_size], y_train[:args.gallery_size]
    queries_u8 = test[:max(args.queries, args.serve_queries)]
    t0 = time.perf_counter()
    features = Features(directory)
    gallery = features(train)[pooling]
    queries = features(queries_u8)[pooling]
    log(f"{len(train)} gallery and {len(queries)} query images embedded ({pooling}) in {time.perf_counter() - t0:.0f} s")
    truth = exact_top_k(gallery, queries, K)
    rows = compare_indexes(gallery, queries[:args.queries], truth[:args.queries])
    served = None
    if args.serve_queries:
        with tempfile.TemporaryDirectory() as tmp:
            parquet = Path(tmp) / "train.parquet"
            write_parquet(parquet, gallery, y_train, FASHION_MNIST_LABELS, spec, pooling)
            served = serve(args.model_dir, parquet, queries_u8[:args.serve_queries], truth[:args.serve_queries])
    record = {"model": spec.name, "model_version": spec.version, "pooling": pooling, "dim": int(gallery.shape[1]),
              "gallery": f"fashion-mnist train[:{len(train)}]", "queries": f"fashion-mnist test[:{args.queries}]",
              "k": K, "threads": args.threads, "cpu": os.cpu_count(), "indexes": rows, "served": served}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(table(rows, served, len(train)))


if __name__ == "__main__":
    main()
