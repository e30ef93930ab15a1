"""The FastAPI app: routes and HTTP concerns (auth, limits, errors, headers, metrics) around batcher and runtime.

`create_app(settings)` loads and checks the model directory and opens the ONNX Runtime sessions at
once (a bad directory fails here, with a message naming the file); the lifespan starts the thread
pools and the warm-up, and on shutdown finishes every accepted request before the pools stop.
"""

from __future__ import annotations

import asyncio
import hmac
import inspect
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi import __version__ as fastapi_version
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, PlainTextResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException as StarletteHTTPException

from model_dir.schema import ModelDirError, load_model_dir
from service import __version__, oip_routes, openai_routes, tasks
from service.batcher import Batcher, BatchQueue, BatchTiming, DeadlineExpired, QueueClosed, QueueFull, RunBatch
from service.engine import open_engine
from service.errors import (
    DeadlineExceeded,
    InvalidImage,
    NotAvailable,
    NotReady,
    Overloaded,
    PayloadTooLarge,
    ServiceError,
    Unauthorized,
    UnsupportedMediaType,
    error_response,
    error_response_for,
)
from service.imaging import ImageRejected, ModelImage
from service.inputs import describe_validation_errors, parse_options, read_request
from service.metrics import Metrics
from service.middleware import RequestContext
from service.pipelines import Pipelines
from service.responses import JSONResponse
from service.schemas import (
    ClassifyJsonRequest,
    ClassifyOptions,
    ClassifyResponse,
    EmbedJsonRequest,
    EmbedOptions,
    EmbedResponse,
    ErrorResponse,
    ReconstructJsonRequest,
    ReconstructOptions,
    ReconstructResponse,
    request_body_doc,
)
from service.settings import BUNDLED_MODEL_DIR, Settings
from service.tasks import ImageSource

log = logging.getLogger("service")

STATIC_DIR = Path(__file__).resolve().parent / "static"
SAMPLES_DIR = Path(__file__).resolve().parent / "samples"
_FASTAPI_HAS_TELEMETRY = "telemetry" in inspect.signature(FastAPI.__init__).parameters
INLINE_DECODE_MAX_BYTES = 16 * 1024  # Server.decode: images decoded on the event loop, not in the pool
INLINE_DECODE_MAX_PIXELS = 128 * 128
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 415, 422, 429, 503, 504)
}


