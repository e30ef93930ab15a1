"""A Python client for the MAE service's native routes: `Client` and its async twin `AsyncClient`.

Needs httpx and numpy only (`pip install 'mae-service[client]'`); PIL images are accepted when PIL
is there, but nothing here imports it, the server's modules, torch or onnxruntime.

    from service.client import Client

    with Client("http://localhost:8000", api_key=None) as mae:
        vectors = mae.embed(["a.png", "b.jpg"])          # np.ndarray [2, D], float32
        result = mae.reconstruct("a.png", mask_ratio=0.75, seed=0)
        labels = mae.classify(["a.png"], top_k=3)      # [[Prediction(label, class_id, score), ...]]
        similar = mae.search("a.png", k=5)              # [[Neighbor(id, score, label, path), ...]]

Images are paths, bytes of an encoded file, PIL images or numpy arrays (uint8, or floats in [0, 1];
[H, W], [H, W, 1|3|4]); a list is a batch, anything else one image. Long lists are sent in
requests within the server's limits (read once from /info). 429 and 503 answers are retried
after their `Retry-After` (at most `max_retries` times, each wait capped at `max_retry_wait_s`).
Error answers raise an `MAEError` subclass chosen by the envelope's type.
"""

from __future__ import annotations

import asyncio
import base64
import os
import struct
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

import httpx
import numpy as np

RETRY_STATUSES = (429, 503)
PART_OVERHEAD_BYTES = 256  # multipart headers per image, an upper bound


class MAEError(Exception):
    """An error answer: HTTP `status`, the envelope's `type` and `message`, the server's request id."""

    def __init__(self, status: int, type_: str, message: str, request_id: str | None = None):
        super().__init__(f"{status} {type_}: {message}")
        self.status, self.type, self.message, self.request_id = status, type_, message, request_id


class InvalidImageError(MAEError):
    """invalid_image (400) or unsupported_media_type (415): an image the server cannot decode."""


class UnauthorizedError(MAEError):
    """unauthorized (401): missing or wrong API key."""


class NotAvailableError(MAEError):
    """not_available / not_found (404): the model lacks the graph a route needs."""


class PayloadTooLargeError(MAEError):
    """payload_too_large (413): a body, an image count or an image's pixels over the server's limits."""


class InvalidOptionError(MAEError):
    """invalid_option (422)."""


class OverloadedError(MAEError):
    """overloaded / not_ready (429, 503) after the retries ran out."""


class DeadlineExceededError(MAEError):
    """deadline_exceeded (504): the request's deadline passed while it waited in the server's queue."""


ERRORS: dict[str, type[MAEError]] = {
    "invalid_image": InvalidImageError, "unsupported_media_type": InvalidImageError,
    "unauthorized": UnauthorizedError, "not_available": NotAvailableError, "not_found": NotAvailableError,
    "payload_too_large": PayloadTooLargeError, "invalid_option": InvalidOptionError, "overloaded": OverloadedError,
    "not_ready": OverloadedError, "deadline_exceeded": DeadlineExceededError,
}


@dataclass(frozen=True)
class Prediction:
    label: str
    class_id: int
    score: float


@dataclass(frozen=True)
class Neighbor:
    """A gallery item /search found: its id (GET /gallery/{id}/image), cosine similarity, label and path."""

    id: int
    score: float
    label: str | None
    path: str | None


@dataclass(frozen=True)
class Reconstruction:
    """One image's reconstruction: the pictures as PNG bytes (original, masked, reconstruction, pasted)."""

    seed: int
    mask_ratio: float
    mask: np.ndarray  # [num_patches] uint8, 1 = removed
    mse_masked: float | None
    mse_masked_pixels: float | None
    images: dict[str, bytes] = field(repr=False)


def png_from_array(array: np.ndarray) -> bytes:
    """uint8 (or float in [0, 1]) [H, W] or [H, W, 1|3|4] -> PNG bytes, with zlib alone (no PIL)."""
    a = np.asarray(array)
    if a.dtype != np.uint8:
        a = np.clip(np.rint(a.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)) or 0 in a.shape:
        raise ValueError(f"an image array must be [H, W] or [H, W, 1|3|4], not {list(a.shape)}")
    color = 0 if a.ndim == 2 else {3: 2, 4: 6}[a.shape[2]]  # PNG colour types: gray, RGB, RGBA
    rows = b"".join(b"\x00" + row.tobytes() for row in np.ascontiguousarray(a).reshape(a.shape[0], -1))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", a.shape[1], a.shape[0], 8, color, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows, 6)) + chunk(b"IEND", b"")


def image_bytes(image: Any) -> bytes:
    """A path, encoded bytes, a PIL image or an array -> the bytes of an encoded image file."""
    if isinstance(image, bytes | bytearray | memoryview):
        return bytes(image)
    if isinstance(image, str | os.PathLike):
        return Path(image).read_bytes()
    if isinstance(image, np.ndarray):
        return png_from_array(image)
    if hasattr(image, "save") and hasattr(image, "mode"):  # a PIL image, without importing PIL
        out = BytesIO()
        image.save(out, format="PNG")
        return out.getvalue()
    raise TypeError(f"an image is a path, bytes, a PIL image or a numpy array, not {type(image).__name__}")


