"""OpenAI-style embeddings: `POST /v1/embeddings` and `GET /v1/models`, over the same task as `/embed`.

Images arrive as `input` strings (a `data:image/...;base64,` URI, bare base64 of an image file, or
an http(s) URL when MAE_URL_ALLOWLIST allows its host; one string or a list), as infinity serves
them; infinity's `"modality": "image"` is accepted, not required. The embedding is the model's
default pooling, L2-normalized, the vector `/embed` returns by default; the extra body field `source`
picks the classifier's features instead, as on `/embed`. `dimensions` may only be the model's own
size (or absent): MAE embeddings are not trained to be truncated (no Matryoshka loss), so a prefix
would be a different, unvalidated embedding, and any other value is a 422 rather than a silent
approximation. Errors keep the server's envelope `{"error": {"type", "message"}}`, as OpenAI's own
API wraps them in `error`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from service.errors import InvalidOption, NotFound, UnsupportedMediaType
from service.inputs import check_image_count, image_bytes, is_json, parse_options, read_json_object
from service.responses import JSONResponse
from service.schemas import ERROR_RESPONSES, EmbeddingSource, ErrorResponse

if TYPE_CHECKING:
    from model_dir.schema import ModelJson
    from service.tasks import Embeddings, EmbedJob, EmbedTask

router = APIRouter(tags=["OpenAI-style"])


class EmbeddingsRequest(BaseModel):
    """The body of `POST /v1/embeddings`."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="the loaded model's name (GET /v1/models)")
    input: str | list[str] = Field(description="images: data URIs (data:image/png;base64,...), bare base64, or "
                                   "http(s) URLs on the server's allow-list (MAE_URL_ALLOWLIST)")
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="float: JSON numbers; base64: little-endian float32 (the OpenAI SDK's default)")
    dimensions: int | None = Field(None, ge=1, description="only the model's own size: MAE embeddings are not "
                                   "trained for truncation, so no prefix is served (422)")
    modality: Literal["image", "text"] = Field("image", description="infinity's field; only images are embedded")
    source: EmbeddingSource = Field("encoder", description="this server's extra field, as /embed's source: encoder "
                                    "or classifier (the fine-tuned classifier's pooled features)")
    user: str | None = Field(None, description="accepted and ignored")


class Embedding(BaseModel):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str = Field(description="floats, or base64 of little-endian float32")


class EmbeddingsUsage(BaseModel):
    prompt_tokens: int = Field(description="patch tokens: images x patches")
    total_tokens: int


class EmbeddingsResponse(BaseModel):
    object: Literal["list"]
    data: list[Embedding]
    model: str
    usage: EmbeddingsUsage


class ModelCard(BaseModel):
    object: Literal["model"]
    id: str
    created: int
    owned_by: str
    version: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


def check_request(body: dict[str, Any], spec: ModelJson) -> EmbeddingsRequest:
    """A body of /v1/embeddings -> the checked request for the model `spec` describes (422, or 404 for another
    model's name); the route and mae-embed's OpenAI batch files (service/bulk_embed.py) both go through it."""
    raw_input = body.get("input")
    if isinstance(raw_input, list) and raw_input and not all(isinstance(x, str) for x in raw_input):
        raise InvalidOption("input: token arrays are text; this model embeds images only "
                            "(send data URIs or base64 strings)")
    request = parse_options(EmbeddingsRequest, body)
    if request.model != spec.name:
        raise NotFound(f"model {request.model!r} is not served here; this server serves {spec.name!r}")
    if request.modality == "text":
        raise InvalidOption("modality 'text' is not supported: this model embeds images only")
    return request


def embed_job(request: EmbeddingsRequest, task: EmbedTask) -> EmbedJob:
    """The /embed job of a checked request: the embedding /embed returns by default (pooled as the model's default,
    L2-normalized), in the request's encoding and source; 422 for `dimensions` other than the model's own size."""
    job = task.job({"encoding_format": request.encoding_format, "source": request.source})
    dim = task.dim(job)
    if request.dimensions is not None and request.dimensions != dim:
        raise InvalidOption(f"dimensions {request.dimensions}: model {task.spec.name} serves {dim}-d "
                            "embeddings only (they are not trained to be truncated)")
    return job


def embeddings_response(request: EmbeddingsRequest, result: Embeddings, num_patches: int) -> EmbeddingsResponse:
    """The OpenAI-style body of a request's embeddings; usage counts patch tokens (images x patches)."""
    patch_tokens = len(result.vectors) * num_patches
    return EmbeddingsResponse.model_construct(
        object="list", model=request.model,
        data=[Embedding.model_construct(object="embedding", index=i, embedding=e) for i, e in enumerate(result.encoded())],
        usage=EmbeddingsUsage.model_construct(prompt_tokens=patch_tokens, total_tokens=patch_tokens))


@router.post("/v1/embeddings", response_model=EmbeddingsResponse, responses=ERROR_RESPONSES, openapi_extra={"requestBody": {"required": True, "content": {
    "application/json": {"schema": EmbeddingsRequest.model_json_schema()}}}})
async def create_embeddings(request: Request) -> JSONResponse:
    """Embeddings of images in the OpenAI response shape (`{"object": "list", "data": [...], ...}`)."""
    server = request.app.state.server
    settings = server.settings
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if not is_json(content_type):
        raise UnsupportedMediaType(f"content type {content_type or '(none)'!r}: /v1/embeddings takes application/json")
    body = check_request(await read_json_object(request, 'e.g. {"model": "...", "input": ["data:image/png;base64,..."]}'),
                         server.model_dir.spec)
    texts = [body.input] if isinstance(body.input, str) else body.input
    check_image_count(len(texts), settings.max_images_per_request,
                      "send 'input': a data URI or the base64 of an image file, or a list of them")
    images = [image_bytes(text, i) for i, text in enumerate(texts)]
    task = server.tasks.embed
    job = embed_job(body, task)
    result = await server.run(request, task, job, images)
    return JSONResponse(embeddings_response(body, result, server.model_dir.spec.architecture.num_patches))


@router.get("/v1/models", response_model=ModelList, responses={401: {"model": ErrorResponse}})
async def list_models(request: Request) -> dict[str, Any]:
    """The one model this server serves, in the OpenAI list shape."""
    spec = request.app.state.server.model_dir.spec
    return {"object": "list", "data": [{"object": "model", "id": spec.name, "created": 0,
                                        "owned_by": "mae-service", "version": spec.version}]}