class Server:
    """Per-process state: the model, its sessions, the pools, the batcher, and readiness."""

    def __init__(self, settings: Settings):
        self.settings = settings
        if settings.model_dir == BUNDLED_MODEL_DIR and not BUNDLED_MODEL_DIR.is_dir():
            raise ModelDirError(f"{BUNDLED_MODEL_DIR}: the bundled default model is not installed; "
                                "pass --model-dir or set MAE_MODEL_DIR to a directory written by mae-export")
        self.model_dir = load_model_dir(settings.model_dir, verify_hashes=settings.verify_hashes)
        self.metrics = Metrics()
        self.runtime = open_engine(self.model_dir, settings, on_run=self.metrics.ort_run)
        self.pipelines = Pipelines(self.model_dir, self.runtime, settings.max_image_pixels)
        self.ready = False
        self.warmup_error: str | None = None
        self.batcher: Batcher | None = None
        self.decode_pool: ThreadPoolExecutor | None = None
        self.metrics.info.labels(self.model_dir.spec.name, self.model_dir.spec.version, self.runtime.device,
                                 self.runtime.precision("encoder")).set(1)

    @asynccontextmanager
    async def lifespan(self, app: FastAPI) -> AsyncIterator[None]:
        s = self.settings
        inference_pool = ThreadPoolExecutor(s.inference_threads, thread_name_prefix="mae-inference")
        self.decode_pool = ThreadPoolExecutor(s.decode_threads, thread_name_prefix="mae-decode")
        self.batcher = Batcher(inference_pool, s.max_batch_size, s.max_batch_delay_ms / 1000, s.max_queue,
                               self.metrics, concurrency=s.inference_threads)
        started = time.monotonic()
        warm_up = asyncio.get_running_loop().run_in_executor(inference_pool, self.runtime.warm_up)
        warm_up.add_done_callback(lambda f: self._warmed_up(f, time.monotonic() - started))
        graphs = ", ".join(f"{g} {d['precision']} on {d['providers'][0]}"
                           for g, d in self.runtime.describe()["graphs"].items())
        log.info("model %s %s from %s on %s: %s; %d inference threads x %d threads per call "
                 "(a batch that runs alone: %s)", self.model_dir.spec.name, self.model_dir.spec.version,
                 self.model_dir.root, self.runtime.name, graphs, s.inference_threads, s.ort_threads_per_call(),
                 f"{self.runtime.lone_threads} threads" if self.runtime.lone_threads else "the same")
        try:
            yield
        finally:
            await self.batcher.close()  # uvicorn has already waited for the open requests
            inference_pool.shutdown(wait=True)
            self.decode_pool.shutdown(wait=True)
            self.metrics.close()

    def _warmed_up(self, future: asyncio.Future[None], seconds: float) -> None:
        if future.cancelled() or future.exception():
            self.warmup_error = repr(future.exception()) if not future.cancelled() else "cancelled"
            log.error("warm-up failed, staying unready: %s", self.warmup_error)
            return
        self.ready = True
        log.info("warm-up done in %.2f s; providers in use: %s", seconds,
                 {g: d["providers"] for g, d in self.runtime.describe()["graphs"].items()})

    def queue(self, key: str, run_batch: RunBatch, label: str) -> BatchQueue:
        assert self.batcher is not None, "the app's lifespan has not started"
        try:
            return self.batcher.queue(key, run_batch, label)
        except QueueClosed as e:
            raise NotReady(str(e), {"Retry-After": "1"}) from e

    @staticmethod
    def _checked(step: Callable[[Any], Any], arg: Any, index: int) -> Any:
        """A decoding step, its ImageRejected turned into the client error for image `index`."""
        try:
            return step(arg)
        except ImageRejected as e:
            error = {"unsupported": UnsupportedMediaType, "too_large": PayloadTooLarge}.get(e.kind, InvalidImage)
            raise error(f"image {index}: {e}") from e

    async def decode(self, data: bytes, index: int) -> ModelImage:
        """Client bytes -> the model's input: small images on the event loop, the rest in the decode pool.

        Handing a 28x28 PNG to a pool thread and back costs more CPU (two thread switches and GIL
        hand-overs, which also stall the inference threads) than decoding it. The inline work is bounded:
        a header parsed from at most INLINE_DECODE_MAX_BYTES, pixels decoded for at most
        INLINE_DECODE_MAX_PIXELS; anything larger goes to the pool.
        """
        if len(data) > INLINE_DECODE_MAX_BYTES:
            return await self.offload(self._checked, self.pipelines.load, data, index)
        header = self._checked(self.pipelines.header, data, index)
        if header.width * header.height > INLINE_DECODE_MAX_PIXELS:
            return await self.offload(self._checked, self.pipelines.finish, header, index)
        return self._checked(self.pipelines.finish, header, index)

    async def offload(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run CPU work (decoding, PNG encoding) in the decode pool, off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self.decode_pool, fn, *args)

    async def infer(self, request: Request, queue: BatchQueue, images: list[ImageSource],
                    payload: Callable[[ModelImage], Any] = lambda image: image) -> tuple[list[Any], list[Any]]:
        """Reserve queue room, decode the images in the pool, run them through the queue: (payloads, results)."""
        deadline = request.state.t0 + self.settings.request_timeout_s
        timing = BatchTiming()
        request.state.timing = timing
        try:
            with queue.reserve(len(images)) as reservation:
                decoded = await asyncio.gather(*(self._model_image(image, i) for i, image in enumerate(images)))
                payloads = [payload(image) for image in decoded]
                results = await reservation.submit(payloads, deadline, timing)
        except QueueFull as e:
            raise Overloaded(f"{e}; retry later", self.settings.queue_full_status, e.retry_after_s) from e
        except QueueClosed as e:
            raise NotReady(str(e), {"Retry-After": "1"}) from e
        except DeadlineExpired as e:
            raise DeadlineExceeded(f"{e} (request timeout {self.settings.request_timeout_s} s)") from e
        route = request.scope.get("route")
        self.metrics.images.labels(getattr(route, "path", request.url.path)).inc(len(images))
        return payloads, results

    async def _model_image(self, image: ImageSource, index: int) -> ModelImage:
        return image if isinstance(image, ModelImage) else await self.decode(image, index)

    def require(self, graph: str, route: str) -> None:
        if not self.runtime.has(graph):
            raise NotAvailable(f"{route} needs a {graph} graph, and model {self.model_dir.spec.name} has none")

    def info(self) -> dict[str, Any]:
        spec, s = self.model_dir.spec, self.settings
        return {
            "version": __version__,
            "ready": self.ready,
            "model": spec.model_dump(mode="json", exclude={"files", "verification"}),
            "runtime": self.runtime.describe(),
            "routes": {"embed": True, "reconstruct": self.runtime.has("decoder"),
                       "classify": self.runtime.has("classifier")},
            "batching": {"max_batch_size": s.max_batch_size, "max_batch_delay_ms": s.max_batch_delay_ms,
                         "inference_threads": s.inference_threads, "ort_threads_per_call": s.ort_threads_per_call(),
                         "max_queue": s.max_queue, "queue_full_status": s.queue_full_status,
                         "request_timeout_s": s.request_timeout_s},
            "limits": {"max_body_bytes": s.max_body_bytes, "max_images_per_request": s.max_images_per_request,
                       "max_image_pixels": s.max_image_pixels},
            "auth": bool(s.api_keys),
            "protocols": {
                "native": ["POST /embed", "POST /reconstruct", "POST /classify"],
                "openai": {"routes": ["POST /v1/embeddings", "GET /v1/models"], "model": spec.name},
                "open_inference_v2": {"rest": "/v2", "extensions": oip_routes.EXTENSIONS,
                                      "models": list(oip_routes.served_models(self))},
            },
        }


