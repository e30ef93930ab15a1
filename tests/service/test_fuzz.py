"""Seeded random malformed requests: every answer is a 2xx or a 4xx error envelope, never a 500, and the
server keeps serving. (A longer run of the same generator against a live server found no 5xx in 4,500.)"""

from __future__ import annotations

import base64
import io
import random
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image
from service_helpers import make_client, sample_png

ROUTES = ["/embed", "/reconstruct", "/classify", "/info", "/health/ready", "/nope", "/embed/"]
OPTION_KEYS = ["pooling", "normalize", "encoding_format", "mask_ratio", "seed", "response_format", "top_k", "junk"]
OPTION_VALUES = ["", "cls", "mean", "cls+mean", "true", "false", "2", "-1", "0.75", "1e309", "nan", "inf", "[]",
                 "{}", "null", "0", "99999999999999999999", "\x00", "é", "1.0", "0.0", "0.99"]
CONTENT_TYPES = ["image/png", "application/json", "multipart/form-data", "multipart/form-data; boundary=x",
                 "application/x-www-form-urlencoded", "text/plain", "application/json; charset=utf-16", ""]


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


class Junk:
    """Images and options that are sometimes valid and mostly not."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.png = sample_png()

    def image(self) -> bytes:
        rng, k = self.rng, self.rng.random()
        if k < 0.15:
            return self.png
        if k < 0.3:
            return self.png[: rng.randrange(len(self.png))]  # truncated
        if k < 0.4:
            return rng.randbytes(rng.randrange(200))
        if k < 0.5:
            flipped = bytearray(self.png)
            for _ in range(5):
                flipped[rng.randrange(len(flipped))] = rng.randrange(256)
            return bytes(flipped)
        if k < 0.7:
            mode = rng.choice(["1", "L", "P", "RGB", "RGBA", "CMYK", "I;16", "I", "F", "LA"])
            im = Image.new(mode, (rng.randrange(1, 300), rng.randrange(1, 300)))
            out = io.BytesIO()
            try:
                im.save(out, rng.choice(["PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "ICO", "PPM"]))
            except (OSError, ValueError, KeyError):  # a mode the format cannot hold
                return self.png
            return out.getvalue()
        if k < 0.8:
            return b"GIF89a" + rng.randbytes(30)
        if k < 0.9:  # a PNG header with absurd or empty dimensions
            ihdr = struct.pack(">IIBBBBB", rng.choice([0, 1, 100_000, 2**31 - 1]), rng.choice([0, 1, 100_000]), 8,
                               rng.choice([0, 2, 3, 4, 6, 7]), 0, 0, 0)
            return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IEND", b"")
        return b""

    def options(self) -> dict[str, str]:
        return {self.rng.choice(OPTION_KEYS): self.rng.choice(OPTION_VALUES) for _ in range(self.rng.randrange(4))}

    def json_body(self) -> object:
        rng = self.rng
        if rng.random() < 0.3:
            return rng.choice([[], "x", 5, None, {"images": {"a": 1}}])
        image = rng.choice([base64.b64encode(self.image()).decode(),
                            "data:image/png;base64," + base64.b64encode(self.image()).decode(), "!!!", 5, None, [],
                            ["a"], [base64.b64encode(self.png).decode()] * rng.randrange(6)])
        return {"image": image, **self.options()}

    def request(self, client):
        rng, route, kind = self.rng, self.rng.choice(ROUTES), self.rng.random()
        if kind < 0.45:
            files = [(rng.choice(["image", "images", "file"]), ("x", self.image(), rng.choice(["image/png", ""])))
                     for _ in range(rng.randrange(6))]
            return client.post(route, files=files or None, data=self.options() or None, params=self.options())
        if kind < 0.75:
            return client.post(route, json=self.json_body(), params=self.options())
        if kind < 0.9:
            return client.post(route, content=self.image(), params=self.options(),
                               headers={"Content-Type": rng.choice(CONTENT_TYPES)})
        return client.request(rng.choice(["GET", "PUT", "DELETE", "PATCH", "OPTIONS"]), route, params=self.options())


@pytest.mark.parametrize("seed", [0, 1])
def test_random_malformed_requests_get_client_errors_and_the_server_keeps_serving(tiny_model_dir: Path,
                                                                                  seed: int) -> None:
    junk = Junk(seed)
    statuses: dict[int, int] = {}
    with make_client(tiny_model_dir, max_images_per_request=4, max_body_bytes=2_000_000) as client:
        for _ in range(300):
            r = junk.request(client)
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            assert r.status_code < 500, (r.request.method, r.request.url, r.status_code, r.text[:300])
            if r.status_code >= 400:
                body = r.json()
                assert set(body) == {"error"} and body["error"]["type"] and body["error"]["message"], body
        assert client.post("/embed", files=[("image", ("x.png", junk.png, "image/png"))]).status_code == 200
    assert len([s for s in statuses if s >= 400]) >= 5, statuses  # the junk reached many different checks


def oip_request(rng: random.Random, png: bytes) -> tuple[bytes, dict[str, str]]:
    """A valid Open Inference Protocol request (JSON or binary), then mutated at random."""
    import json

    binary = rng.random() < 0.5
    name, datatype, shape = rng.choice([("image", "BYTES", [1]), ("pixels", "FP32", [1, 1, 28, 28])])
    if name == "image":
        raw = struct.pack("<I", len(png)) + png
        data: list = [base64.b64encode(png).decode()]
    else:
        raw = struct.pack(f"<{28 * 28}f", *([0.1] * 28 * 28))
        data = [0.1] * 28 * 28
    tensor: dict = {"name": name, "datatype": datatype, "shape": shape}
    tensor.update({"parameters": {"binary_data_size": len(raw)}} if binary else {"data": data})
    header: dict = {"inputs": [tensor], "parameters": {}, "outputs": [{"name": "embedding"}]}
    for _ in range(rng.randint(1, 3)):  # mutations
        field, value = rng.choice([
            (("inputs", 0, "datatype"), rng.choice(["FP32", "BYTES", "INT64", "FP16", "x", 3])),
            (("inputs", 0, "shape"), rng.choice([[], [0], [-1], [2], [1, 1], [10**9], [1, 1, 28], "1"])),
            (("inputs", 0, "name"), rng.choice(["image", "pixels", "other", ""])),
            (("inputs", 0, "data"), rng.choice([None, [], ["!!"], [[1, 2], [3]], [None], "x", [True] * 784])),
            (("parameters", "mask_ratio"), rng.choice([0.5, 2, "x", True])),
            (("parameters", "binary_data_output"), rng.choice([True, False, "yes", 7])),
            (("outputs",), rng.choice([None, [], [{"name": "nope"}], [{"name": "embedding", "parameters": {
                "binary_data": True}}], "x"])),
            (("inputs",), rng.choice([[], None, [tensor, tensor], "x"])),
        ])
        target = header
        try:
            for key in field[:-1]:
                target = target[key]
            target[field[-1]] = value
        except (KeyError, IndexError, TypeError):  # an earlier mutation removed the place
            pass
    text = json.dumps(header).encode()
    if rng.random() < 0.2:
        text = text[: rng.randint(0, len(text))]
    tail = raw if binary else b""
    if binary and rng.random() < 0.4:
        tail = tail[: rng.randint(0, len(tail))] if rng.random() < 0.5 else tail + bytes(rng.randint(1, 9))
    headers = {"Content-Type": "application/json"}
    if binary or rng.random() < 0.1:
        length = rng.choice([len(text), len(text), len(text) + 5, 0, -1, "x"])
        headers["Inference-Header-Content-Length"] = str(length)
    return text + tail, headers


def test_random_malformed_inference_requests_get_oip_errors(tiny_model_dir: Path) -> None:
    rng = random.Random(12)
    png = sample_png()
    statuses: dict[int, int] = {}
    with make_client(tiny_model_dir) as client:
        for _ in range(300):
            body, headers = oip_request(rng, png)
            r = client.post("/v2/models/mae-test-embed/infer", content=body, headers=headers)
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            assert r.status_code < 500, (body[:300], headers, r.status_code, r.text[:300])
            if r.status_code >= 400:
                assert isinstance(r.json()["error"], str), r.text
    assert statuses.get(200, 0) >= 5 and sum(n for s, n in statuses.items() if s >= 400) >= 100, statuses
