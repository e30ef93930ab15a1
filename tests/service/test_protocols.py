"""The protocols other clients speak, over a real socket with their own clients: the OpenAI SDK on
/v1/embeddings and tritonclient.http on the Open Inference Protocol v2; results equal the native routes'."""

from __future__ import annotations

import base64
import io
import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
import tritonclient.http as triton
from PIL import Image
from service_helpers import sample_png, server_process
from tritonclient.utils import InferenceServerException

KEY = "protocol-test-key"
NAMES = ("sneaker", "bag", "dress")


def auth() -> dict[str, str]:
    """A fresh header dict per call: tritonclient writes its own headers into the dict it is given."""
    return {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def live(tiny_model_dir: Path) -> Iterator[str]:
    with server_process(tiny_model_dir, env={"MAE_API_KEYS": KEY}) as (url, _):
        yield url


@pytest.fixture(scope="module")
def model(live: str) -> str:
    return httpx.get(f"{live}/info", headers=auth()).json()["model"]["name"]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def native(live: str, route: str, **options: Any) -> dict[str, Any]:
    r = httpx.post(f"{live}{route}", json={"images": [_b64(sample_png(n)) for n in NAMES], **options},
                   headers=auth(), timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def native_vectors(live: str) -> np.ndarray:
    return np.array([d["embedding"] for d in native(live, "/embed")["data"]], dtype=np.float32)


# -- OpenAI-style ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("encoding_format", [None, "float"])
def test_openai_sdk_embeddings_equal_embed(live: str, model: str, encoding_format: str | None) -> None:
    """The SDK's default asks for base64 and decodes it itself; float comes as JSON numbers."""
    client = openai.OpenAI(base_url=f"{live}/v1", api_key=KEY, max_retries=0)
    inputs = [f"data:image/png;base64,{_b64(sample_png(n))}" for n in NAMES]
    inputs[1] = _b64(sample_png(NAMES[1]))  # bare base64 as well
    extra = {} if encoding_format is None else {"encoding_format": encoding_format}
    response = client.embeddings.create(model=model, input=inputs, extra_body={"modality": "image"}, **extra)
    assert response.object == "list" and response.model == model
    assert [d.index for d in response.data] == [0, 1, 2]
    got = np.array([d.embedding for d in response.data], dtype=np.float32)
    np.testing.assert_allclose(got, native_vectors(live), atol=1e-5, rtol=0)
    assert response.usage.prompt_tokens == response.usage.total_tokens > 0


def test_openai_errors_and_models(live: str, model: str) -> None:
    client = openai.OpenAI(base_url=f"{live}/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in client.models.list()] == [model]
    image = _b64(sample_png())
    with pytest.raises(openai.NotFoundError) as e:
        client.embeddings.create(model="text-embedding-3-small", input=image)
    assert e.value.body["type"] == "not_found"  # the SDK unwraps the envelope's "error"
    for bad in ("a photo of a cat", [[1, 2, 3]], "https://example.com/cat.png"):
        with pytest.raises(openai.UnprocessableEntityError):
            client.embeddings.create(model=model, input=bad)
    with pytest.raises(openai.UnprocessableEntityError, match="not trained to be truncated"):
        client.embeddings.create(model=model, input=image, dimensions=8)
    assert len(client.embeddings.create(model=model, input=image, dimensions=len(native_vectors(live)[0]))
               .data[0].embedding) == len(native_vectors(live)[0])
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model=model, input="data:image/png;base64,AAAA")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{live}/v1", api_key="wrong", max_retries=0).embeddings.create(model=model,
                                                                                                input=image)


def test_openai_source_classifier_equals_embed(live: str, model: str) -> None:
    """`source` as an extra body field: the classifier's features, as /embed?source=classifier gives them."""
    client = openai.OpenAI(base_url=f"{live}/v1", api_key=KEY, max_retries=0)
    inputs = [f"data:image/png;base64,{_b64(sample_png(n))}" for n in NAMES]
    expected = np.array([d["embedding"] for d in native(live, "/embed", source="classifier")["data"]], np.float32)
    response = client.embeddings.create(model=model, input=inputs, extra_body={"source": "classifier"},
                                        dimensions=expected.shape[1])
    np.testing.assert_allclose([d.embedding for d in response.data], expected, atol=1e-5, rtol=0)
    with pytest.raises(openai.UnprocessableEntityError, match="not trained to be truncated"):
        client.embeddings.create(model=model, input=inputs[0], extra_body={"source": "classifier"}, dimensions=8)
    with pytest.raises(openai.UnprocessableEntityError):
        client.embeddings.create(model=model, input=inputs[0], extra_body={"source": "decoder"})


# -- Open Inference Protocol v2 ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def v2(live: str) -> Iterator[triton.InferenceServerClient]:
    client = triton.InferenceServerClient(live.removeprefix("http://"))
    yield client
    client.close()


def image_input(binary: bool) -> triton.InferInput:
    """The sample PNGs as a BYTES tensor: raw files in binary, base64 in JSON (JSON cannot carry raw bytes)."""
    files = [sample_png(n) for n in NAMES]
    values = np.array(files if binary else [_b64(f).encode() for f in files], dtype=object)
    tensor = triton.InferInput("image", [len(files)], "BYTES")
    tensor.set_data_from_numpy(values, binary_data=binary)
    return tensor


def outputs_for(names: list[str], binary: bool) -> list[triton.InferRequestedOutput] | None:
    return None if binary else [triton.InferRequestedOutput(n, binary_data=False) for n in names]


def test_oip_server_and_model_metadata(live: str, model: str, v2: triton.InferenceServerClient) -> None:
    assert v2.is_server_live(headers=auth()) and v2.is_server_ready(headers=auth())
    meta = v2.get_server_metadata(headers=auth())
    assert meta["name"] == "mae-service" and "binary_tensor_data" in meta["extensions"]
    info = httpx.get(f"{live}/info", headers=auth()).json()
    names = info["protocols"]["open_inference_v2"]["models"]
    assert names == [f"{model}-embed", f"{model}-reconstruct", f"{model}-classify"]
    for name in names:
        assert v2.is_model_ready(name, headers=auth())
        assert v2.is_model_ready(name, info["model"]["version"], headers=auth())
        m = v2.get_model_metadata(name, headers=auth())
        assert m["name"] == name and m["versions"] == [info["model"]["version"]]
        assert {(i["name"], i["datatype"]) for i in m["inputs"]} == {("image", "BYTES"), ("pixels", "FP32")}
    assert not v2.is_model_ready(f"{model}-nothing", headers=auth())
    with pytest.raises(InferenceServerException, match="not served"):
        v2.get_model_metadata(f"{model}-nothing", headers=auth())
    r = httpx.get(f"{live}/v2/models/{model}-embed")  # everything but health needs the key
    assert r.status_code == 401 and isinstance(r.json()["error"], str)
    assert httpx.get(f"{live}/v2/health/ready").json() == {"ready": True}


@pytest.mark.parametrize("parameters", [{"pooling": "cls"}, {"pooling": "cls+mean"}, {"source": "classifier"}],
                         ids=["cls", "cls+mean", "classifier"])
def test_oip_outputs_fit_the_declared_shapes(model: str, v2: triton.InferenceServerClient,
                                             parameters: dict[str, str]) -> None:
    """What infer returns fits the metadata's shape (-1 = any size) whatever the parameters change."""
    declared = {o["name"]: o for o in v2.get_model_metadata(f"{model}-embed", headers=auth())["outputs"]}
    result = v2.infer(f"{model}-embed", [image_input(True)], parameters=parameters, headers=auth())
    for name, spec in declared.items():
        got = result.as_numpy(name)
        assert got.dtype == np.float32 and spec["datatype"] == "FP32"
        assert len(got.shape) == len(spec["shape"])
        assert all(want in (-1, size) for want, size in zip(spec["shape"], got.shape, strict=True)), (spec, got.shape)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_oip_embed_equals_embed(live: str, model: str, v2: triton.InferenceServerClient, binary: bool) -> None:
    result = v2.infer(f"{model}-embed", [image_input(binary)], outputs=outputs_for(["embedding"], binary),
                      headers=auth())
    np.testing.assert_allclose(result.as_numpy("embedding"), native_vectors(live), atol=1e-5, rtol=0)
    assert result.get_response()["model_name"] == f"{model}-embed"


def test_oip_embed_source_classifier_equals_embed(live: str, model: str, v2: triton.InferenceServerClient) -> None:
    """`parameters.source`: the classifier's features, as /embed?source=classifier; with a pooling, a 422."""
    result = v2.infer(f"{model}-embed", [image_input(True)], parameters={"source": "classifier"}, headers=auth())
    expected = [d["embedding"] for d in native(live, "/embed", source="classifier")["data"]]
    np.testing.assert_allclose(result.as_numpy("embedding"), expected, atol=1e-5, rtol=0)
    r = httpx.post(f"{live}/v2/models/{model}-embed/infer", headers=auth(), json={
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [_b64(sample_png())]}],
        "parameters": {"source": "classifier", "pooling": "cls"}})
    assert r.status_code == 422 and "applies to source=encoder only" in r.json()["error"]


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_oip_classify_equals_classify(live: str, model: str, v2: triton.InferenceServerClient, binary: bool) -> None:
    result = v2.infer(f"{model}-classify", [image_input(binary)],
                      outputs=outputs_for(["probabilities", "class_id", "label"], binary), headers=auth())
    probabilities = result.as_numpy("probabilities")
    expected = native(live, "/classify", top_k=probabilities.shape[1])["data"]
    for row, item, class_id, label in zip(probabilities, expected, result.as_numpy("class_id"),
                                          result.as_numpy("label"), strict=True):
        for p in item["predictions"]:
            assert abs(row[p["class_id"]] - p["score"]) < 1e-5
        assert class_id == item["predictions"][0]["class_id"]
        assert (label.decode() if isinstance(label, bytes) else label) == item["predictions"][0]["label"]


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_oip_reconstruct_same_seed_same_pixels(live: str, model: str, v2: triton.InferenceServerClient,
                                               binary: bool) -> None:
    result = v2.infer(f"{model}-reconstruct", [image_input(binary)], parameters={"seed": 11, "mask_ratio": 0.5},
                      outputs=outputs_for(["reconstruction", "pasted", "mask", "mse_masked"], binary), headers=auth())
    assert result.get_response()["parameters"] == {"seed": 11, "mask_ratio": 0.5}
    expected = native(live, "/reconstruct", seed=11, mask_ratio=0.5, response_format="json")["data"]
    for i, item in enumerate(expected):
        for name in ("reconstruction", "pasted"):
            shown = np.asarray(Image.open(io.BytesIO(base64.b64decode(item["images"][name]))), dtype=np.float64)
            got = result.as_numpy(name)[i].transpose(1, 2, 0).reshape(shown.shape)
            np.testing.assert_array_equal(np.clip(np.rint(got * 255.0), 0, 255), shown)
        assert result.as_numpy("mask")[i].tolist() == item["mask"]
        assert abs(float(result.as_numpy("mse_masked")[i]) - item["mse_masked"]) < 1e-5


