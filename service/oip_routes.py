"""The Open Inference Protocol (KServe v2) over REST: health, metadata and inference for three models.

`<model>-embed`, `<model>-reconstruct` and `<model>-classify` (the last two when the model has a
decoder / a classifier) take one input, either `image` (BYTES, one encoded image file per row: raw
bytes in the binary extension, base64 or a data URI in JSON or binary) or `pixels` (FP32
[N, C, H, W], already normalized with the model's mean and std). Request `parameters` carry the
route's options (`source`, `pooling`, `normalize`; `mask_ratio`, `seed`). They run the same tasks, queues and
limits as /embed, /reconstruct and /classify. Errors are `{"error": "..."}` with a 4xx status
(the app's error handlers use `errors.error_response_for`, which gives every path under /v2 that shape).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi import Path as PathParam
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from model_dir.schema import Pooling
from service import __version__
from service.errors import OIP_PREFIX, InvalidBody, NotFound, PayloadTooLarge
from service.imaging import from_pixels
from service.inputs import decode_base64_image, parse_options
from service.oip_tensors import (
    InferRequest,
    InferResponse,
    Tensor,
    TensorError,
    TensorMetadata,
    encode_infer_response,
    parse_infer_request,
)
from service.responses import JSONResponse
from service.schemas import ClassifyOptions, EmbeddingSource, EmbedOptions, MaskRatio, ReconstructOptions, Seed
from service.tasks import ImageSource, MaskedImage, ReconstructTask

if TYPE_CHECKING:
    from service.server import Server

PREFIX = OIP_PREFIX
EXTENSIONS = ["binary_tensor_data"]
health_router = APIRouter(tags=["Open Inference Protocol v2"])  # open, as /health/* is
router = APIRouter(tags=["Open Inference Protocol v2"])
ModelName = Annotated[str, PathParam(pattern=r"^[^\s/]+$", description="<model>-embed, -reconstruct or -classify")]
Version = Annotated[str, PathParam(pattern=r"^[^\s/]+$", description="the model's version (/info model.version)")]
_ENCODED_TEXT = re.compile(rb"^(data:[\w.+-]+/[\w.+-]+(;[\w=.+-]+)*;base64,)?[A-Za-z0-9+/=\s]+$")


class _Parameters(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EmbedParameters(_Parameters):
    source: EmbeddingSource = "encoder"
    pooling: Pooling | None = None
    normalize: bool = True


class ReconstructParameters(_Parameters):
    mask_ratio: MaskRatio = 0.75
    seed: Seed | None = None


@dataclass(frozen=True)
class V2Model:
    """One model name of the protocol: the route it stands for, the graph it needs, its outputs."""

    task: str
    graph: str
    parameters: type[_Parameters]


MODELS = {"embed": V2Model("embed", "encoder", EmbedParameters),
          "reconstruct": V2Model("reconstruct", "decoder", ReconstructParameters),
          "classify": V2Model("classify", "classifier", _Parameters)}


def served_models(server: Server) -> dict[str, V2Model]:
    """Protocol model name -> model, for the graphs the loaded model has."""
    name = server.model_dir.spec.name
    return {f"{name}-{task}": m for task, m in MODELS.items() if server.engine.has(m.graph)}


def _model(server: Server, name: str, version: str | None) -> V2Model:
    model = served_models(server).get(name)
    if model is None:
        raise NotFound(f"model {name!r} is not served; models: {', '.join(served_models(server))}")
    if version is not None and version != server.model_dir.spec.version:
        raise NotFound(f"model {name!r} has no version {version!r} (only {server.model_dir.spec.version!r})")
    return model


def _outputs(server: Server, model: V2Model) -> list[dict[str, Any]]:
    spec = server.model_dir.spec
    a = spec.architecture
    image = [-1, a.in_chans, a.img_size, a.img_size]
    return {
        # The width depends on the request's pooling and source (/info's embedding_sources): a variable dimension.
        "embed": [{"name": "embedding", "datatype": "FP32", "shape": [-1, -1]}],
        "reconstruct": [{"name": "reconstruction", "datatype": "FP32", "shape": image},
                        {"name": "pasted", "datatype": "FP32", "shape": image},
                        {"name": "mask", "datatype": "UINT8", "shape": [-1, a.num_patches]},
                        {"name": "mse_masked", "datatype": "FP32", "shape": [-1]}],
        "classify": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, len(server.tasks.classify.labels)]},
                     {"name": "class_id", "datatype": "INT64", "shape": [-1]},
                     {"name": "label", "datatype": "BYTES", "shape": [-1]}],
    }[model.task]


class OIPError(BaseModel):
    error: str


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata] = Field(description="one of them per request: image (BYTES) or pixels (FP32)")
    outputs: list[TensorMetadata]


class Live(BaseModel):
    live: bool


class Ready(BaseModel):
    ready: bool


class ModelReady(BaseModel):
    name: str
    ready: bool


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": OIPError} for code in codes}


@health_router.get(PREFIX + "/health/live", response_model=Live, responses={503: {"model": Live}})
async def live(request: Request) -> Response:
    is_live = request.app.state.server.liveness_problem() is None  # as /health/live
    return JSONResponse({"live": is_live}, status_code=200 if is_live else 503)


@health_router.get(PREFIX + "/health/ready", response_model=Ready, responses={503: {"model": Ready}})
async def ready(request: Request) -> Response:
    is_ready = request.app.state.server.ready
    return JSONResponse({"ready": is_ready}, status_code=200 if is_ready else 503)


@router.get(PREFIX, response_model=ServerMetadata, responses=_errors(401))
async def server_metadata() -> dict[str, Any]:
    return {"name": "mae-service", "version": __version__, "extensions": EXTENSIONS}


def _metadata(request: Request, name: str, version: str | None) -> dict[str, Any]:
    server = request.app.state.server
    model = _model(server, name, version)
    a = server.model_dir.spec.architecture
    return {"name": name, "versions": [server.model_dir.spec.version], "platform": "mae-service_onnxruntime",
            "inputs": [{"name": "image", "datatype": "BYTES", "shape": [-1]},
                       {"name": "pixels", "datatype": "FP32", "shape": [-1, a.in_chans, a.img_size, a.img_size]}],
            "outputs": _outputs(server, model)}


@router.get(PREFIX + "/models/{name}", response_model=ModelMetadata, responses=_errors(401, 404))
async def model_metadata(request: Request, name: ModelName) -> dict[str, Any]:
    return _metadata(request, name, None)


@router.get(PREFIX + "/models/{name}/versions/{version}", response_model=ModelMetadata,
            responses=_errors(401, 404))
async def model_version_metadata(request: Request, name: ModelName, version: Version) -> dict[str, Any]:
    return _metadata(request, name, version)


def _ready(request: Request, name: str, version: str | None) -> Response:
    server = request.app.state.server
    _model(server, name, version)
    return JSONResponse({"name": name, "ready": server.ready}, status_code=200 if server.ready else 503)


_READY_DOC = {**_errors(401, 404), 503: {"model": ModelReady}}


@router.get(PREFIX + "/models/{name}/ready", response_model=ModelReady, responses=_READY_DOC)
async def model_ready(request: Request, name: ModelName) -> Response:
    return _ready(request, name, None)


@router.get(PREFIX + "/models/{name}/versions/{version}/ready", response_model=ModelReady,
            responses=_READY_DOC)
async def model_version_ready(request: Request, name: ModelName, version: Version) -> Response:
    return _ready(request, name, version)


def _image_bytes(value: bytes, index: int) -> bytes:
    """A BYTES element: an encoded image file, or its base64 / data URI (what JSON can carry)."""
    if _ENCODED_TEXT.match(value):
        return decode_base64_image(value.decode("ascii"), index)
    return value


def _images(server: Server, tensors: dict[str, Tensor]) -> list[ImageSource]:
    """The request's one input -> images: encoded files (BYTES `image`) or model inputs (FP32 `pixels`)."""
    if set(tensors) - {"image", "pixels"} or len(tensors) != 1:
        raise InvalidBody(f"inputs {sorted(tensors)}: send exactly one input, 'image' (BYTES) or 'pixels' (FP32)")
    (name, tensor), = tensors.items()
    a = server.model_dir.spec.architecture
    want = {"image": "BYTES", "pixels": "FP32"}[name]
    if tensor.datatype != want:
        raise InvalidBody(f"input {name!r} must be {want}, not {tensor.datatype}")
    shape_ok = (len(tensor.shape) == 1 or tensor.shape[1:] == (1,) if name == "image"
                else tensor.shape[1:] == (a.in_chans, a.img_size, a.img_size))
    if not shape_ok:
        expected = "[N] or [N, 1]" if name == "image" else f"[N, {a.in_chans}, {a.img_size}, {a.img_size}]"
        raise InvalidBody(f"input {name!r} has shape {list(tensor.shape)}; expected {expected}")
    count, limit = tensor.shape[0], server.settings.max_images_per_request
    if count < 1:
        raise InvalidBody(f"input {name!r} has no image")
    if count > limit:
        raise PayloadTooLarge(f"{count} images in one request, over the limit of {limit}")
    if name == "image":
        return [_image_bytes(v, i) for i, v in enumerate(tensor.value)]
    if not np.isfinite(tensor.value).all():
        raise InvalidBody("input 'pixels' has NaN or infinite values")
    return [from_pixels(p, server.model_dir.spec.preprocessing) for p in tensor.value]


