"""`mae-embed`: image files -> /embed's vectors in one Parquet file (or `.npy` + ids), resumable; and OpenAI batch
files of `/v1/embeddings` requests -> their result lines, as vLLM's `run_batch` reads and writes them.

Inputs are folders (every image below them), ImageFolder trees (a folder of class folders: the class is the
label), globs and list files (a path per line, `path<TAB>label` for a label), in a stable order. The vectors are
computed in this process, by the engine and the EmbedTask the server uses (decoded by a thread pool while the
engine runs the previous batch), or by a server through the Python client (`--url`).

Resuming: a run writes `<out>.parts/`, one whole Parquet file per row group, each renamed into place only once
written and flushed to disk, with that group's bad files in its metadata; a rerun skips every path the parts
hold, and the last step merges them into `<out>` (a renamed temporary too) and lists the bad files in
`<out>.errors.jsonl`. Killed at any moment, a run leaves whole parts (which pyarrow and pandas read as a
dataset) or the whole `<out>`, never a half-written row group.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import sys
import time
import uuid
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from model_dir.schema import ModelDirError, load_model_dir
from service.engine import RuntimeConfigError
from service.errors import InvalidBody, InvalidOption, NotFound, ServiceError
from service.fetch import ImageURL
from service.imaging import ImageRejected, ModelImage, load_model_image
from service.inputs import check_image_count, image_bytes
from service.openai_routes import check_request, embed_job, embeddings_response
from service.responses import dumps
from service.server import checked_decode, open_engine
from service.settings import Settings, usable_cores
from service.tasks import EmbedTask

# the files a folder, a tree or a list file contributes (a glob takes every file it matches)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
ROWS_PER_GROUP = 4096
PREFETCH_BATCHES = 2  # batches under way per worker (decoding, or waiting for the engine)


class UsageError(Exception):
    """Bad input or options: the run stops before it starts, with this message (exit status 2)."""


@dataclass(frozen=True)
class Item:
    """One input image: its path as found, and its label where the tree or list file gives one."""

    path: str
    label: str | None = None


@dataclass
class Batch:
    """A batch's outcome: a vector per embedded item, a reason per bad one."""

    done: list[tuple[Item, np.ndarray]]
    failed: list[tuple[Item, str]]


