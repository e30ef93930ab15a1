"""Request options and response bodies of the HTTP API as pydantic models (the contract `/docs` shows)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from model_dir.schema import Pooling
from service.masking import MAX_SEED

MaskRatio = Annotated[float, Field(ge=0.0, lt=1.0)]  # the model-dependent bound (>= 1 patch visible): tasks
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]


class _Options(BaseModel):
    """Options arrive as form fields, JSON fields or query parameters; unknown names are an error."""

    model_config = ConfigDict(extra="forbid")


EmbeddingSource = Literal["encoder", "classifier"]


class EmbedOptions(_Options):
    source: EmbeddingSource = Field(
        "encoder", description="encoder: the MAE encoder's tokens, pooled; classifier: the fine-tuned classifier's "
        "pooled features (the input of its last Linear; they cluster by class), when the model has them (/info)")
    pooling: Pooling | None = Field(None, description="cls, mean or cls+mean; default: the model's (source=encoder "
                                    "only)")
    normalize: bool = Field(True, description="L2-normalize each embedding")
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="float: JSON numbers; base64: little-endian float32 bytes")


class ReconstructOptions(_Options):
    mask_ratio: MaskRatio = Field(0.75, description="fraction of patches removed (>= 1 stays visible)")
    seed: Seed | None = Field(None, description="mask seed; random when absent, always returned")
    response_format: Literal["png", "json"] = Field(
        "png", description="png: one panel per image (original | masked | reconstruction | pasted); json: details")


class ClassifyOptions(_Options):
    top_k: int = Field(5, ge=1, description="labels per image, at most the model's number of labels (/info "
                       "model.labels; more is a 422, not silently clamped)")


MAX_SEARCH_K = 100  # neighbours per query image: a bound on the response, not on the index


class SearchOptions(_Options):
    k: int = Field(5, ge=1, le=MAX_SEARCH_K, description="gallery items per image, most similar first; at most the "
                   "gallery's items (of `label`, when given): more is a 422")
    label: str | None = Field(None, description="only gallery items with this label (/info gallery.labels)")


class _Images(BaseModel):
    image: str | None = Field(None, description="one image: base64, a data URI, or an http(s) URL on the server's "
                              "allow-list (MAE_URL_ALLOWLIST)")
    images: list[str] | None = Field(None, description="several images: base64, data URIs or allowed URLs")


class EmbedJsonRequest(EmbedOptions, _Images):
    pass


class ReconstructJsonRequest(ReconstructOptions, _Images):
    pass


class ClassifyJsonRequest(ClassifyOptions, _Images):
    pass


class SearchJsonRequest(SearchOptions, _Images):
    pass


class Usage(BaseModel):
    images: int


class EmbeddingItem(BaseModel):
    index: int
    embedding: list[float] | str = Field(description="floats, or base64 of little-endian float32")


class EmbedResponse(BaseModel):
    model: str
    dim: int
    source: EmbeddingSource
    pooling: Pooling | None = Field(description="null for source=classifier")
    normalized: bool
    encoding_format: Literal["float", "base64"]
    data: list[EmbeddingItem]
    usage: Usage


class Prediction(BaseModel):
    label: str
    class_id: int
    score: float = Field(description="softmax probability")


class ClassifyItem(BaseModel):
    index: int
    predictions: list[Prediction]


class ClassifyResponse(BaseModel):
    model: str
    data: list[ClassifyItem]
    usage: Usage


class Neighbor(BaseModel):
    id: int = Field(description="the gallery item's index (GET /gallery/{id}/image: its picture, when it has one)")
    score: float = Field(description="cosine similarity to the query image, in [-1, 1]")
    label: str | None
    path: str | None = Field(description="where the item's image came from (a folder gallery: relative to it)")


class SearchItem(BaseModel):
    index: int
    neighbors: list[Neighbor]


class SearchResponse(BaseModel):
    model: str
    source: EmbeddingSource = Field(description="the embeddings compared: the gallery's source and pooling")
    pooling: Pooling | None
    gallery_size: int
    data: list[SearchItem]
    usage: Usage


class PatchGrid(BaseModel):
    rows: int
    cols: int
    patch_size: int
    num_patches: int
    num_visible: int


class ReconstructImages(BaseModel):
    original: str = Field(description="base64 PNG at the model's resolution")
    masked: str
    reconstruction: str
    pasted: str = Field(description="the reconstruction with the visible patches of the original pasted back")


class ReconstructItem(BaseModel):
    index: int
    mask: list[int] = Field(description="per patch in row-major order: 1 removed, 0 visible")
    mse_masked: float | None = Field(
        description="mean squared error on removed patches, in the training target's space; null when the mask "
        "ratio removes no patch")
    mse_masked_pixels: float | None = Field(
        description="mean squared error on removed patches, pixels in [0, 1]; null when no patch is removed")
    images: ReconstructImages


class ReconstructResponse(BaseModel):
    model: str
    seed: int
    mask_ratio: float
    norm_pix_loss: bool
    denormalized_with_target_stats: bool = Field(
        description="true when removed patches were de-normalized with the original patch's mean and std")
    grid: PatchGrid
    data: list[ReconstructItem]
    usage: Usage


class ErrorBody(BaseModel):
    type: str
    message: str


class InfoRoutes(BaseModel):
    embed: bool
    reconstruct: bool = Field(description="the model has a decoder")
    classify: bool = Field(description="the model has a classifier")
    search: bool = Field(description="a gallery is configured (MAE_GALLERY)")


class InfoClassifierSource(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dim: int
    knn: dict[str, Any] | None = Field(description="kNN figures recorded in model.json (training.knn), if any")


class InfoEncoderSource(InfoClassifierSource):
    default_pooling: Pooling


class InfoBatching(BaseModel):
    max_batch_size: int
    max_batch_delay_ms: float
    inference_threads: int
    ort_threads_per_call: int
    max_queue: int
    max_waiting: int
    queue_full_status: int
    request_timeout_s: float
    share_idle_slots: bool
    decode_threads: int
    device_defaults: list[str] = Field(description="the settings above that the device's defaults chose (a GPU's: "
                                       "bigger, full batches, a longer queue, more decode threads); the rest are "
                                       "the CPU defaults or set explicitly")


class InfoLimits(BaseModel):
    max_body_bytes: int
    max_images_per_request: int
    max_image_pixels: int
    image_urls: bool = Field(description="http(s) image URLs are accepted (MAE_URL_ALLOWLIST is set); the list "
                             "itself is not shown")
    url_max_bytes: int = Field(description="an image URL's body limit")
    url_timeout_s: float = Field(description="an image URL's whole fetch, redirects included")
    url_max_redirects: int


class InfoGallery(BaseModel):
    origin: str = Field(description="bundled, folder: PATH, or parquet: PATH")
    size: int
    index: Literal["exact"] = Field(description="cosine similarity by one matmul over every item")
    source: EmbeddingSource
    pooling: Pooling | None
    ready: bool = Field(description="embedded (a folder or the bundled gallery is embedded at startup)")
    labels: dict[str, int] = Field(description="items per label")
    images: bool = Field(description="GET /gallery/{id}/image serves the items' pictures")


class InfoProtocols(BaseModel):
    native: list[str]
    openai: dict[str, Any] = Field(description="routes and the model name to send")
    open_inference_v2: dict[str, Any] = Field(description="REST prefix, extensions, model names")


class InfoResponse(BaseModel):
    """GET /info: what the Python client reads its limits from."""

    version: str
    ready: bool
    model: dict[str, Any] = Field(description="model.json, less its file list and verification table")
    runtime: dict[str, Any] = Field(description="engine, device, and per graph its precision and providers")
    routes: InfoRoutes
    embedding_sources: dict[EmbeddingSource, InfoClassifierSource | InfoEncoderSource]
    batching: InfoBatching
    limits: InfoLimits
    auth: bool = Field(description="whether an API key is required")
    protocols: InfoProtocols
    gallery: InfoGallery | None = Field(description="the gallery POST /search searches; null: none configured")


class ErrorResponse(BaseModel):
    error: ErrorBody


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 415, 422, 429, 503, 504)}


def request_body_doc(json_model: type[BaseModel], options_model: type[BaseModel]) -> dict[str, Any]:
    """OpenAPI `requestBody` for a route that reads JSON or multipart itself."""
    form = options_model.model_json_schema()
    form["properties"] = {
        "image": {"type": "array", "items": {"type": "string", "format": "binary"}, "description": "image files"},
        **form.get("properties", {}),
    }
    form["required"] = ["image"]
    return {"requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": form},
        "application/json": {"schema": json_model.model_json_schema()},
    }}}