def test_oip_pixels_input_equals_image_input(live: str, model: str, tiny_model_dir: Path,
                                             v2: triton.InferenceServerClient) -> None:
    """FP32 pixels already normalized (as the server would from the PNGs) give the same embeddings."""
    from model_dir.schema import load_model_dir
    from service.imaging import load_model_image

    prep = load_model_dir(tiny_model_dir).spec.preprocessing
    pixels = np.stack([load_model_image(sample_png(n), prep, 10**6).pixels for n in NAMES])
    for binary in (True, False):
        tensor = triton.InferInput("pixels", list(pixels.shape), "FP32")
        tensor.set_data_from_numpy(pixels, binary_data=binary)
        result = v2.infer(f"{model}-embed", [tensor], headers=auth())
        np.testing.assert_allclose(result.as_numpy("embedding"), native_vectors(live), atol=1e-5, rtol=0)


def _binary_body(header: dict[str, Any], tail: bytes) -> tuple[bytes, dict[str, str]]:
    head = json.dumps(header).encode()
    return head + tail, {**auth(), "Inference-Header-Content-Length": str(len(head))}


def test_oip_malformed_bodies_are_4xx_errors(live: str, model: str) -> None:
    url = f"{live}/v2/models/{model}-embed/infer"
    png = sample_png()
    element = struct.pack("<I", len(png)) + png
    image = {"name": "image", "shape": [1], "datatype": "BYTES"}
    cases: list[tuple[bytes, dict[str, str]]] = [
        (b"not json", auth()),
        (b"[]", auth()),
        (json.dumps({"inputs": []}).encode(), auth()),  # missing input
        (json.dumps({"inputs": [{**image, "data": [_b64(png)]}, {**image, "data": [_b64(png)]}]}).encode(), auth()),
        (json.dumps({"inputs": [{**image, "datatype": "FP32", "data": [1.0]}]}).encode(), auth()),  # wrong datatype
        (json.dumps({"inputs": [{**image, "shape": [2], "data": [_b64(png)]}]}).encode(), auth()),  # wrong shape
        (json.dumps({"inputs": [{"name": "pixels", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]}).encode(),
         auth()),
        (json.dumps({"inputs": [{"name": "pixels", "shape": [1, 1, 28, 28], "datatype": "FP32",
                                 "data": ["x"] * 784}]}).encode(), auth()),
        (json.dumps({"inputs": [{"name": "other", "shape": [1], "datatype": "BYTES", "data": ["x"]}]}).encode(), auth()),
        (json.dumps({"inputs": [{**image}]}).encode(), auth()),  # no data
        (json.dumps({"inputs": [{**image, "data": [_b64(png)]}], "outputs": [{"name": "nope"}]}).encode(), auth()),
        (json.dumps({"inputs": [{**image, "data": [_b64(png)]}], "parameters": {"pooling": "max"}}).encode(), auth()),
        (json.dumps({"inputs": [{**image, "data": ["bm90IGFuIGltYWdl"]}]}).encode(), auth()),  # not an image
        (b'{"inputs": []}', {**auth(), "Inference-Header-Content-Length": "999"}),  # bad header length
        (b'{"inputs": []}', {**auth(), "Inference-Header-Content-Length": "x"}),
        (b'{"inputs": []}', {**auth(), "Inference-Header-Content-Length": "0"}),
        _binary_body({"inputs": [{**image, "parameters": {"binary_data_size": len(element) + 5}}]}, element),
        _binary_body({"inputs": [{**image, "parameters": {"binary_data_size": len(element)}}]}, element + b"xx"),
        _binary_body({"inputs": [{**image, "parameters": {"binary_data_size": 3}}]}, b"abc"),
        _binary_body({"inputs": [{"name": "pixels", "shape": [1, 1, 28, 28], "datatype": "FP32",
                                  "parameters": {"binary_data_size": 100}}]}, bytes(100)),
    ]
    for body, headers in cases:
        r = httpx.post(url, content=body, headers={"Content-Type": "application/json", **headers}, timeout=30)
        assert 400 <= r.status_code < 500, (body[:200], r.status_code, r.text)
        assert isinstance(r.json()["error"], str), r.text
    too_many = {"inputs": [{**image, "shape": [1000], "data": [_b64(png)] * 1000}]}
    r = httpx.post(url, json=too_many, headers=auth(), timeout=30)
    assert r.status_code == 413 and isinstance(r.json()["error"], str)
    r = httpx.post(f"{live}/v2/models/{model}-embed/versions/nope/infer", json={"inputs": []}, headers=auth())
    assert r.status_code == 404 and isinstance(r.json()["error"], str)
    assert httpx.get(f"{live}/health/ready").status_code == 200  # still serving


def test_protocol_routes_have_their_own_metric_labels_and_share_the_queue(live: str, model: str) -> None:
    text = httpx.get(f"{live}/metrics").text
    assert 'route="/v1/embeddings"' in text and 'route="/v2/models/{name}/infer"' in text
    assert 'queue="encoder"' in text and 'queue="/v1' not in text


def test_oip_binary_extension_on_the_wire(live: str, model: str) -> None:
    """A raw file in a binary BYTES input; the embedding asked for in binary comes after the JSON header."""
    png = sample_png()
    body, headers = _binary_body({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                              "parameters": {"binary_data_size": 4 + len(png)}}],
                                  "outputs": [{"name": "embedding", "parameters": {"binary_data": True}}]},
                                 struct.pack("<I", len(png)) + png)
    r = httpx.post(f"{live}/v2/models/{model}-embed/infer", content=body, headers=headers, timeout=30)
    assert r.status_code == 200, r.text
    length = int(r.headers["inference-header-content-length"])
    header = json.loads(r.content[:length])
    (output,) = header["outputs"]
    expected = native_vectors(live)[0]
    assert output["shape"] == [1, len(expected)] and output["parameters"]["binary_data_size"] == expected.nbytes
    assert r.headers["content-type"] == "application/octet-stream" and "data" not in output
    np.testing.assert_allclose(np.frombuffer(r.content[length:], dtype="<f4"), expected, atol=1e-5, rtol=0)