def _images_below(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _folder_items(folder: Path) -> list[Item]:
    """A folder with class folders and no image of its own is an ImageFolder tree (label: the class folder's
    name); any other folder gives every image below it, unlabelled."""
    entries = sorted(folder.iterdir())
    classes = [p for p in entries if p.is_dir()]
    own_images = [p for p in entries if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    if classes and not own_images:
        return [Item(str(p), c.name) for c in classes for p in _images_below(c)]
    return [Item(str(p)) for p in _images_below(folder)]


def _list_items(list_file: Path) -> list[Item]:
    """A path per line (relative ones from the list file's folder), `path<TAB>label` for a label; blank lines
    and lines starting with # are skipped."""
    items = []
    for line in list_file.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        path, _, label = line.partition("\t")
        resolved = Path(path) if Path(path).is_absolute() else list_file.parent / path
        items.append(Item(str(resolved), label or None))
    return items


def find_inputs(sources: Sequence[str]) -> list[Item]:
    """The images of every source in the order given (each source's sorted), each path once."""
    items: dict[str, Item] = {}
    for source in sources:
        path = Path(source)
        if path.is_dir():
            found = _folder_items(path)
        elif path.is_file():
            found = [Item(source)] if path.suffix.lower() in IMAGE_EXTENSIONS else _list_items(path)
        elif glob.has_magic(source):
            found = [Item(p) for p in sorted(glob.glob(source, recursive=True)) if Path(p).is_file()]
        else:
            raise UsageError(f"{source}: no such file or folder, and not a glob")
        if not found:
            raise UsageError(f"{source}: no images found")
        for item in found:
            items.setdefault(item.path, item)
    return list(items.values())


def _batches(items: Sequence[Item], size: int) -> Iterator[list[Item]]:
    for start in range(0, len(items), size):
        yield list(items[start:start + size])


def _prefetched(pool: ThreadPoolExecutor, batches: Iterator[list[Item]], work: Any, ahead: int
                ) -> Iterator[tuple[list[Item], Any]]:
    """(batch, work(batch)) in order, `ahead` batches' work running in the pool while the caller uses one."""
    pending: deque[tuple[list[Item], Future[Any]]] = deque()
    for batch in batches:
        pending.append((batch, pool.submit(work, batch)))
        if len(pending) > ahead:
            head, future = pending.popleft()
            yield head, future.result()
    while pending:
        head, future = pending.popleft()
        yield head, future.result()


class LocalEmbedder:
    """/embed in this process: the engine as the server opens it, images decoded by the server's path, the
    vectors pooled and normalized by EmbedTask."""

    def __init__(self, settings: Settings, options: dict[str, Any], batch_size: int | None, workers: int | None):
        self.model_dir = load_model_dir(settings.model_dir, verify_hashes=settings.verify_hashes)
        # `workers` batches at once, each decoded and then run through the engine by one thread, on an engine
        # thread of its own unless MAE_INTRA_OP_THREADS says otherwise: a core each, nobody waiting for another.
        # (One call on every core with decode threads beside it ran at 0.80x the raw engine here: a decode thread
        # on a core stalls the call's other threads between operators.) No lone-batch copy.
        workers = workers or usable_cores()
        own = {"inference_threads": workers, "lone_batch_all_cores": False}
        settings = settings.model_copy(update={k: v for k, v in own.items() if k not in settings.model_fields_set})
        self.engine = open_engine(self.model_dir, settings)
        self.settings = settings.for_device(self.engine.device)
        self.batch_size = batch_size or self.settings.max_batch_size
        self.engine.max_batch = self.batch_size
        self.task = EmbedTask(model_dir=self.model_dir, engine=self.engine)
        self.job = self.task.job(options)
        self.run_batch = self.task.runner(self.job)
        self.workers = self.settings.inference_threads
        spec = self.model_dir.spec
        self.model, self.version, self.dim = spec.name, spec.version, self.task.dim(self.job)
        self.pooling = self.job.pooling
        self.engine.warm_up()

    def decode(self, data: bytes) -> ModelImage:
        return load_model_image(data, self.model_dir.spec.preprocessing, self.settings.max_image_pixels)

    def _decoded(self, batch: list[Item]) -> list[ModelImage | str]:
        out: list[ModelImage | str] = []
        for item in batch:
            try:
                out.append(self.decode(Path(item.path).read_bytes()))
            except (ImageRejected, OSError) as e:
                out.append(f"{type(e).__name__}: {e}")
        return out

    def _embedded(self, batch: list[Item]) -> Batch:
        """One batch decoded and embedded (in a worker thread); the files that do not decode fail alone."""
        decoded = self._decoded(batch)
        good = [(item, image) for item, image in zip(batch, decoded, strict=True) if isinstance(image, ModelImage)]
        failed = [(item, image) for item, image in zip(batch, decoded, strict=True) if isinstance(image, str)]
        vectors = self.vectors([image for _, image in good]) if good else []
        return Batch([(item, v) for (item, _), v in zip(good, vectors, strict=True)], failed)

    def embed(self, items: Sequence[Item]) -> Iterator[Batch]:
        """Batches of the items, in order, `workers` of them decoded and embedded at once."""
        with ThreadPoolExecutor(self.workers, thread_name_prefix="mae-embed") as pool:
            for _, batch in _prefetched(pool, _batches(items, self.batch_size), self._embedded,
                                        PREFETCH_BATCHES * self.workers):
                yield batch

    def vectors(self, images: list[ModelImage]) -> list[np.ndarray]:
        """/embed's vectors of decoded images (the job's pooling, normalization and source)."""
        return self.task.result(self.job, images, self.run_batch(images)).vectors


class RemoteEmbedder:
    """/embed of a server through the Python client; a request that a bad image fails is sent again image by
    image, so that only the bad files fail."""

    def __init__(self, url: str, api_key: str | None, options: dict[str, Any], batch_size: int | None,
                 read_threads: int | None):
        from service.client import Client  # httpx: the client extra

        self.client = Client(url, api_key=api_key)
        info = self.client.info()
        self.model, self.version = info["model"]["name"], info["model"]["version"]
        self.options = options
        self.pooling = options["pooling"] or (None if options["source"] == "classifier" else
                                              info["embedding_sources"]["encoder"]["default_pooling"])
        self.batch_size = batch_size or int(info["limits"]["max_images_per_request"])
        self.read_threads = read_threads or 2
        self.dim = int(self._embed([np.zeros((8, 8), np.uint8)]).shape[1])  # also checks the options (422)

    def _embed(self, images: list[Any]) -> np.ndarray:
        """The server's vectors; an answer that is no image's fault (options, model, key) stops the run."""
        from service.client import InvalidOptionError, NotAvailableError, UnauthorizedError

        try:
            return self.client.embed(images, **self.options)
        except (InvalidOptionError, NotAvailableError, UnauthorizedError) as e:
            raise UsageError(f"{self.client.base_url}: {e}") from e

    def _read(self, batch: list[Item]) -> list[bytes | str]:
        out: list[bytes | str] = []
        for item in batch:
            try:
                out.append(Path(item.path).read_bytes())
            except OSError as e:
                out.append(f"{type(e).__name__}: {e}")
        return out

    def embed(self, items: Sequence[Item]) -> Iterator[Batch]:
        from service.client import InvalidImageError, PayloadTooLargeError

        with ThreadPoolExecutor(self.read_threads, thread_name_prefix="mae-read") as pool:
            for batch, data in _prefetched(pool, _batches(items, self.batch_size), self._read, self.read_threads):
                good = [(item, d) for item, d in zip(batch, data, strict=True) if isinstance(d, bytes)]
                failed = [(item, d) for item, d in zip(batch, data, strict=True) if isinstance(d, str)]
                done: list[tuple[Item, np.ndarray]] = []
                try:
                    if good:
                        done = list(zip([i for i, _ in good], self._embed([d for _, d in good]), strict=True))
                except (InvalidImageError, PayloadTooLargeError):
                    for item, d in good:
                        try:
                            done.append((item, self._embed([d])[0]))
                        except (InvalidImageError, PayloadTooLargeError) as e:
                            failed.append((item, e.message))
                yield Batch(done, failed)


def _fsync_replace(tmp: Path, final: Path) -> None:
    """Flush `tmp` to disk, then rename it to `final` (atomic) and flush the folder's entry."""
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)
    folder = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def _error_line(path: str, reason: str) -> str:
    return json.dumps({"path": path, "reason": reason}) + "\n"


class Parts:
    """`<out>.parts/`: a run's committed row groups, one whole Parquet file each, and `_run.json`, what the run
    computes (a rerun with other options or another model is refused rather than mixed in)."""

    def __init__(self, out: Path, run: dict[str, Any]):
        import pyarrow as pa

        self.out, self.run = out, run
        self.folder = out.with_name(out.name + ".parts")
        self.errors_path = out.with_name(out.name + ".errors.jsonl")
        fields = [pa.field("path", pa.string())]
        if run["labels"]:
            fields.append(pa.field("label", pa.string()))
        fields.append(pa.field("embedding", pa.list_(pa.float32(), run["dim"])))
        metadata = {f"mae.{k}": json.dumps(v) if not isinstance(v, str) else v for k, v in run.items()}
        self.schema = pa.schema(fields, metadata=metadata)

    def open(self) -> None:
        """Start the folder, or check that the one there is this run's."""
        run_file = self.folder / "_run.json"
        if run_file.is_file():
            started = json.loads(run_file.read_text())
            if started != self.run:
                differ = sorted(k for k in set(started) | set(self.run) if started.get(k) != self.run.get(k))
                raise UsageError(f"{self.folder} holds a run with other {', '.join(differ)} "
                                 f"({', '.join(f'{k}={started.get(k)!r}' for k in differ)}); rerun with those, or "
                                 "pass --overwrite to start again")
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / "._run.json.tmp"
        tmp.write_text(json.dumps(self.run, indent=1))
        _fsync_replace(tmp, run_file)

    def files(self) -> list[Path]:
        return sorted(self.folder.glob("part-*.parquet"))

    def done(self) -> tuple[set[str], list[tuple[str, str]]]:
        """The paths the parts hold, embedded or failed, and the failed ones' reasons."""
        import pyarrow.parquet as pq

        paths: set[str] = set()
        failed: list[tuple[str, str]] = []
        for part in self.files():
            f = pq.ParquetFile(part)
            paths.update(f.read(columns=["path"]).column("path").to_pylist())
            for e in json.loads((f.schema_arrow.metadata or {}).get(b"mae.errors", b"[]")):
                failed.append((e["path"], e["reason"]))
                paths.add(e["path"])
        return paths, failed

    def commit(self, done: list[tuple[Item, np.ndarray]], failed: list[tuple[Item, str]]) -> None:
        """One row group, written whole to a temporary file and renamed into place."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        dim = self.run["dim"]
        flat = np.concatenate([v for _, v in done]).astype(np.float32) if done else np.zeros(0, np.float32)
        columns: dict[str, Any] = {"path": pa.array([i.path for i, _ in done], pa.string())}
        if self.run["labels"]:
            columns["label"] = pa.array([i.label for i, _ in done], pa.string())
        columns["embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), dim)
        errors = json.dumps([{"path": i.path, "reason": r} for i, r in failed])
        schema = self.schema.with_metadata({**self.schema.metadata, b"mae.errors": errors.encode()})
        table = pa.Table.from_pydict(columns, schema=schema)
        files = self.files()
        number = int(files[-1].stem.split("-")[1]) + 1 if files else 0
        final = self.folder / f"part-{number:06d}.parquet"
        tmp = self.folder / f".{final.name}.tmp"
        pq.write_table(table, tmp, row_group_size=max(1, len(done)))
        _fsync_replace(tmp, final)

    def merge(self, npy: bool) -> int:
        """The parts into `<out>`, a part at a time (Parquet: a row group each; or .npy + `<stem>.ids.tsv`), then
        the folder removed; the rows written."""
        import pyarrow.parquet as pq

        files = self.files()
        rows = sum(pq.ParquetFile(part).metadata.num_rows for part in files)
        tmp = self.out.with_name(f".{self.out.name}.tmp")
        if npy:
            ids = self.out.with_suffix(".ids.tsv")
            ids_tmp = ids.with_name(f".{ids.name}.tmp")
            vectors = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(rows, self.run["dim"]))
            row = 0
            with open(ids_tmp, "w") as f:
                for part in files:
                    t = pq.read_table(part)
                    labels = t.column("label").to_pylist() if self.run["labels"] else [None] * t.num_rows
                    f.writelines(f"{path}\n" if label is None else f"{path}\t{label}\n"
                                 for path, label in zip(t.column("path").to_pylist(), labels, strict=True))
                    vectors[row:row + t.num_rows] = _vectors(t)
                    row += t.num_rows
            vectors.flush()
            del vectors
            _fsync_replace(ids_tmp, ids)
        else:
            with pq.ParquetWriter(tmp, self.schema) as writer:
                for part in files:
                    t = pq.read_table(part).replace_schema_metadata(self.schema.metadata)
                    writer.write_table(t, row_group_size=max(1, t.num_rows))
        _fsync_replace(tmp, self.out)
        shutil.rmtree(self.folder)
        return rows


def _vectors(table: Any) -> np.ndarray:
    """The embedding column of a table as [N, D] float32."""
    column = table.column("embedding").combine_chunks()
    return column.values.to_numpy().reshape(len(column), column.type.list_size)


def write_errors(path: Path, failed: list[tuple[str, str]]) -> None:
    """The bad files and why, a JSON line each (rewritten whole: a kill leaves the old list or the new)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(_error_line(p, r) for p, r in failed))
    _fsync_replace(tmp, path)