class _Base:
    """What both clients share: images, batching within the limits, retries, answers to results."""

    def __init__(self, base_url: str, *, api_key: str | None, timeout: float, max_retries: int,
                 max_retry_wait_s: float):
        self.base_url = base_url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout, self.max_retries, self.max_retry_wait_s = timeout, max_retries, max_retry_wait_s
        self._limits: dict[str, int] | None = None

    @staticmethod
    def _images(images: Any) -> list[bytes]:
        return [image_bytes(i) for i in (images if isinstance(images, list | tuple) else [images])]

    @staticmethod
    def _one(image: Any) -> list[bytes]:
        if isinstance(image, list | tuple):
            raise TypeError("reconstruct takes one image, not a list")
        return [image_bytes(image)]

    def _batches(self, images: list[bytes]) -> list[list[bytes]]:
        """Consecutive runs of images, each within the image count and body size limits from /info."""
        assert self._limits is not None
        max_images, max_bytes = self._limits["max_images_per_request"], self._limits["max_body_bytes"]
        batches: list[list[bytes]] = [[]]
        size = 0
        for data in images:
            cost = len(data) + PART_OVERHEAD_BYTES
            if batches[-1] and (len(batches[-1]) >= max_images or size + cost > max_bytes):
                batches.append([])
                size = 0
            batches[-1].append(data)
            size += cost
        return batches

    @staticmethod
    def _form(batch: Sequence[bytes], options: dict[str, Any]) -> dict[str, Any]:
        return {"files": [("image", (f"image-{i}", data, "application/octet-stream")) for i, data in enumerate(batch)],
                "data": {k: str(v).lower() if isinstance(v, bool) else str(v)
                         for k, v in options.items() if v is not None}}

    def _retry_after(self, response: httpx.Response, attempt: int) -> float | None:
        """Seconds to wait before retrying, or None when the answer is final."""
        if response.status_code not in RETRY_STATUSES or attempt >= self.max_retries:
            return None
        try:
            wait = float(response.headers.get("retry-after", "1"))
        except ValueError:
            wait = 1.0
        return min(max(wait, 0.0), self.max_retry_wait_s)

    @staticmethod
    def _check(response: httpx.Response) -> httpx.Response:
        if response.is_success:
            return response
        try:
            error = response.json()["error"]
        except (ValueError, KeyError, TypeError):
            error = {"type": "http_error", "message": response.text[:500]}
        if isinstance(error, str):  # the Open Inference Protocol's shape
            error = {"type": "http_error", "message": error}
        cls = ERRORS.get(error.get("type", ""), MAEError)
        raise cls(response.status_code, error.get("type", "http_error"), error.get("message", ""),
                  response.headers.get("x-request-id"))

    def _keep_limits(self, info: dict[str, Any]) -> dict[str, Any]:
        self._limits = info["limits"]
        return info

    @staticmethod
    def _vectors(answer: dict[str, Any]) -> list[np.ndarray]:
        return [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in answer["data"]]

    @staticmethod
    def _predictions(answer: dict[str, Any]) -> list[list[Prediction]]:
        return [[Prediction(p["label"], p["class_id"], p["score"]) for p in d["predictions"]] for d in answer["data"]]

    @staticmethod
    def _neighbors(answer: dict[str, Any]) -> list[list[Neighbor]]:
        return [[Neighbor(n["id"], n["score"], n["label"], n["path"]) for n in d["neighbors"]] for d in answer["data"]]

    @staticmethod
    def _reconstruction(answer: dict[str, Any]) -> Reconstruction:
        (item,) = answer["data"]
        return Reconstruction(seed=answer["seed"], mask_ratio=answer["mask_ratio"],
                              mask=np.asarray(item["mask"], dtype=np.uint8), mse_masked=item["mse_masked"],
                              mse_masked_pixels=item["mse_masked_pixels"],
                              images={k: base64.b64decode(v) for k, v in item["images"].items()})


