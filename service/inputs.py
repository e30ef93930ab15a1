"""Reading a request: image bytes from multipart files or JSON base64 / data URIs, options from body and query.

`image_bytes` and `check_image_count` are the one reading of images and the one count check of every
protocol (native, OpenAI-style, Open Inference Protocol): the same text is the same image, the same URL
to fetch, or the same error, whichever route it came to."""

from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

from service.errors import InvalidBody, InvalidImage, InvalidOption, PayloadTooLarge, UnsupportedMediaType
from service.fetch import ImageURL

IMAGE_FIELDS = ("image", "images")
_DATA_URI = re.compile(r"^data:[\w.+-]+/[\w.+-]+(;[\w=.+-]+)*;base64,", re.IGNORECASE)
_BASE64 = re.compile(r"^[A-Za-z0-9+/=\r\n]+$")  # bare base64, maybe wrapped in lines; a space makes it text
_WHITESPACE = re.compile(r"\s+")

OptionsT = TypeVar("OptionsT", bound=BaseModel)


def image_bytes(value: str | bytes, index: int) -> bytes | ImageURL:
    """One image of a request, in any protocol -> the bytes of its file, or the URL to fetch it from.

    Text (a JSON string, a form field, a tensor element): a `data:<type>;base64,` URI or bare base64 (400
    when it is not valid base64); an `http(s)://` URL is an ImageURL, which the server checks against
    MAE_URL_ALLOWLIST (a 422 while that is empty) and fetches; any other text is a 422 that says what to
    send. Bytes (a multipart file, a binary tensor element): the file itself, unless it is such text."""
    if isinstance(value, bytes):
        if not value.isascii():
            return value
        text = value.decode("ascii")
        if not (_BASE64.match(text) or text[:5].lower() == "data:" or _is_url(text)):
            return value
        value = text
    match = _DATA_URI.match(value)
    if match:
        text = _WHITESPACE.sub("", value[match.end():])
    elif value[:5].lower() == "data:":
        raise InvalidImage(f"image {index}: data URIs must be base64 (data:<type>;base64,<data>)")
    elif _is_url(value):
        return ImageURL(value.strip())
    elif not value.strip():
        raise InvalidImage(f"image {index}: empty")
    elif _BASE64.match(value):
        text = value
    else:
        raise InvalidOption(f"image {index} is text, not an image: this model embeds images only; send a data URI "
                            "(data:image/png;base64,...) or the base64 of an image file")
    try:
        data = base64.b64decode(_WHITESPACE.sub("", text), validate=True)
    except (binascii.Error, ValueError) as e:
        raise InvalidImage(f"image {index}: not valid base64 ({e})") from e
    if not data:
        raise InvalidImage(f"image {index}: empty")
    return data


def _is_url(text: str) -> bool:
    return text.lstrip()[:8].lower().startswith(("http://", "https://"))


def check_image_count(count: int, limit: int, how: str) -> None:
    """422 for a request without an image (`how`: what the protocol's clients should send), 413 over the limit."""
    if count < 1:
        raise InvalidOption(f"no image: {how}")
    if count > limit:
        raise PayloadTooLarge(f"{count} images in one request, over the limit of {limit}")


def is_json(content_type: str) -> bool:
    return content_type == "application/json" or content_type.endswith("+json")


async def read_json_object(request: Request, example: str) -> dict[str, Any]:
    """The JSON object in a request's body (400 when it is not JSON or not an object)."""
    try:
        body = json.loads(await request.body())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidBody(f"request body is not valid JSON ({e})") from e
    if not isinstance(body, dict):
        raise InvalidBody(f"the JSON body must be an object, {example}")
    return body


async def _read_form(request: Request, content_type: str, *, max_images: int, max_body_bytes: int) -> FormData:
    """The form body, its files kept in memory: the body is bounded by max_body_bytes and each image is read into
    memory next anyway, while Starlette's spooling of parts over 1 MB to a temporary file made a full /tmp (a
    read-only container's small tmpfs, a pod's emptyDir) a 500, and a busy one a pod eviction."""
    limits = dict(max_files=max_images, max_fields=max_images + 64, max_part_size=max_body_bytes)
    try:
        if content_type != "multipart/form-data":
            return await request.form(**limits)
        parser = MultiPartParser(request.headers, request.stream(), **limits)
        parser.spool_max_size = max_body_bytes
        return await parser.parse()
    except (HTTPException, MultiPartException) as e:
        detail = str(getattr(e, "detail", None) or getattr(e, "message", e))
        if "Too many files" in detail:
            raise PayloadTooLarge(f"over the limit of {max_images} images in one request") from e
        raise InvalidBody(f"malformed form body: {detail}") from e


async def read_request(request: Request, *, max_images: int,
                       max_body_bytes: int) -> tuple[list[bytes | ImageURL], dict[str, Any]]:
    """(images in order: file bytes or URLs, raw options) from a multipart, url-encoded or JSON request plus its
    query."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    options: dict[str, Any] = dict(request.query_params)
    images: list[bytes | str] = []
    if content_type in ("multipart/form-data", "application/x-www-form-urlencoded"):
        form = await _read_form(request, content_type, max_images=max_images, max_body_bytes=max_body_bytes)
        for key, value in form.multi_items():
            if key in IMAGE_FIELDS:
                images.append(await value.read() if isinstance(value, UploadFile) else value)
            elif isinstance(value, UploadFile):
                raise InvalidOption(f"unexpected file field {key!r} (send images as 'image')")
            elif value != "":  # an empty form field means "not given"
                options[key] = value
    elif is_json(content_type):
        body = await read_json_object(request, 'e.g. {"image": "<base64>"}')
        for key in IMAGE_FIELDS:
            value = body.pop(key, None)
            if isinstance(value, str):
                images.append(value)
            elif isinstance(value, list) and all(isinstance(v, str) for v in value):
                images.extend(value)
            elif value is not None:
                raise InvalidOption(f"'{key}' must be a base64 string or a list of them")
        options.update({k: v for k, v in body.items() if v is not None})
    else:
        raise UnsupportedMediaType(f"content type {content_type or '(none)'!r} is not supported: send "
                                   "multipart/form-data with 'image' files or application/json with base64 'images'")
    check_image_count(len(images), max_images, "send a multipart 'image' file or a JSON 'image' / 'images' field")
    return [image_bytes(v, i) for i, v in enumerate(images)], options


def parse_options(model: type[OptionsT], raw: dict[str, Any]) -> OptionsT:
    """Validate raw options (strings from forms and queries are converted), 422 with every problem named."""
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        raise InvalidOption(describe_validation_errors(e.errors())) from e


def describe_validation_errors(errors: Any) -> str:
    """Pydantic / FastAPI error list -> one readable line."""
    parts = []
    for err in errors:
        loc = ".".join(str(x) for x in err.get("loc", ()) if x not in ("body", "query")) or "request"
        parts.append(f"{loc}: {err.get('msg', 'invalid')}")
    return "; ".join(parts)
