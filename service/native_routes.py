"""The native routes: /embed, /reconstruct, /classify, /search (and its gallery's pictures) and /info (behind the
API key when one is set), and the open ones: health, metrics, the demo page and its samples.

Each inference route reads the request (images and options), has its task prepare the job, runs it
on the server and returns the task's response model; the work itself lives in `service.tasks`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, PlainTextResponse, Response

from service import __version__, oip_routes
from service.errors import NotFound, NotReady, Wedged, error_response
from service.inputs import read_request
from service.responses import JSONResponse
from service.schemas import (
    ERROR_RESPONSES,
    ClassifyJsonRequest,
    ClassifyOptions,
    ClassifyResponse,
    EmbedJsonRequest,
    EmbedOptions,
    EmbedResponse,
    ErrorResponse,
    InfoResponse,
    ReconstructJsonRequest,
    ReconstructOptions,
    ReconstructResponse,
    SearchJsonRequest,
    SearchOptions,
    SearchResponse,
    request_body_doc,
)
from service.search import describe

if TYPE_CHECKING:
    from service.server import Server
    from service.tasks import ClassifyTask, EmbedTask, ReconstructTask, SearchTask

    AnyTask = EmbedTask | ReconstructTask | ClassifyTask | SearchTask

STATIC_DIR = Path(__file__).resolve().parent / "static"
SAMPLES_DIR = Path(__file__).resolve().parent / "samples"
router = APIRouter()  # included behind the API key
open_router = APIRouter()  # never behind it: probes, scrapers and the demo page


def _server(request: Request) -> Server:
    return request.app.state.server


async def _run(request: Request, task: AnyTask) -> Any:
    """The result of a native inference request: the route's graph, the body, the options, the batch."""
    server = _server(request)
    server.require(task)
    s = server.settings
    images, raw = await read_request(request, max_images=s.max_images_per_request, max_body_bytes=s.max_body_bytes)
    return await server.run(request, task, task.job(raw), images)


@router.post("/embed", response_model=EmbedResponse, responses=ERROR_RESPONSES,
             openapi_extra=request_body_doc(EmbedJsonRequest, EmbedOptions))
async def embed(request: Request) -> JSONResponse:
    """Embeddings of whole images: the encoder on every patch, pooled (source=encoder), or the classifier's pooled
    features (source=classifier)."""
    task = _server(request).tasks.embed
    return JSONResponse(task.respond(await _run(request, task)))


@router.post("/reconstruct", response_model=ReconstructResponse, responses={
    **ERROR_RESPONSES, 200: {"content": {"image/png": {}}, "description": "PNG panel, or JSON with response_format=json"}},
    openapi_extra=request_body_doc(ReconstructJsonRequest, ReconstructOptions))
async def reconstruct_images(request: Request) -> Response:
    """Mask each image (seeded), encode the visible patches, decode, and show or score the result."""
    server = _server(request)
    task = server.tasks.reconstruct
    result = await _run(request, task)
    headers = {"X-Seed": str(result.job.seed)}
    if result.job.response_format == "png":
        return Response(await server.offload(task.respond_png, result), media_type="image/png", headers=headers)
    return JSONResponse(await server.offload(task.respond, result), headers=headers)


@router.post("/classify", response_model=ClassifyResponse, responses=ERROR_RESPONSES,
             openapi_extra=request_body_doc(ClassifyJsonRequest, ClassifyOptions))
async def classify(request: Request) -> JSONResponse:
    """Top-k labels with softmax scores from the classifier graph."""
    task = _server(request).tasks.classify
    return JSONResponse(task.respond(await _run(request, task)))


@router.post("/search", response_model=SearchResponse, responses=ERROR_RESPONSES,
             openapi_extra=request_body_doc(SearchJsonRequest, SearchOptions))
async def search(request: Request) -> JSONResponse:
    """The k gallery items most similar to each image (cosine of the embeddings the gallery was made with); 404
    not_available without a gallery (MAE_GALLERY)."""
    task = _server(request).searchable()
    return JSONResponse(task.respond(await _run(request, task)))