async def _run(model: V2Model, server: Server, request: Request, images: list[ImageSource],
               options: Any) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(outputs by name, response parameters) of one model on the images, through the native routes' tasks."""
    tasks = server.tasks
    if model.task == "embed":
        embed = tasks.embed.prepare(EmbedOptions(source=options.source, pooling=options.pooling,
                                                 normalize=options.normalize))
        _, tokens = await server.run(request, tasks.embed, embed, images)
        return {"embedding": np.stack(tasks.embed.vectors(embed, tokens))}, {}
    if model.task == "reconstruct":
        job = tasks.reconstruct.prepare(ReconstructOptions(mask_ratio=options.mask_ratio, seed=options.seed))
        items, preds = await server.run(request, tasks.reconstruct, job, images)
        pictures = await server.offload(_reconstructions, tasks.reconstruct, items, preds)
        return pictures, {"seed": job.seed, "mask_ratio": job.mask_ratio}
    classify = tasks.classify.prepare(ClassifyOptions(top_k=1))
    _, logits = await server.run(request, tasks.classify, classify, images)
    probabilities = tasks.classify.probabilities(np.stack(logits)).astype(np.float32)
    top = np.argmax(probabilities, axis=1)
    labels = np.array([tasks.classify.labels[i] for i in top], dtype=object)
    return {"probabilities": probabilities, "class_id": top.astype(np.int64), "label": labels}, {}


