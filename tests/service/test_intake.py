"""One intake path: the native routes (JSON and multipart), /v1/embeddings and the Open Inference Protocol (JSON and
binary tensors) read images, count them, check options and admit requests the same way. Over a real socket: each
case is sent in every protocol that can carry it, and gets the same status and error type."""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from service_helpers import sample_png, server_process

from service.app import create_app
from service.middleware import _INFERENCE
from service.settings import Settings

MAX_IMAGES = 3
PNG = sample_png()
B64 = base64.b64encode(PNG).decode()
TEXT_PROTOCOLS = ("native-json", "native-form", "openai", "oip-json")  # images carried as text
PROTOCOLS = (*TEXT_PROTOCOLS, "native-file", "oip-binary")  # and as bytes


@pytest.fixture(scope="module")
def live(tiny_model_dir: Path) -> Iterator[str]:
    with server_process(tiny_model_dir, env={"MAE_MAX_IMAGES_PER_REQUEST": str(MAX_IMAGES)}) as (url, _):
        yield url


def _binary_body(images: list[str | bytes], parameters: dict[str, Any]) -> tuple[bytes, dict[str, str]]:
    elements = b"".join(struct.pack("<I", len(v)) + v for v in (i.encode() if isinstance(i, str) else i for i in images))
    head = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [len(images)],
                                   "parameters": {"binary_data_size": len(elements)}}],
                       "parameters": parameters}).encode()
    return head + elements, {"Inference-Header-Content-Length": str(len(head)), "Content-Type": "application/octet-stream"}


def embed(live: str, protocol: str, images: list[str | bytes], **options: Any) -> httpx.Response:
    """POST the images (and options) to the embedding route of `protocol`."""
    if protocol == "native-json":
        return httpx.post(f"{live}/embed", json={"images": images, **options}, timeout=30)
    if protocol == "native-form":  # images as text fields
        return httpx.post(f"{live}/embed", data={"image": images, **options}, timeout=30)
    if protocol == "native-file":  # images as file parts
        files = [("image", (f"{i}.png", v if isinstance(v, bytes) else v.encode(), "image/png"))
                 for i, v in enumerate(images)]
        return httpx.post(f"{live}/embed", files=files, data=options, timeout=30)
    if protocol == "openai":
        return httpx.post(f"{live}/v1/embeddings", json={"model": "mae-test", "input": images, **options}, timeout=30)
    url = f"{live}/v2/models/mae-test-embed/infer"
    if protocol == "oip-json":
        tensor = {"name": "image", "datatype": "BYTES", "shape": [len(images)], "data": images}
        return httpx.post(url, json={"inputs": [tensor], "parameters": options}, timeout=30)
    body, headers = _binary_body(images, options)
    return httpx.post(url, content=body, headers=headers, timeout=30)


def error_of(response: httpx.Response, protocol: str) -> tuple[int, str]:
    """(status, error text); the error type where the protocol's envelope has one."""
    body = response.json()["error"]
    return response.status_code, body if isinstance(body, str) else body["type"]


def vectors(response: httpx.Response, protocol: str) -> np.ndarray:
    assert response.status_code == 200, response.text
    body = response.json()
    if protocol.startswith("oip"):
        return np.array(body["outputs"][0]["data"], np.float32).reshape(body["outputs"][0]["shape"])
    return np.array([d["embedding"] for d in body["data"]], np.float32)


def test_every_inference_route_passes_the_admission_gate(tiny_model_dir: Path) -> None:
    """The gate (admission, deadlines, cancellation) is matched by path before routing: every route that computes
    must be matched, and no other POST route exists (the OpenAPI document lists them all)."""
    app = create_app(Settings(model_dir=tiny_model_dir))
    posts = [path for path, operations in app.openapi()["paths"].items() if "post" in operations]
    assert posts, "no POST routes found"
    examples = [p.replace("{name}", "m-embed").replace("{version}", "1") for p in posts]
    assert [p for p in examples if not _INFERENCE.match(p)] == []


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_the_same_image_is_the_same_embedding_in_every_protocol_and_form(live: str, protocol: str) -> None:
    """Bare base64 and a data URI (as text, or as the bytes of a file part / tensor element), and where bytes are
    carried the file itself: one embedding."""
    reference = vectors(embed(live, "native-file", [PNG]), "native-file")[0]
    forms: list[str | bytes] = [B64, f"data:image/png;base64,{B64}"]
    if protocol in ("native-file", "oip-binary"):
        forms.append(PNG)
    got = vectors(embed(live, protocol, forms), protocol)
    np.testing.assert_allclose(got, np.stack([reference] * len(forms)), atol=1e-5, rtol=0)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_bad_images_get_the_same_error_in_every_protocol(live: str, protocol: str) -> None:
    cases: list[tuple[str | bytes, int, str, str]] = [
        ("QUJDR", 400, "invalid_image", "not valid base64"),  # base64 letters, bad padding
        ("data:image/png,rawbytes", 400, "invalid_image", "data URIs must be base64"),
        (base64.b64encode(b"not an image").decode(), 400, "invalid_image", "image 0"),
    ]
    if protocol in TEXT_PROTOCOLS:  # text is text; the bytes of a file are a file, whatever they spell
        cases += [("a photo of a cat", 422, "invalid_option", "is text, not an image"),
                  ("https://example.com/cat.png", 422, "invalid_option", "URLs are not fetched")]
    for image, status, kind, words in cases:
        response = embed(live, protocol, [image])
        got_status, got = error_of(response, protocol)
        assert got_status == status, (image, response.text)
        assert words in response.text and (protocol.startswith("oip") or got == kind), (image, response.text)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_image_counts_are_checked_alike(live: str, protocol: str) -> None:
    assert embed(live, protocol, [B64] * MAX_IMAGES).status_code == 200
    too_many = embed(live, protocol, [B64] * (MAX_IMAGES + 1))
    assert too_many.status_code == 413 and f"over the limit of {MAX_IMAGES}" in too_many.text, too_many.text
    if protocol != "native-file":  # a multipart body without a file part is the form case
        none = embed(live, protocol, [])
        assert none.status_code == 422 and "no image" in none.text, none.text


@pytest.mark.parametrize("protocol", ["native-json", "native-form", "oip-json", "oip-binary"])
def test_options_are_checked_by_the_task_in_every_protocol(live: str, protocol: str) -> None:
    """The same options model answers for every protocol that takes options: the same value is the same 422."""
    for options, words in [({"pooling": "max"}, "pooling"), ({"colour": "red"}, "colour"),
                           ({"source": "classifier", "pooling": "cls"}, "applies to source=encoder only")]:
        response = embed(live, protocol, [B64], **options)
        assert response.status_code == 422 and words in response.text, (options, response.text)
    assert vectors(embed(live, protocol, [B64], pooling="cls+mean"), protocol).shape[1] == 2 * vectors(
        embed(live, protocol, [B64], pooling="cls"), protocol).shape[1]


def test_a_protocol_names_the_options_it_does_not_offer(live: str) -> None:
    response = embed(live, "oip-json", [B64], encoding_format="base64")
    assert response.status_code == 422 and "encoding_format: not an option here" in response.text, response.text
    assert "source, pooling, normalize" in response.text
    response = embed(live, "openai", [B64], pooling="cls")  # the OpenAI body has its own fields
    assert response.status_code == 422 and "pooling" in response.text, response.text