def create_app(settings: Settings | None = None) -> FastAPI:
    """The app for one process; raises ModelDirError or RuntimeConfigError when the model cannot be served."""
    settings = settings or Settings()
    server = Server(settings)
    telemetry = {}
    if not _FASTAPI_HAS_TELEMETRY:
        if settings.opentelemetry:
            log.warning("opentelemetry is on, but FastAPI %s has no native OpenTelemetry (0.165+): no spans", fastapi_version)
    elif not settings.opentelemetry:  # FastAPI's default is on, with a provider check on every request
        telemetry["telemetry"] = {"tracing": False, "metrics": False, "logs": False}
    # FastAPIOffline: FastAPI whose /docs and /redoc load their scripts from this server, not a CDN
    app = FastAPIOffline(title="MAE service", version=__version__, lifespan=server.lifespan,
                         default_response_class=JSONResponse, **telemetry,
                         description="Embeddings, reconstructions and labels from a Masked Autoencoder (ONNX Runtime).")
    app.state.server = server
    _install_error_handlers(app, server)
    app.add_middleware(RequestContext, metrics=server.metrics, settings=settings)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type", "X-Request-ID",
                                          "Inference-Header-Content-Length"],
                           expose_headers=["X-Request-ID", "X-Queue-Time-Ms", "X-Inference-Time-Ms",
                                           "X-Total-Time-Ms", "X-Seed", "Retry-After",
                                           "Inference-Header-Content-Length"])
    auth = _auth_dependencies(settings.api_keys)
    pipelines, spec = server.pipelines, server.model_dir.spec

    @app.post("/embed", response_model=EmbedResponse, responses=_ERRORS, dependencies=auth,
              openapi_extra=request_body_doc(EmbedJsonRequest, EmbedOptions))
    async def embed(request: Request) -> JSONResponse:
        """Embeddings of whole images (the encoder on every patch)."""
        images, raw = await read_request(request, settings.max_images_per_request, settings.max_body_bytes)
        options = parse_options(EmbedOptions, raw)
        pooling, vectors = await tasks.embed(server, request, images, options.pooling, options.normalize)
        return JSONResponse({
            "model": spec.name, "dim": int(vectors[0].shape[0]), "pooling": pooling,
            "normalized": options.normalize, "encoding_format": options.encoding_format,
            "data": [{"index": i, "embedding": pipelines.encode_embedding(v, options.encoding_format)}
                     for i, v in enumerate(vectors)],
            "usage": {"images": len(vectors)},
        })

    @app.post("/reconstruct", response_model=ReconstructResponse, responses={
        **_ERRORS, 200: {"content": {"image/png": {}}, "description": "PNG panel, or JSON with response_format=json"}},
        dependencies=auth, openapi_extra=request_body_doc(ReconstructJsonRequest, ReconstructOptions))
    async def reconstruct_images(request: Request) -> Response:
        """Mask each image (seeded), encode the visible patches, decode, and show or score the result."""
        server.require("decoder", "/reconstruct")
        images, raw = await read_request(request, settings.max_images_per_request, settings.max_body_bytes)
        options = parse_options(ReconstructOptions, raw)
        done = await tasks.reconstruct(server, request, "/reconstruct", images, options.mask_ratio, options.seed)
        headers = {"X-Seed": str(done.seed)}
        if options.response_format == "png":
            png = await server.offload(pipelines.reconstruct_png, done.items, done.preds)
            return Response(png, media_type="image/png", headers=headers)
        data = await server.offload(pipelines.reconstruct_json, done.items, done.preds)
        a = spec.architecture
        return JSONResponse({
            "model": spec.name, "seed": done.seed, "mask_ratio": options.mask_ratio,
            "norm_pix_loss": spec.norm_pix_loss, "denormalized_with_target_stats": spec.norm_pix_loss,
            "grid": {"rows": a.grid_size, "cols": a.grid_size, "patch_size": a.patch_size,
                     "num_patches": a.num_patches, "num_visible": done.num_visible},
            "data": data, "usage": {"images": len(data)},
        }, headers=headers)

    @app.post("/classify", response_model=ClassifyResponse, responses=_ERRORS, dependencies=auth,
              openapi_extra=request_body_doc(ClassifyJsonRequest, ClassifyOptions))
    async def classify(request: Request) -> JSONResponse:
        """Top-k labels with softmax scores from the classifier graph."""
        server.require("classifier", "/classify")
        images, raw = await read_request(request, settings.max_images_per_request, settings.max_body_bytes)
        options = parse_options(ClassifyOptions, raw)
        tasks.check_top_k(server, options.top_k)
        logits = await tasks.classify(server, request, "/classify", images)
        return JSONResponse({
            "model": spec.name,
            "data": [{"index": i, "predictions": pipelines.top_k(row, options.top_k)} for i, row in enumerate(logits)],
            "usage": {"images": len(logits)},
        })

    @app.get("/info", dependencies=auth)
    async def info() -> dict[str, Any]:
        """Model card, graphs with their precision and providers in use, batching settings and limits."""
        return server.info()

    @app.get("/health/live")
    async def live() -> dict[str, str]:
        return {"status": "live"}

    @app.get("/health/ready", responses={503: {"model": ErrorResponse}})
    async def ready() -> Response:
        if server.ready:
            return JSONResponse({"status": "ready"})
        reason = f"warm-up failed: {server.warmup_error}" if server.warmup_error else "warming up"
        return error_response(503, NotReady.type, reason, {"Retry-After": "1"})

    @app.get("/metrics", response_class=PlainTextResponse, responses={200: {
        "content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Prometheus text exposition 0.0.4"}})
    async def metrics() -> Response:
        return Response(server.metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/", include_in_schema=False)
    async def demo() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    @app.get("/samples", include_in_schema=False)
    async def samples() -> list[dict[str, str]]:
        """The bundled demo images, by name."""
        return [{"name": p.stem, "url": f"/samples/{p.name}"} for p in sorted(SAMPLES_DIR.glob("*.png"))]

    app.include_router(openai_routes.router, dependencies=auth)
    app.include_router(oip_routes.health_router)
    app.include_router(oip_routes.router, dependencies=auth)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    if SAMPLES_DIR.is_dir():
        app.mount("/samples", StaticFiles(directory=SAMPLES_DIR), name="samples")
    return app


def _auth_dependencies(keys: list[str]) -> list[Any]:
    """The route dependencies that check `Authorization: Bearer <key>`; none when no keys are configured
    (an open server neither pays for the check nor advertises a security scheme)."""
    if not keys:
        return []
    bearer = HTTPBearer(auto_error=False, description="one of MAE_API_KEYS")
    encoded = [k.encode() for k in keys]

    async def check(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        given = credentials.credentials.encode() if credentials else b""
        if not any(hmac.compare_digest(given, key) for key in encoded):
            raise Unauthorized("missing or wrong API key: send 'Authorization: Bearer <key>'",
                               {"WWW-Authenticate": "Bearer"})

    return [Depends(check)]


def _install_error_handlers(app: FastAPI, server: Server) -> None:
    """Every error leaves in its protocol's shape (see errors.error_response_for); client errors are counted by type."""

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> JSONResponse:
        server.metrics.rejections.labels(exc.type).inc()
        return error_response_for(request.url.path, exc.status, exc.type, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        server.metrics.rejections.labels("invalid_option").inc()
        return error_response_for(request.url.path, 422, "invalid_option", describe_validation_errors(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response_for(request.url.path, exc.status_code, kind, str(exc.detail), dict(exc.headers or {}))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s", request.url.path)
        return error_response_for(request.url.path, 500, "internal_error", "internal server error (a bug): see the server log")