def _reconstructions(task: ReconstructTask, items: list[MaskedImage], preds: list[np.ndarray]) -> dict[str, np.ndarray]:
    found = task.reconstructions(items, preds)
    return {"reconstruction": np.stack([r.reconstruction for r in found]).astype(np.float32),
            "pasted": np.stack([r.pasted for r in found]).astype(np.float32),
            "mask": np.stack([item.masking.mask for item in items]).astype(np.uint8),
            "mse_masked": np.array([np.nan if r.mse_masked is None else r.mse_masked for r in found], np.float32)}


_INFER_DOC = {**_errors(400, 401, 404, 413, 422, 429, 503, 504), 200: {"content": {
    "application/octet-stream": {}},
    "description": "JSON, or with binary outputs the JSON header (Inference-Header-Content-Length bytes) then the tensors"}}


_INFER_BODY = {"requestBody": {"required": True, "content": {"application/json": {
    "schema": InferRequest.model_json_schema()}}, "description": "JSON; or with the binary tensor extension the "
    "JSON header (Inference-Header-Content-Length bytes) then the tensors"}}


@router.post(PREFIX + "/models/{name}/infer", response_model=InferResponse, responses=_INFER_DOC,
             openapi_extra=_INFER_BODY)
async def infer(request: Request, name: ModelName) -> Response:
    """Run one of the three models; JSON tensors or the binary tensor extension, in and out."""
    return await _infer(request, name, None)


@router.post(PREFIX + "/models/{name}/versions/{version}/infer", response_model=InferResponse, responses=_INFER_DOC,
             openapi_extra=_INFER_BODY)
async def infer_version(request: Request, name: ModelName, version: Version) -> Response:
    return await _infer(request, name, version)


async def _infer(request: Request, name: str, version: str | None) -> Response:
    """Run one of the three models; JSON tensors or the binary tensor extension, in and out."""
    server = request.app.state.server
    model = _model(server, name, version)
    try:
        body, tensors = parse_infer_request(await request.body(),
                                            request.headers.get("inference-header-content-length"))
    except TensorError as e:
        raise InvalidBody(str(e)) from e
    requested = body.outputs if body.outputs is not None else []
    names = [o["name"] for o in _outputs(server, model)]
    unknown = [o.name for o in requested if o.name not in names]
    if unknown:
        raise InvalidBody(f"unknown outputs {unknown}; {name} has {names}")
    parameters = dict(body.parameters)
    binary_default = bool(parameters.pop("binary_data_output", False))
    options = parse_options(model.parameters, parameters)
    images = _images(server, tensors)
    outputs, response_parameters = await _run(model, server, request, images, options)
    if requested:
        outputs = {o.name: outputs[o.name] for o in requested}
    binary = {n: bool(next((o.parameters.get("binary_data", binary_default) for o in requested if o.name == n),
                           binary_default)) for n in outputs}
    head: dict[str, Any] = {"model_name": name, "model_version": server.model_dir.spec.version,
                            **({"id": body.id} if body.id is not None else {}),
                            **({"parameters": response_parameters} if response_parameters else {})}
    content, header_length = encode_infer_response(head, outputs, binary)
    if header_length is None:
        return Response(content, media_type="application/json")
    return Response(content, media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(header_length)})