class Client(_Base):
    """Synchronous client; `with Client(url) as mae: ...` closes its connections."""

    def __init__(self, base_url: str, *, api_key: str | None = None, timeout: float = 60.0, max_retries: int = 3,
                 max_retry_wait_s: float = 30.0, transport: httpx.BaseTransport | None = None):
        super().__init__(base_url, api_key=api_key, timeout=timeout, max_retries=max_retries,
                         max_retry_wait_s=max_retry_wait_s)
        self._http = httpx.Client(base_url=self.base_url, headers=self.headers, timeout=timeout, transport=transport)

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        for attempt in range(self.max_retries + 1):
            response = self._http.request(method, path, **kwargs)
            wait = self._retry_after(response, attempt)
            if wait is None:
                break
            time.sleep(wait)
        return self._check(response)

    def info(self) -> dict[str, Any]:
        """The server's /info: model card, limits, batching settings, protocols."""
        return self._keep_limits(self._request("GET", "/info").json())

    def _post_batches(self, path: str, images: list[bytes], options: dict[str, Any]) -> list[dict[str, Any]]:
        if self._limits is None:
            self.info()
        return [self._request("POST", path, **self._form(batch, options)).json() for batch in self._batches(images)]

    def embed(self, images: Any, *, source: str | None = None, pooling: str | None = None,
              normalize: bool = True) -> np.ndarray:
        """[N, D] float32 embeddings, one row per image, in order; `source="classifier"`: the classifier's pooled
        features (no pooling then; /info `embedding_sources` says whether the model has them)."""
        answers = self._post_batches("/embed", self._images(images), {
            "source": source, "pooling": pooling, "normalize": normalize, "encoding_format": "base64"})
        return np.stack([v for a in answers for v in self._vectors(a)])

    def reconstruct(self, image: Any, *, mask_ratio: float = 0.75, seed: int | None = None) -> Reconstruction:
        """Mask one image (seeded: the same seed gives the same pixels), encode, decode."""
        (answer,) = self._post_batches("/reconstruct", self._one(image),
                                       {"mask_ratio": mask_ratio, "seed": seed, "response_format": "json"})
        return self._reconstruction(answer)

    def classify(self, images: Any, *, top_k: int = 5) -> list[list[Prediction]]:
        """The top_k labels of each image, most probable first."""
        answers = self._post_batches("/classify", self._images(images), {"top_k": top_k})
        return [p for a in answers for p in self._predictions(a)]

    def search(self, images: Any, *, k: int = 5, label: str | None = None) -> list[list[Neighbor]]:
        """The k gallery items most similar to each image, most similar first; `label`: among that label's only
        (NotAvailableError when the server has no gallery)."""
        answers = self._post_batches("/search", self._images(images), {"k": k, "label": label})
        return [n for a in answers for n in self._neighbors(a)]

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient(_Base):
    """The asyncio twin of Client: the same methods, awaited; `async with AsyncClient(url) as mae: ...`.
    The requests of one long list run concurrently, at most `max_concurrent_requests` at a time."""

    def __init__(self, base_url: str, *, api_key: str | None = None, timeout: float = 60.0, max_retries: int = 3,
                 max_retry_wait_s: float = 30.0, transport: httpx.AsyncBaseTransport | None = None,
                 max_concurrent_requests: int = 4):
        super().__init__(base_url, api_key=api_key, timeout=timeout, max_retries=max_retries,
                         max_retry_wait_s=max_retry_wait_s)
        self.max_concurrent_requests = max_concurrent_requests  # per call: the batches of a long list in flight
        self._http = httpx.AsyncClient(base_url=self.base_url, headers=self.headers, timeout=timeout,
                                       transport=transport)

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        for attempt in range(self.max_retries + 1):
            response = await self._http.request(method, path, **kwargs)
            wait = self._retry_after(response, attempt)
            if wait is None:
                break
            await asyncio.sleep(wait)
        return self._check(response)

    async def info(self) -> dict[str, Any]:
        return self._keep_limits((await self._request("GET", "/info")).json())

    async def _post_batches(self, path: str, images: list[bytes], options: dict[str, Any]) -> list[dict[str, Any]]:
        if self._limits is None:
            await self.info()
        slots = asyncio.Semaphore(self.max_concurrent_requests)

        async def post(batch: list[bytes]) -> dict[str, Any]:
            async with slots:
                return (await self._request("POST", path, **self._form(batch, options))).json()

        return list(await asyncio.gather(*(post(batch) for batch in self._batches(images))))

    async def embed(self, images: Any, *, source: str | None = None, pooling: str | None = None,
                    normalize: bool = True) -> np.ndarray:
        answers = await self._post_batches("/embed", self._images(images), {
            "source": source, "pooling": pooling, "normalize": normalize, "encoding_format": "base64"})
        return np.stack([v for a in answers for v in self._vectors(a)])

    async def reconstruct(self, image: Any, *, mask_ratio: float = 0.75, seed: int | None = None) -> Reconstruction:
        (answer,) = await self._post_batches("/reconstruct", self._one(image),
                                             {"mask_ratio": mask_ratio, "seed": seed, "response_format": "json"})
        return self._reconstruction(answer)

    async def classify(self, images: Any, *, top_k: int = 5) -> list[list[Prediction]]:
        answers = await self._post_batches("/classify", self._images(images), {"top_k": top_k})
        return [p for a in answers for p in self._predictions(a)]

    async def search(self, images: Any, *, k: int = 5, label: str | None = None) -> list[list[Neighbor]]:
        answers = await self._post_batches("/search", self._images(images), {"k": k, "label": label})
        return [n for a in answers for n in self._neighbors(a)]

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