def embed_files(embedder: LocalEmbedder | RemoteEmbedder, items: list[Item], out: Path, *, options: dict[str, Any],
                rows_per_group: int, progress: bool) -> tuple[int, int, int, float]:
    """Embed the items not yet in `out`'s parts and merge the parts into `out`: (rows, bad files, embedded now,
    seconds embedding them)."""
    from tqdm import tqdm

    parts = Parts(out, {**options, "pooling": embedder.pooling, "model": embedder.model,
                        "model_version": embedder.version, "dim": embedder.dim, "labels": any(i.label for i in items)})
    parts.open()
    done, failed = parts.done()
    todo = [item for item in items if item.path not in done]
    write_errors(parts.errors_path, failed)
    now, started = 0, time.monotonic()
    with tqdm(total=len(items), initial=len(items) - len(todo), unit="img", disable=not progress,
              file=sys.stderr, mininterval=0.5) as bar, open(parts.errors_path, "a") as errors:

        def commit(entries: list[tuple[Item, Any]]) -> int:
            """A row group of these inputs (its bad files in its metadata and in the errors file): its rows."""
            embedded = [(item, v) for item, v in entries if not isinstance(v, str)]
            bad = [(item, v) for item, v in entries if isinstance(v, str)]
            parts.commit(embedded, bad)
            errors.write("".join(_error_line(i.path, r) for i, r in bad))
            errors.flush()
            return len(embedded)

        pending: list[tuple[Item, Any]] = []  # inputs done, not yet in a part: a vector, or why it failed
        for batch in embedder.embed(todo):
            pending += batch.done + batch.failed
            bar.update(len(batch.done) + len(batch.failed))
            while len(pending) >= rows_per_group:
                now += commit(pending[:rows_per_group])
                pending = pending[rows_per_group:]
        if pending:
            now += commit(pending)
    seconds = time.monotonic() - started
    _, failed = parts.done()
    rows = parts.merge(npy=out.suffix == ".npy")
    write_errors(parts.errors_path, failed)
    return rows, len(failed), now, seconds


