"""The Open Inference Protocol (KServe v2) over REST: health, metadata and inference for three models.

`<model>-embed`, `<model>-reconstruct` and `<model>-classify` (the last two when the model has a
decoder / a classifier) take one input, either `image` (BYTES, one encoded image file per row: raw
bytes in the binary extension, base64 or a data URI in JSON or binary) or `pixels` (FP32
[N, C, H, W], already normalized with the model's mean and std). Request `parameters` carry the
route's options, those of /embed and /reconstruct less the ones about how JSON is written (`source`,
`pooling`, `normalize`; `mask_ratio`, `seed`). They run the same tasks, option checks, queues and
limits as /embed, /reconstruct and /classify; a model's outputs are its task's named arrays. Errors
are `{"error": "..."}` with a 4xx status (the app's error handlers use `errors.error_response_for`,
which gives every path under /v2 that shape).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi import Path as PathParam
from pydantic import BaseModel, Field
from starlette.responses import Response

from service import __version__
from service.errors import OIP_PREFIX, InvalidBody, NotFound
from service.imaging import from_pixels
from service.inputs import check_image_count, image_bytes
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
from service.tasks import ImageSource, Task

if TYPE_CHECKING:
    from service.server import Server

PREFIX = OIP_PREFIX
EXTENSIONS = ["binary_tensor_data"]
health_router = APIRouter(tags=["Open Inference Protocol v2"])  # open, as /health/* is
router = APIRouter(tags=["Open Inference Protocol v2"])
ModelName = Annotated[str, PathParam(pattern=r"^[^\s/]+$", description="<model>-embed, -reconstruct or -classify")]
Version = Annotated[str, PathParam(pattern=r"^[^\s/]+$", description="the model's version (/info model.version)")]


@dataclass(frozen=True)
class V2Model:
    """One model name of the protocol: the task it runs, and the task's options it does not offer as parameters
    (how a JSON body is written; a class's top k: every probability is an output), with their fixed values."""

    task: str  # a field of service.tasks.Tasks
    absent: tuple[str, ...] = ()
    fixed: dict[str, Any] = field(default_factory=dict)

    def of(self, server: Server) -> Task[Any, Any, Any]:
        return server.tasks.named(self.task)


MODELS = {"embed": V2Model("embed", ("encoding_format",)),
          "reconstruct": V2Model("reconstruct", ("response_format",)),
          "classify": V2Model("classify", ("top_k",), {"top_k": 1})}


def served_models(server: Server) -> dict[str, V2Model]:
    """Protocol model name -> model, for the graphs the loaded model has."""
    name = server.model_dir.spec.name
    return {f"{name}-{task}": m for task, m in MODELS.items() if server.engine.has(m.of(server).graph)}


def _model(server: Server, name: str, version: str | None) -> V2Model:
    model = served_models(server).get(name)
    if model is None:
        raise NotFound(f"model {name!r} is not served; models: {', '.join(served_models(server))}")
    if version is not None and version != server.model_dir.spec.version:
        raise NotFound(f"model {name!r} has no version {version!r} (only {server.model_dir.spec.version!r})")
    return model


def _outputs(server: Server, model: V2Model) -> list[dict[str, Any]]:
    return [asdict(spec) for spec in model.of(server).array_specs()]


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
    check_image_count(tensor.shape[0], server.settings.max_images_per_request,
                      "send one input, 'image' (BYTES) or 'pixels' (FP32), with at least one row")
    if name == "image":
        return [image_bytes(v, i) for i, v in enumerate(tensor.value)]
    if not np.isfinite(tensor.value).all():
        raise InvalidBody("input 'pixels' has NaN or infinite values")
    return [from_pixels(p, server.model_dir.spec.preprocessing) for p in tensor.value]


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
    task = model.of(server)
    job = task.job(parameters, absent=model.absent, fixed=model.fixed)
    arrays = task.arrays(await server.run(request, task, job, _images(server, tensors)))
    outputs, response_parameters = arrays.outputs, arrays.parameters
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

