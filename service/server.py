"""Per-process state: the model directory, the engine, the tasks, the thread pools, the batcher and readiness.

`Server(settings)` loads and checks the model directory and opens the engine at once (a bad
directory fails here, with a message naming the file); `lifespan` starts the pools and the
warm-up, and on shutdown finishes every accepted request before the pools stop. A request's
images are fetched when they are URLs (`service.fetch`), decoded here (`decode_image`) and run
through its task's queue (`run`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request

from model_dir.schema import ModelDir, ModelDirError, load_model_dir
from service.batcher import Batcher, BatchQueue, BatchTiming, DeadlineExpired, QueueClosed, QueueFull, RunBatch
from service.engine import DeviceFailed, Engine, RunObserver, RuntimeConfigError
from service.errors import (
    DeadlineExceeded,
    InvalidImage,
    NotAvailable,
    NotReady,
    Overloaded,
    PayloadTooLarge,
    UnsupportedMediaType,
)
from service.fetch import FETCHES_PER_REQUEST, Allowlist, Fetcher, ImageURL
from service.imaging import ImageRejected, ModelImage, load_model_image, read_header, to_model_image
from service.metrics import Metrics
from service.search import open_gallery
from service.settings import BUNDLED_MODEL_DIR, Settings
from service.tasks import ImageSource, JobT, QueueKey, ResultT, SearchTask, Task, Tasks

log = logging.getLogger("service")

INLINE_DECODE_MAX_BYTES = 16 * 1024  # Server.decode_image: images decoded on the event loop, not in the pool
INLINE_DECODE_MAX_PIXELS = 128 * 128
WEDGED_FACTOR = 20  # Server.liveness_problem: a batch this many times its queue's average is not merely slow


def checked_decode(step: Callable[..., Any], index: int, *args: Any) -> Any:
    """A decoding step, its ImageRejected turned into the client error for image `index`."""
    try:
        return step(*args)
    except ImageRejected as e:
        error = {"unsupported": UnsupportedMediaType, "too_large": PayloadTooLarge}.get(e.kind, InvalidImage)
        raise error(f"image {index}: {e}") from e


def open_engine(model_dir: ModelDir, settings: Settings, on_run: RunObserver | None = None) -> Engine:
    """The engine `settings.engine` names, on the device and precision the settings ask for; a GPU asked for by
    name with its defaults (TensorRT's profile needs the batch size). A caller takes the defaults of the device the
    engine got (`Settings.device_defaults`: `auto` may have found a GPU) and sets `engine.max_batch` from them."""
    settings = settings.for_device(settings.device)
    if settings.engine == "torch":
        try:
            from service.engine_torch import TorchEngine
        except ImportError as e:
            raise RuntimeConfigError(f"engine torch needs the torch extra (pip install 'mae-service[torch]'): {e}") from e
        return TorchEngine(model_dir, device=settings.device, precision=settings.precision,
                           threads=settings.ort_threads_per_call(), compile=settings.torch_compile, on_run=on_run,
                           self_check_policy=settings.self_check, failover=settings.device_failover,
                           max_batch=settings.max_batch_size)
    from service.engine_onnxruntime import OnnxRuntimeEngine

    return OnnxRuntimeEngine(model_dir, device=settings.device, precision=settings.precision,
                             intra_op_threads=settings.ort_threads_per_call(), spinning=settings.ort_spinning,
                             on_run=on_run, lone_threads=settings.lone_batch_threads(),
                             self_check_policy=settings.self_check, failover=settings.device_failover,
                             max_batch=settings.max_batch_size, trt_cache_dir=settings.trt_cache_dir.expanduser())


class Server:
    """Per-process state: the model, its engine and tasks, the pools, the batcher, and readiness."""

    def __init__(self, settings: Settings):
        self.settings = settings
        if settings.model_dir == BUNDLED_MODEL_DIR and not BUNDLED_MODEL_DIR.is_dir():
            raise ModelDirError(f"{BUNDLED_MODEL_DIR}: the bundled default model is not installed; "
                                "pass --model-dir or set MAE_MODEL_DIR to a directory written by mae-export")
        self.model_dir = load_model_dir(settings.model_dir, verify_hashes=settings.verify_hashes)
        self.metrics = Metrics()
        self.fetcher = Fetcher(Allowlist(settings.url_allowlist), timeout_s=settings.url_timeout_s,
                               max_bytes=settings.url_max_bytes, max_redirects=settings.url_max_redirects,
                               observe=lambda outcome: self.metrics.child(self.metrics.url_fetches, outcome).inc())
        self.engine = open_engine(self.model_dir, settings, on_run=self.metrics.ort_run)
        defaults = settings.device_defaults(self.engine.device)
        self.device_defaults = sorted(defaults)  # for /info
        self.settings = settings = settings.model_copy(update=defaults)
        self.engine.max_batch = settings.max_batch_size  # warm-up covers every batch size the batcher sends
        self.engine.on_device_failure = self._device_failed
        self.tasks = Tasks.open(model_dir=self.model_dir, engine=self.engine)
        # the gallery /search searches (MAE_GALLERY): a Parquet file's vectors are read and checked here, a folder
        # or the bundled images are embedded by the warm-up
        self.gallery = open_gallery(settings.gallery, self.model_dir.spec, self.model_dir.root.resolve() ==
                                    BUNDLED_MODEL_DIR.resolve(), settings.gallery_max_items)
        self.search = None if self.gallery is None else SearchTask(
            model_dir=self.model_dir, engine=self.engine, embed=self.tasks.embed, gallery=self.gallery)
        self.warmed_up = False
        self.warmup_error: str | None = None
        self.batcher: Batcher | None = None
        self.decode_pool: ThreadPoolExecutor | None = None
        self._model_info(self.engine.device)

    def _model_info(self, device: str) -> None:
        self.metrics.info.clear()
        self.metrics.info.labels(self.model_dir.spec.name, self.model_dir.spec.version, device,
                                 self.engine.precision("encoder")).set(1)

    def _device_failed(self, device: str, reason: str) -> None:
        """The engine's device failed under a call (an inference thread): count it; with failover the engine
        goes on on the CPU, which the model-info metric says from now on."""
        self.metrics.device_failures.labels(device).inc()
        if self.engine.failover == "cpu":
            self._model_info("cpu")

    @property
    def ready(self) -> bool:
        """Warmed up, and the device has not failed since."""
        return self.warmed_up and self.engine.device_failure is None

    def not_ready_reason(self) -> str:
        if self.engine.device_failure:
            return self.engine.device_failure
        return f"warm-up failed: {self.warmup_error}" if self.warmup_error else "warming up"

    @asynccontextmanager
    async def lifespan(self, app: FastAPI) -> AsyncIterator[None]:
        s = self.settings
        inference_pool = ThreadPoolExecutor(s.inference_threads, thread_name_prefix="mae-inference")
        self.decode_pool = ThreadPoolExecutor(s.decode_threads, thread_name_prefix="mae-decode")
        self.batcher = Batcher(inference_pool, max_batch_size=s.max_batch_size, max_delay_s=s.max_batch_delay_ms / 1000,
                               max_queue=s.max_queue, observer=self.metrics, concurrency=s.inference_threads,
                               inline_max_s=s.lone_batch_inline_ms / 1000, share_idle_slots=s.share_idle_slots)
        started = time.monotonic()
        warm_up = asyncio.get_running_loop().run_in_executor(inference_pool, self._warm_up)
        warm_up.add_done_callback(lambda f: self._warmed_up(f, time.monotonic() - started))
        graphs = ", ".join(f"{g} {d['precision']} on {d['providers'][0]}"
                           for g, d in self.engine.describe()["graphs"].items())
        log.info("model %s %s from %s on %s: %s; %d inference threads x %d threads per call "
                 "(a batch that runs alone: %s)", self.model_dir.spec.name, self.model_dir.spec.version,
                 self.model_dir.root, self.engine.name, graphs, s.inference_threads, s.ort_threads_per_call(),
                 f"{self.engine.lone_threads} threads" if self.engine.lone_threads else "the same")
        try:
            yield
        finally:
            await self.batcher.close()  # uvicorn has already waited for the open requests
            inference_pool.shutdown(wait=True)
            self.decode_pool.shutdown(wait=True)
            # every request that reached the app, answered or not, by route and status: what a drain is checked on
            log.info("stopped; requests since start: %s", json.dumps(self.metrics.request_counts()))
            self.metrics.close()

    def _warm_up(self) -> None:
        """The engine's warm-up, then the gallery's embeddings where it has none yet: ready means searchable."""
        self.engine.warm_up()
        if self.search is not None and not self.search.gallery.ready:
            started = time.monotonic()
            self.search.embed_gallery(self.settings.max_batch_size, self.settings.max_image_pixels)
            log.info("gallery %s: %d images embedded in %.2f s", self.search.gallery.origin,
                     len(self.search.gallery), time.monotonic() - started)

    def _warmed_up(self, future: asyncio.Future[None], seconds: float) -> None:
        if future.cancelled() or future.exception():
            self.warmup_error = repr(future.exception()) if not future.cancelled() else "cancelled"
            log.error("warm-up failed, staying unready: %s", self.warmup_error)
            return
        self.warmed_up = True
        log.info("warm-up done in %.2f s; providers in use: %s", seconds,
                 {g: d["providers"] for g, d in self.engine.describe()["graphs"].items()})

    def liveness_problem(self) -> str | None:
        """Why this process is not alive in the sense a liveness probe means (inference wedged), or None."""
        if self.batcher is None:
            return None
        return self.batcher.wedged(self.settings.liveness_batch_timeout_s, WEDGED_FACTOR)

    def queue(self, key: QueueKey, run_batch: RunBatch) -> BatchQueue:
        """The batcher queue for `key` (created on first use; its metrics label is the key's graphs)."""
        assert self.batcher is not None, "the app's lifespan has not started"
        try:
            return self.batcher.queue(key, run_batch, label=key.graphs)
        except QueueClosed as e:
            raise NotReady(str(e), {"Retry-After": "1"}) from e

    async def decode_image(self, data: bytes, index: int) -> ModelImage:
        """Client bytes -> the model's input: small images on the event loop, the rest in the decode pool.

        Handing a 28x28 PNG to a pool thread and back costs more CPU (two thread switches and GIL
        hand-overs, which also stall the inference threads) than decoding it. The inline work is bounded:
        a header parsed from at most INLINE_DECODE_MAX_BYTES, pixels decoded for at most
        INLINE_DECODE_MAX_PIXELS; anything larger goes to the pool.
        """
        prep, max_pixels = self.model_dir.spec.preprocessing, self.settings.max_image_pixels
        if len(data) > INLINE_DECODE_MAX_BYTES:
            return await self.offload(checked_decode, load_model_image, index, data, prep, max_pixels)
        header = checked_decode(read_header, index, data, max_pixels)
        if header.width * header.height > INLINE_DECODE_MAX_PIXELS:
            return await self.offload(checked_decode, to_model_image, index, header, prep)
        return checked_decode(to_model_image, index, header, prep)

    async def offload(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run CPU work (decoding, PNG encoding) in the decode pool, off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self.decode_pool, fn, *args)

    async def run(self, request: Request, task: Task[Any, JobT, ResultT], job: JobT, images: list[ImageSource]) -> ResultT:
        """Reserve queue room, fetch (URLs) and decode the images, run their payloads through the job's queue; the
        task's result of them (made in the decode pool when it does real work)."""
        deadline, finish_by = request.state.deadline, request.state.finish_by  # set by the middleware
        for i, image in enumerate(images):  # every URL allowed, before anything is reserved or fetched
            if isinstance(image, ImageURL):
                self.fetcher.check(image.url, i)
        timing = BatchTiming()
        request.state.timing = timing
        queue = self.queue(job.key, task.runner(job))
        try:
            with queue.reserve(len(images)) as reservation:
                decoded = await self._model_images(images, min(deadline, finish_by))
                payloads = [job.payload(image) for image in decoded]
                outputs = await reservation.submit(payloads, deadline, timing, finish_by)
        except QueueFull as e:
            raise Overloaded(f"{e}; retry later", status=self.settings.queue_full_status,
                             retry_after_s=e.retry_after_s) from e
        except QueueClosed as e:
            raise NotReady(str(e), {"Retry-After": "1"}) from e
        except DeadlineExpired as e:
            raise DeadlineExceeded(f"{e} (request timeout {self.settings.request_timeout_s} s)") from e
        except DeviceFailed as e:
            raise NotReady(str(e), {"Retry-After": "1"}) from e
        route = request.scope.get("route")
        self.metrics.child(self.metrics.images, getattr(route, "path", request.url.path)).inc(len(images))
        if task.heavy_result:
            return await self.offload(task.result, job, payloads, outputs)
        return task.result(job, payloads, outputs)

    async def _model_images(self, images: list[ImageSource], fetch_by: float) -> list[ModelImage]:
        """Every image at the model's input, fetched and decoded side by side. The first failure is the request's
        answer and cancels the fetches still running or waiting, which would only hold connections for it."""
        fetches = asyncio.Semaphore(FETCHES_PER_REQUEST)
        steps = [asyncio.ensure_future(self._model_image(image, i, fetches, fetch_by)) for i, image in enumerate(images)]
        try:
            return await asyncio.gather(*steps)
        except BaseException:
            for step in steps:
                step.cancel()
            raise

    async def _model_image(self, image: ImageSource, index: int, fetches: asyncio.Semaphore,
                           fetch_by: float) -> ModelImage:
        """One image at the model's input; a URL fetched, by `fetch_by`, and decoded while it holds one of the
        request's `fetches` (so that a request holds a few fetched bodies at a time, not all of them)."""
        if isinstance(image, ModelImage):
            return image
        if isinstance(image, ImageURL):
            async with fetches:
                return await self.decode_image(await self.fetcher.fetch(image, index, fetch_by), index)
        return await self.decode_image(image, index)

    def searchable(self) -> SearchTask:
        """The search task: 404 not_available without a gallery, 503 while its images are being embedded."""
        if self.search is None:
            raise NotAvailable("/search needs a gallery, and none is configured (MAE_GALLERY: a Parquet file from "
                               "mae-embed or a folder of images)")
        if not self.search.gallery.ready:
            raise NotReady("the gallery is being embedded", {"Retry-After": "1"})
        return self.search

    def require(self, task: Task[Any, Any, Any]) -> None:
        """404 not_available when the model has no graph for the task's route (no decoder, no classifier)."""
        if not self.engine.has(task.graph):
            raise NotAvailable(f"{task.route} needs a {task.graph} graph, and model {self.model_dir.spec.name} has none")