def _openai_error(error: ServiceError) -> tuple[int, dict[str, Any], dict[str, str]]:
    return error.status, {"error": {"type": error.type, "message": error.message}}, {"code": error.type,
                                                                                       "message": error.message}


@dataclass
class BatchRequest:
    """One line of an OpenAI batch file, checked; `images` and `job` set once its body passed."""

    custom_id: Any
    request: Any = None
    job: Any = None
    images: list[ModelImage] | None = None
    error: ServiceError | None = None


def _parse_batch_line(line: str, embedder: LocalEmbedder) -> BatchRequest:
    """A line -> its request, or the error it answers with (as the server's /v1/embeddings would)."""
    try:
        entry = json.loads(line)
    except json.JSONDecodeError as e:
        return BatchRequest(None, error=InvalidBody(f"line is not valid JSON ({e})"))
    if not isinstance(entry, dict):
        return BatchRequest(None, error=InvalidBody("a line must be a JSON object"))
    entry_id = entry.get("custom_id")
    try:
        if entry.get("url") != "/v1/embeddings" or entry.get("method", "POST") != "POST":
            raise NotFound(f"{entry.get('method')} {entry.get('url')}: only POST /v1/embeddings is served here")
        body = entry.get("body")
        if not isinstance(body, dict):
            raise InvalidBody("body: the request's JSON object is missing")
        request = check_request(body, embedder.model_dir.spec)
        texts = [request.input] if isinstance(request.input, str) else request.input
        check_image_count(len(texts), embedder.settings.max_images_per_request,
                          "send 'input': a data URI or the base64 of an image file, or a list of them")
        data = [image_bytes(text, i) for i, text in enumerate(texts)]
        urls = [i for i, d in enumerate(data) if isinstance(d, ImageURL)]
        if urls:  # a batch file is read offline: nothing is fetched
            raise InvalidOption(f"image {urls[0]}: a URL; a batch file's images are data URIs or base64 (mae-embed "
                                "fetches nothing)")
        job = embed_job(request, embedder.task)
        images = [checked_decode(embedder.decode, i, d) for i, d in enumerate(data)]
        return BatchRequest(entry_id, request, job, images)
    except ServiceError as e:
        return BatchRequest(entry_id, error=e)