def test_body_limits_answer_in_each_protocols_shape(tiny_model_dir: Path) -> None:
    from service_helpers import make_client

    big = json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["A" * 5000]}]})
    with make_client(tiny_model_dir, max_body_bytes=4096) as client:
        r = client.post("/v2/models/mae-test-embed/infer", content=big, headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and isinstance(r.json()["error"], str), r.text
        r = client.post("/v1/embeddings", json={"model": "mae-test", "input": "A" * 5000})
        assert r.status_code == 413 and r.json()["error"]["type"] == "payload_too_large", r.text
        r = client.get("/v2/nothing/here")
        assert r.status_code == 404 and isinstance(r.json()["error"], str)


def test_oip_readiness_follows_the_server(tiny_model_dir: Path) -> None:
    """Unready (as while warming up): server and model readiness answer 503 with ready false; liveness stays 200."""
    from service_helpers import make_client

    with make_client(tiny_model_dir) as client:
        server = client.app.state.server
        server.warmed_up = False
        try:
            r = client.get("/v2/health/ready")
            assert r.status_code == 503 and r.json() == {"ready": False}
            r = client.get("/v2/models/mae-test-embed/ready")
            assert r.status_code == 503 and r.json() == {"name": "mae-test-embed", "ready": False}
            assert client.get("/v2/health/live").json() == {"live": True}
        finally:
            server.warmed_up = True
        assert client.get("/v2/models/mae-test-embed/ready").json() == {"name": "mae-test-embed", "ready": True}