@router.get("/gallery/{item}/image", responses={
    200: {"content": {"image/png": {}}, "description": "the item's picture as PNG, at most 96 pixels on a side"},
    **{code: {"model": ErrorResponse} for code in (401, 404, 422, 503)}}, response_class=Response)
async def gallery_image(request: Request, item: int = PathParam(ge=0)) -> Response:
    """The picture of a gallery item (an id /search returned), when the gallery owns one: the bundled images, a
    folder gallery's files; a Parquet gallery's files only where they lie under the Parquet file's folder."""
    server = _server(request)
    gallery = server.searchable().gallery
    if item >= len(gallery):
        raise NotFound(f"gallery item {item}: the gallery has {len(gallery)} items")
    png = await server.offload(gallery.thumbnail, item)
    if png is None:
        raise NotFound(f"gallery item {item} ({gallery.paths[item]}): no picture that this gallery owns")
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})


@router.get("/info", response_model=InfoResponse, responses={401: {"model": ErrorResponse}})
async def info(request: Request) -> dict[str, Any]:
    """Model card, graphs with their precision and providers in use, batching settings and limits."""
    server = _server(request)
    spec, s = server.model_dir.spec, server.settings
    return {
        "version": __version__,
        "ready": server.ready,
        "model": spec.model_dump(mode="json", exclude={"files", "verification"}),
        "runtime": server.engine.describe(),
        "routes": {"embed": True, "reconstruct": server.engine.has("decoder"),
                   "classify": server.engine.has("classifier"), "search": server.gallery is not None},
        "gallery": None if server.gallery is None else describe(server.gallery),
        "embedding_sources": server.tasks.embed.sources(),
        "batching": {"max_batch_size": s.max_batch_size, "max_batch_delay_ms": s.max_batch_delay_ms,
                     "inference_threads": s.inference_threads, "ort_threads_per_call": s.ort_threads_per_call(),
                     "max_queue": s.max_queue, "max_waiting": s.max_waiting, "queue_full_status": s.queue_full_status,
                     "request_timeout_s": s.request_timeout_s, "share_idle_slots": s.share_idle_slots,
                     "decode_threads": s.decode_threads, "device_defaults": server.device_defaults},
        "limits": {"max_body_bytes": s.max_body_bytes, "max_images_per_request": s.max_images_per_request,
                   "max_image_pixels": s.max_image_pixels, "image_urls": bool(s.url_allowlist),
                   "url_max_bytes": s.url_max_bytes, "url_timeout_s": s.url_timeout_s,
                   "url_max_redirects": s.url_max_redirects},
        "auth": bool(s.api_keys),
        "protocols": {
            "native": ["POST /embed", "POST /reconstruct", "POST /classify", "POST /search"],
            "openai": {"routes": ["POST /v1/embeddings", "GET /v1/models"], "model": spec.name},
            "open_inference_v2": {"rest": "/v2", "extensions": oip_routes.EXTENSIONS,
                                  "models": list(oip_routes.served_models(server))},
        },
    }


@open_router.get("/health/live", responses={503: {"model": ErrorResponse}})
async def live(request: Request) -> Response:
    """200 while the process serves; 503 when inference is wedged (a batch far past its expected time), so that
    a liveness probe restarts it."""
    problem = _server(request).liveness_problem()
    if problem:
        return error_response(503, Wedged.type, problem)
    return JSONResponse({"status": "live"})


@open_router.get("/health/ready", responses={503: {"model": ErrorResponse}})
async def ready(request: Request) -> Response:
    server = _server(request)
    if server.ready:
        return JSONResponse({"status": "ready"})
    return error_response(503, NotReady.type, server.not_ready_reason(), {"Retry-After": "1"})


@open_router.get("/metrics", response_class=PlainTextResponse, responses={200: {
    "content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Prometheus text exposition 0.0.4"}})
async def metrics(request: Request) -> Response:
    return Response(_server(request).metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")


@open_router.get("/", include_in_schema=False)
async def demo() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html")


@open_router.get("/samples", include_in_schema=False)
async def samples() -> list[dict[str, str]]:
    """The bundled demo images, by name."""
    return [{"name": p.stem, "url": f"/samples/{p.name}"} for p in sorted(SAMPLES_DIR.glob("*.png"))]