def _batch_result(entry: BatchRequest, status: int, body: dict[str, Any] | Any, error: dict[str, str] | None
                  ) -> bytes:
    return dumps({"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": entry.custom_id,
                  "response": {"status_code": status, "request_id": f"req_{uuid.uuid4().hex}", "body": body},
                  "error": error}) + b"\n"


def _answer(entries: list[BatchRequest], embedder: LocalEmbedder) -> list[bytes]:
    """The result lines of a group of requests; the images of those with the same job run in shared batches."""
    task, num_patches = embedder.task, embedder.model_dir.spec.architecture.num_patches
    outputs: dict[int, list[Any]] = {}
    for key in {e.job.key for e in entries if e.error is None}:
        members = [i for i, e in enumerate(entries) if e.error is None and e.job.key == key]
        runner = task.runner(entries[members[0]].job)
        images = [image for i in members for image in entries[i].images or []]
        computed = [o for batch in _batches(images, embedder.batch_size) for o in runner(batch)]
        for i in members:
            count = len(entries[i].images or [])
            outputs[i], computed = computed[:count], computed[count:]
    lines = []
    for i, entry in enumerate(entries):
        if entry.error is not None:
            lines.append(_batch_result(entry, *_openai_error(entry.error)))
        else:
            result = task.result(entry.job, entry.images or [], outputs[i])
            lines.append(_batch_result(entry, 200, embeddings_response(entry.request, result, num_patches), None))
    return lines


def _complete_lines(path: Path) -> int:
    """The whole lines of an output file, after cutting off a partial last one (a run killed mid-write)."""
    if not path.is_file():
        return 0
    data = path.read_bytes()
    whole = data[:data.rfind(b"\n") + 1]
    if len(whole) != len(data):
        with open(path, "r+b") as f:
            f.truncate(len(whole))
    return whole.count(b"\n")


def run_openai_batch(embedder: LocalEmbedder, source: Path, out: Path, *, progress: bool) -> tuple[int, int]:
    """Every request line of `source` -> a result line in `out`, in order; a rerun continues after the last whole
    line written. (requests answered now, those that failed)"""
    from tqdm import tqdm

    lines = [line for line in source.read_text().splitlines() if line.strip()]
    start = _complete_lines(out)
    answered = failed = 0
    with open(out, "ab") as f, tqdm(total=len(lines), initial=start, unit="req", disable=not progress,
                                    file=sys.stderr, mininterval=0.5) as bar:
        group: list[BatchRequest] = []
        images = 0
        for line in lines[start:]:
            entry = _parse_batch_line(line, embedder)
            group.append(entry)
            images += len(entry.images or [])
            failed += entry.error is not None
            if images >= embedder.batch_size:
                f.writelines(_answer(group, embedder))
                f.flush()
                bar.update(len(group))
                answered += len(group)
                group, images = [], 0
        if group:
            f.writelines(_answer(group, embedder))
            answered += len(group)
            bar.update(len(group))
    return answered, failed


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mae-embed", description="Embed image files with the MAE encoder into Parquet (or .npy + ids), as "
        "/embed computes them; resumable: rerun the same command after an interruption.")
    p.add_argument("inputs", nargs="*", help="folders, ImageFolder trees, globs (quoted) or list files")
    p.add_argument("--out", required=True, type=Path, help="output: .parquet, or .npy (+ <stem>.ids.tsv); with "
                   "--openai-batch, the results .jsonl")
    p.add_argument("--openai-batch", type=Path, help="an OpenAI batch input file of POST /v1/embeddings requests")
    p.add_argument("--url", help="a server's base URL (through the Python client); default: the engine in process")
    p.add_argument("--api-key", default=os.environ.get("MAE_API_KEY"), help="with --url (default: $MAE_API_KEY)")
    p.add_argument("--model-dir", type=Path, help="in process: the model directory (default: MAE_MODEL_DIR, or "
                   "the bundled model); MAE_DEVICE, MAE_PRECISION, MAE_ENGINE, ... apply as for mae-serve")
    p.add_argument("--source", choices=("encoder", "classifier"), default="encoder", help="as /embed's source")
    p.add_argument("--pooling", choices=("cls", "mean", "cls+mean"), help="as /embed's (default: the model's)")
    p.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=True,
                   help="L2-normalize, as /embed's normalize (default: on)")
    p.add_argument("--batch-size", type=int, help="images per engine call (default: MAE_MAX_BATCH_SIZE, the "
                   "server's; with --url, the server's images per request)")
    p.add_argument("--workers", type=int, help="batches read, decoded and embedded at once, a thread each (default: "
                   "one per usable core, each engine call on one thread unless MAE_INTRA_OP_THREADS; 2 with --url: "
                   "reading files while the server computes)")
    p.add_argument("--rows-per-group", type=int, default=ROWS_PER_GROUP,
                   help="inputs per Parquet row group (less the bad files among them): the unit a rerun resumes from")
    p.add_argument("--overwrite", action="store_true", help="embed again into an existing output")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """The command; exit status 0 when every input embedded, 1 when some were bad files (listed in
    `<out>.errors.jsonl`), 2 on bad input or options, 130 when interrupted (rerun to continue)."""
    args = _parser().parse_args(argv)
    out: Path = args.out
    options = {"source": args.source, "pooling": args.pooling, "normalize": args.normalize}
    started = time.monotonic()
    try:
        if args.openai_batch is not None:
            if args.inputs or args.url:
                raise UsageError("--openai-batch takes no other inputs and runs in process (no --url)")
            if args.overwrite:
                out.unlink(missing_ok=True)
            embedder = _local(args, {})
            answered, failed = run_openai_batch(embedder, args.openai_batch, out, progress=not args.quiet)
            print(f"{out}: {answered} requests answered ({failed} with an error) in "
                  f"{time.monotonic() - started:.1f} s")
            return 0
        if not args.inputs:
            raise UsageError("no inputs: give folders, ImageFolder trees, globs or list files")
        if out.suffix not in (".parquet", ".npy"):
            raise UsageError(f"--out {out}: a .parquet or .npy file")
        parts_folder = out.with_name(out.name + ".parts")
        if args.overwrite:
            shutil.rmtree(parts_folder, ignore_errors=True)
            out.unlink(missing_ok=True)
        elif out.exists() and not parts_folder.is_dir():
            raise UsageError(f"{out} exists (a finished run); pass --overwrite to embed again")
        items = find_inputs(args.inputs)
        embedder = (RemoteEmbedder(args.url, args.api_key, options, args.batch_size, args.workers)
                    if args.url else _local(args, options))
        rows, bad, now, seconds = embed_files(embedder, items, out, options=options, rows_per_group=args.rows_per_group,
                                     progress=not args.quiet)
    except KeyboardInterrupt:
        print(f"interrupted: the row groups written are kept; rerun the same command to continue ({out})",
              file=sys.stderr)
        return 130
    except (UsageError, ServiceError, ModelDirError, RuntimeConfigError) as e:
        print(f"mae-embed: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        if e.name not in ("pyarrow", "tqdm", "httpx"):
            raise
        print(f"mae-embed: {e.name} is not installed: pip install 'mae-service[bulk]' ('[client]' too for --url)",
              file=sys.stderr)
        return 2
    errors = out.with_name(out.name + ".errors.jsonl")
    print(f"{out}: {rows} rows ({now} embedded now, {now / max(seconds, 1e-9):.0f} images/s); "
          f"{bad} bad files{f' (listed in {errors})' if bad else ''}")
    return 1 if bad else 0


def _local(args: argparse.Namespace, options: dict[str, Any]) -> LocalEmbedder:
    settings = Settings(**({"model_dir": args.model_dir} if args.model_dir else {}))
    return LocalEmbedder(settings, options, args.batch_size, args.workers)


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
