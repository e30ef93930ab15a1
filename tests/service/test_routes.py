"""Each route's success path and every error status with its type, in process (the app factory, a TestClient)."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from service_helpers import encode, gradient, make_client, metric, sample_png

from model_dir.schema import ModelDirError
from service.engine_onnxruntime import RuntimeConfigError
from service.settings import Settings


def files(*images: bytes) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("image", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def error_of(response) -> tuple[int, str]:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"type", "message"} and body["error"]["message"]
    return response.status_code, body["error"]["type"]


# -- /embed ---------------------------------------------------------------------------------------------


def test_embed_multipart_json_and_query_agree(client: TestClient) -> None:
    png = sample_png("sneaker")
    a = client.post("/embed", files=files(png), data={"pooling": "mean", "normalize": "false"})
    b = client.post("/embed", json={"image": b64(png), "pooling": "mean", "normalize": False})
    c = client.post("/embed?pooling=mean&normalize=false", json={"images": [f"data:image/png;base64,{b64(png)}"]})
    for r in (a, b, c):
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "application/json"
    bodies = [r.json() for r in (a, b, c)]
    assert bodies[0]["model"] == "mae-test" and bodies[0]["pooling"] == "mean" and bodies[0]["usage"] == {"images": 1}
    assert bodies[0]["dim"] == len(bodies[0]["data"][0]["embedding"]) == 32
    assert bodies[0]["data"][0]["embedding"] == bodies[1]["data"][0]["embedding"] == bodies[2]["data"][0]["embedding"]
    assert abs(np.linalg.norm(bodies[0]["data"][0]["embedding"]) - 1) > 1e-3  # not normalized when asked


def test_embed_pooling_normalize_and_base64(client: TestClient) -> None:
    png = sample_png("bag")
    default = client.post("/embed", files=files(png)).json()
    assert default["pooling"] == "mean"  # the tiny model's embedding.default_pooling
    assert default["normalized"] is True
    vector = np.asarray(default["data"][0]["embedding"], dtype=np.float32)
    assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-5)
    encoded = client.post("/embed", files=files(png), data={"encoding_format": "base64"}).json()
    decoded = np.frombuffer(base64.b64decode(encoded["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_array_equal(decoded, vector)
    both = client.post("/embed", files=files(png), data={"pooling": "cls+mean", "normalize": "false"}).json()
    cls = client.post("/embed", files=files(png), data={"pooling": "cls", "normalize": "false"}).json()
    mean = client.post("/embed", files=files(png), data={"pooling": "mean", "normalize": "false"}).json()
    assert both["dim"] == 64
    np.testing.assert_allclose(both["data"][0]["embedding"],
                               cls["data"][0]["embedding"] + mean["data"][0]["embedding"], rtol=1e-6)


def test_embed_matches_the_onnx_encoder(client: TestClient, tiny_model_dir: Path) -> None:
    """The server's embedding is the encoder's mean-pooled latent of the preprocessed image."""
    import onnxruntime as ort

    from model_dir.schema import load_model_dir
    from service.imaging import load_model_image

    png = sample_png("coat")
    md = load_model_dir(tiny_model_dir)
    pixels = load_model_image(png, md.spec.preprocessing, 10**6).pixels[None]
    session = ort.InferenceSession(str(md.path("encoder")), providers=["CPUExecutionProvider"])
    (latent,) = session.run(None, {"pixels": pixels, "ids_keep": np.arange(49, dtype=np.int64)[None]})
    served = client.post("/embed", files=files(png), data={"normalize": "false"}).json()["data"][0]["embedding"]
    np.testing.assert_allclose(served, latent[0, 1:].mean(axis=0), atol=1e-5)


def test_several_images_keep_their_order(client: TestClient) -> None:
    names = ["sneaker", "bag", "trouser"]
    many = client.post("/embed", files=files(*(sample_png(n) for n in names))).json()
    assert [d["index"] for d in many["data"]] == [0, 1, 2] and many["usage"] == {"images": 3}
    for name, item in zip(names, many["data"], strict=True):
        alone = client.post("/embed", files=files(sample_png(name))).json()["data"][0]["embedding"]
        np.testing.assert_allclose(item["embedding"], alone, atol=1e-5)


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP", "GIF", "BMP", "TIFF"])
def test_embed_accepts_every_format(client: TestClient, fmt: str) -> None:
    data = encode(gradient((50, 40)), fmt)
    r = client.post("/embed", files=[("image", ("x", data, "application/octet-stream"))])
    assert r.status_code == 200, r.text


def test_small_images_decode_inline_and_the_rest_in_the_pool(client: TestClient) -> None:
    """Where each image is decoded (Server.decode_image), and that every path gives the same embedding."""
    from service.server import INLINE_DECODE_MAX_BYTES, INLINE_DECODE_MAX_PIXELS

    server = client.app.state.server
    offloaded: list[str] = []
    real_offload = server.offload

    async def spy(fn, *args):
        offloaded.append(fn.__name__ if not args else getattr(args[0], "__name__", "?"))
        return await real_offload(fn, *args)

    server.offload = spy
    tiny = encode(gradient((28, 28)), "PNG")
    many_pixels = encode(Image.new("L", (1000, 1000), 40), "PNG")  # a few KB, a million pixels
    many_bytes = encode(Image.fromarray(np.random.default_rng(0).integers(0, 256, (150, 150), dtype=np.uint8)), "PNG")
    assert len(tiny) <= INLINE_DECODE_MAX_BYTES and 28 * 28 <= INLINE_DECODE_MAX_PIXELS
    assert len(many_pixels) <= INLINE_DECODE_MAX_BYTES < len(many_bytes)
    for data, expected in ((tiny, []), (many_pixels, ["to_model_image"]), (many_bytes, ["load_model_image"])):
        offloaded.clear()
        r = client.post("/embed", files=files(data))
        assert r.status_code == 200, r.text
        assert offloaded == expected
    assert error_of(client.post("/embed", files=files(b"GIF89a but not really"))) == (400, "invalid_image")
    # The same picture gives the same embedding however it was decoded.
    same = Image.new("RGB", (120, 120), (90, 90, 90))
    embeddings = []
    for kw, expected in (({}, []), ({"compress_level": 0}, ["load_model_image"])):  # a few hundred bytes, or 43 KB
        offloaded.clear()
        embeddings.append(client.post("/embed", files=files(encode(same, "PNG", **kw))).json()["data"][0]["embedding"])
        assert offloaded == expected
    np.testing.assert_allclose(embeddings[0], embeddings[1], atol=1e-6)


def test_embed_accepts_awkward_modes(client: TestClient) -> None:
    exif = Image.Exif()
    exif[0x0112] = 8
    for data in (
        encode(Image.fromarray(np.full((30, 30), 50000, dtype=np.uint16)), "PNG"),  # 16-bit
        encode(gradient().convert("CMYK"), "JPEG"),
        encode(gradient().convert("P"), "PNG"),
        encode(gradient().convert("RGBA"), "PNG"),
        encode(gradient(), "JPEG", exif=exif),
    ):
        assert client.post("/embed", files=files(data)).status_code == 200


def test_embed_source_classifier_is_the_classifier_graphs_features(client: TestClient, tiny_model_dir: Path) -> None:
    """source=classifier: the classifier graph's `features` output of the preprocessed image (the input of its last
    Linear), normalized when asked; multipart, JSON and query agree; the response names the source."""
    import onnxruntime as ort

    from model_dir.schema import load_model_dir
    from service.imaging import load_model_image

    pngs = [sample_png(n) for n in ("coat", "bag")]
    md = load_model_dir(tiny_model_dir)
    pixels = np.stack([load_model_image(p, md.spec.preprocessing, 10**6).pixels for p in pngs])
    session = ort.InferenceSession(str(md.path("classifier")), providers=["CPUExecutionProvider"])
    expected = session.run(["features"], {"pixels": pixels})[0]
    raw = client.post("/embed", files=files(*pngs), data={"source": "classifier", "normalize": "false"})
    assert raw.status_code == 200, raw.text
    body = raw.json()
    assert (body["source"], body["pooling"], body["dim"]) == ("classifier", None, 32)
    np.testing.assert_allclose([d["embedding"] for d in body["data"]], expected, atol=1e-5, rtol=0)
    unit = expected / np.linalg.norm(expected, axis=1, keepdims=True)
    for r in (client.post("/embed", json={"images": [b64(p) for p in pngs], "source": "classifier"}),
              client.post("/embed?source=classifier", files=files(*pngs))):
        assert r.status_code == 200 and r.json()["normalized"] is True
        np.testing.assert_allclose([d["embedding"] for d in r.json()["data"]], unit, atol=1e-5, rtol=0)
    encoder = client.post("/embed", files=files(pngs[0])).json()
    assert (encoder["source"], encoder["pooling"]) == ("encoder", "mean")  # the default, as before
    assert client.get("/info").json()["embedding_sources"] == {  # no kNN recorded for the tiny model
        "encoder": {"dim": 32, "default_pooling": "mean", "knn": None}, "classifier": {"dim": 32, "knn": None}}
    assert metric(client.get("/metrics").text, "mae_batch_size_count", queue="classifier.features") >= 1  # own queue


def test_embed_source_classifier_errors(client: TestClient, encoder_only_dir: Path, logits_only_dir: Path) -> None:
    """422 invalid_option: a pooling with source=classifier, an unknown source, a model without a classifier and
    one whose classifier graph has no features output (exported before it)."""
    png = sample_png()
    for data in ({"source": "classifier", "pooling": "mean"}, {"source": "decoder"}):
        assert error_of(client.post("/embed", files=files(png), data=data)) == (422, "invalid_option")
    assert "pooling 'mean' applies to source=encoder only" in client.post(
        "/embed", json={"image": b64(png), "source": "classifier", "pooling": "mean"}).json()["error"]["message"]
    for model_dir, why in ((encoder_only_dir, "has no classifier graph"), (logits_only_dir, "without a features")):
        with make_client(model_dir) as c:
            r = c.post("/embed", files=files(png), data={"source": "classifier"})
            assert error_of(r) == (422, "invalid_option") and why in r.json()["error"]["message"]
            assert list(c.get("/info").json()["embedding_sources"]) == ["encoder"]
            assert c.post("/embed", files=files(png)).status_code == 200
    with make_client(logits_only_dir) as c:  # its /classify still serves the logits
        assert c.post("/classify", files=files(png)).status_code == 200


# -- /reconstruct ---------------------------------------------------------------------------------------


def test_reconstruct_png_is_a_four_panel_image(client: TestClient) -> None:
    r = client.post("/reconstruct", files=files(sample_png("dress")), data={"seed": "7"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.headers["x-seed"] == "7"
    panel = Image.open(io.BytesIO(r.content))
    side = 140  # 28 px enlarged 5x
    assert panel.size == (4 * side + 3 * 4, side) and panel.mode == "L"
    two = client.post("/reconstruct", files=files(sample_png("dress"), sample_png("bag")), data={"seed": "7"})
    assert Image.open(io.BytesIO(two.content)).size == (4 * side + 3 * 4, 2 * side + 4)


def test_reconstruct_same_seed_same_bytes_other_seed_other_mask(client: TestClient) -> None:
    png = sample_png("pullover")
    first, again = (client.post("/reconstruct", files=files(png), data={"seed": "42", "mask_ratio": "0.6"})
                    for _ in range(2))
    assert first.content == again.content
    other = client.post("/reconstruct", files=files(png), data={"seed": "43", "mask_ratio": "0.6"})
    assert other.content != first.content
    masks = [client.post("/reconstruct", files=files(png), data={"seed": s, "response_format": "json"}).json()
             for s in ("42", "43")]
    assert masks[0]["data"][0]["mask"] != masks[1]["data"][0]["mask"]


def test_reconstruct_json(client: TestClient) -> None:
    fmnist = (Path(__file__).parents[1] / "fixtures" / "fmnist" / "test_00000.png").read_bytes()  # 28x28
    r = client.post("/reconstruct", json={"image": b64(fmnist), "mask_ratio": 0.5, "seed": 3,
                                          "response_format": "json"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["seed"] == 3 and body["mask_ratio"] == 0.5
    assert body["norm_pix_loss"] is True and body["denormalized_with_target_stats"] is True
    assert body["grid"] == {"rows": 7, "cols": 7, "patch_size": 4, "num_patches": 49, "num_visible": 24}
    item = body["data"][0]
    assert len(item["mask"]) == 49 and sum(item["mask"]) == 25
    assert item["mse_masked"] > 0 and 0 < item["mse_masked_pixels"] < 1
    for name in ("original", "masked", "reconstruction", "pasted"):
        picture = Image.open(io.BytesIO(base64.b64decode(item["images"][name])))
        assert picture.size == (28, 28)
    original = np.asarray(Image.open(io.BytesIO(base64.b64decode(item["images"]["original"]))))
    np.testing.assert_array_equal(original, np.asarray(Image.open(io.BytesIO(fmnist))))


def test_reconstruct_seed_is_random_when_absent_and_returned(client: TestClient) -> None:
    png = sample_png("sandal")
    seeds = {client.post("/reconstruct", files=files(png), data={"response_format": "json"}).json()["seed"]
             for _ in range(3)}
    assert len(seeds) == 3
    seed = seeds.pop()
    replay = client.post("/reconstruct", files=files(png), data={"response_format": "json", "seed": str(seed)})
    assert replay.json()["seed"] == seed


def test_reconstruct_pixel_target_model_has_no_leak(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """A model trained on plain pixels (norm_pix_loss false) reports no use of the target's statistics."""
    pytest.importorskip("torch")
    from dataclasses import replace

    from model import Checkpoint, load_checkpoint
    from training.export import export_model_dir

    ckpt = Checkpoint.load(tiny_checkpoint)
    path = tmp_path / "pixels.pth"
    replace(ckpt, config=replace(ckpt.config, norm_pix_loss=False)).save(path)
    assert load_checkpoint(path) is not None
    out = export_model_dir(path, tmp_path / "pixels", precisions=("fp32",), name="pixels", log=lambda _: None)
    with make_client(out) as c:
        body = c.post("/reconstruct", files=files(sample_png()), data={"response_format": "json", "seed": "1"}).json()
    assert body["norm_pix_loss"] is False and body["denormalized_with_target_stats"] is False


# -- /classify, /info, health, metrics -----------------------------------------------------------------


def test_classify(client: TestClient) -> None:
    r = client.post("/classify", files=files(sample_png("trouser"), sample_png("bag")), data={"top_k": "3"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "mae-test" and len(body["data"]) == 2
    predictions = body["data"][0]["predictions"]
    assert len(predictions) == 3
    scores = [p["score"] for p in predictions]
    assert scores == sorted(scores, reverse=True) and all(0 < s < 1 for s in scores)
    labels = client.get("/info").json()["model"]["labels"]
    assert all(labels[p["class_id"]] == p["label"] for p in predictions)
    everything = client.post("/classify", files=files(sample_png("trouser")), data={"top_k": "10"}).json()
    assert len(everything["data"][0]["predictions"]) == 10
    assert sum(p["score"] for p in everything["data"][0]["predictions"]) == pytest.approx(1.0)


def test_info_health_and_metrics(client: TestClient) -> None:
    info = client.get("/info").json()
    assert info["ready"] is True and info["model"]["name"] == "mae-test"
    assert info["runtime"]["device"] == "cpu"
    assert info["runtime"]["graphs"]["encoder"]["providers"] == ["CPUExecutionProvider"]
    assert set(info["runtime"]["graphs"]) == {"encoder", "decoder", "classifier"}
    assert info["routes"] == {"embed": True, "reconstruct": True, "classify": True, "search": False}
    assert info["batching"]["max_batch_size"] == 32
    assert client.get("/health/live").json() == {"status": "live"}
    assert client.get("/health/ready").status_code == 200
    r = client.post("/embed", files=files(sample_png()), headers={"X-Request-ID": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    for h in ("x-queue-time-ms", "x-inference-time-ms", "x-total-time-ms"):
        assert float(r.headers[h]) >= 0
    assert len(client.get("/health/live").headers["x-request-id"]) == 32  # generated when absent
    text = client.get("/metrics").text
    assert metric(text, "mae_requests_total", route="/embed", status="200") >= 1
    for graph in ("encoder", "decoder", "classifier"):  # warm-up ran each graph before ready
        assert metric(text, "mae_ort_runs_total", graph=graph) >= 1
    assert metric(text, "mae_images_total", route="/embed") >= 1
    assert "mae_batch_size_bucket" in text and "mae_queue_depth" in text and "mae_inference_duration_seconds" in text


def test_precision_variant_and_fallback(tiny_model_dir: Path, encoder_only_dir: Path) -> None:
    with make_client(tiny_model_dir, precision="int8") as c:
        graphs = c.get("/info").json()["runtime"]["graphs"]
        assert {g["precision"] for g in graphs.values()} == {"int8"}
        assert graphs["encoder"]["file"] == "encoder.int8.onnx"
        assert c.post("/embed", files=files(sample_png())).status_code == 200
    from service.app import create_app

    assert list(json.loads((encoder_only_dir / "model.json").read_text())["files"]["encoder"]) == ["fp32"]
    with pytest.raises(RuntimeConfigError, match="no int8 variant of the encoder"):
        create_app(Settings(model_dir=encoder_only_dir, precision="int8"))


# -- errors ---------------------------------------------------------------------------------------------


def test_client_errors_have_their_status_and_type(client: TestClient) -> None:
    png = sample_png()
    cases = [
        (client.post("/embed", files=files(b"not an image at all")), 400, "invalid_image"),
        (client.post("/embed", json={"image": "!!! not base64 !!!"}), 422, "invalid_option"),  # text, not an image
        (client.post("/embed", json={"image": "QUJDR"}), 400, "invalid_image"),  # base64 letters, bad padding
        (client.post("/embed", files=files(png[:200])), 400, "invalid_image"),  # truncated
        (client.post("/embed", content=b"{nope", headers={"content-type": "application/json"}), 400, "invalid_body"),
        (client.post("/embed", content=b"[1, 2]", headers={"content-type": "application/json"}), 400, "invalid_body"),
        (client.post("/embed", content=png, headers={"content-type": "image/png"}), 415, "unsupported_media_type"),
        (client.post("/embed"), 415, "unsupported_media_type"),
        (client.post("/embed", files=files(encode(Image.new("RGB", (16, 16)), "ICO"))), 415, "unsupported_media_type"),
        (client.post("/embed", files=files(png), data={"pooling": "max"}), 422, "invalid_option"),
        (client.post("/embed", files=files(png), data={"encoding_format": "hex"}), 422, "invalid_option"),
        (client.post("/embed", files=files(png), data={"colour": "red"}), 422, "invalid_option"),
        (client.post("/embed", data={"pooling": "cls"}), 422, "invalid_option"),
        (client.post("/embed", json={"images": [1, 2]}), 422, "invalid_option"),
        (client.post("/reconstruct", files=files(png), data={"mask_ratio": "1"}), 422, "invalid_option"),
        (client.post("/reconstruct", files=files(png), data={"mask_ratio": "-0.1"}), 422, "invalid_option"),
        (client.post("/reconstruct", files=files(png), data={"mask_ratio": "0.99"}), 422, "invalid_option"),
        (client.post("/reconstruct", files=files(png), data={"seed": "-1"}), 422, "invalid_option"),
        (client.post("/reconstruct", files=files(png), data={"seed": "abc"}), 422, "invalid_option"),
        (client.post("/reconstruct", files=files(png), data={"response_format": "gif"}), 422, "invalid_option"),
        (client.post("/classify", files=files(png), data={"top_k": "0"}), 422, "invalid_option"),
        (client.post("/classify", files=files(png), data={"top_k": "11"}), 422, "invalid_option"),
        (client.post("/classify", files=files(png), data={"top_k": str(10**9)}), 422, "invalid_option"),
        (client.get("/no/such/route"), 404, "not_found"),
        (client.get("/embed"), 405, "method_not_allowed"),
    ]
    for response, status, kind in cases:
        assert error_of(response) == (status, kind), response.text
    text = client.get("/metrics").text
    assert metric(text, "mae_rejections_total", reason="invalid_image") >= 3
    assert metric(text, "mae_requests_total", route="/embed", status="415") >= 2


def test_limits_answer_413(tiny_model_dir: Path) -> None:
    with make_client(tiny_model_dir, max_body_bytes=20_000, max_images_per_request=2, max_image_pixels=20_000) as c:
        png = sample_png()
        assert error_of(c.post("/embed", files=files(png, png, png))) == (413, "payload_too_large")
        assert error_of(c.post("/embed", json={"images": [b64(png)] * 3})) == (413, "payload_too_large")
        big_body = encode(Image.effect_noise((200, 200), 64).convert("L"), "PNG")
        assert len(big_body) > 20_000
        assert error_of(c.post("/embed", files=files(big_body))) == (413, "payload_too_large")

        def chunks():  # no Content-Length: the limit is enforced while reading
            yield b'{"image": "'
            for _ in range(30):
                yield b"A" * 1000
            yield b'"}'
        r = c.post("/embed", content=chunks(), headers={"content-type": "application/json"})
        assert error_of(r) == (413, "payload_too_large")
        large = encode(Image.new("L", (201, 100)), "PNG")  # 20,100 pixels, a few hundred bytes
        assert error_of(c.post("/embed", files=files(large))) == (413, "payload_too_large")
        assert c.post("/embed", files=files(png, png)).status_code == 200


def test_not_available_without_decoder_or_classifier(encoder_only_dir: Path) -> None:
    with make_client(encoder_only_dir) as c:
        assert c.post("/embed", files=files(sample_png())).status_code == 200
        assert error_of(c.post("/reconstruct", files=files(sample_png()))) == (404, "not_available")
        assert error_of(c.post("/classify", files=files(sample_png()))) == (404, "not_available")
        assert c.get("/info").json()["routes"] == {"embed": True, "reconstruct": False, "classify": False,
                                                    "search": False}


def test_api_keys(tiny_model_dir: Path) -> None:
    with make_client(tiny_model_dir, api_keys="k1,k2") as c:
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic k1"}):
            assert error_of(c.post("/embed", files=files(sample_png()), headers=headers)) == (401, "unauthorized")
        assert error_of(c.get("/info")) == (401, "unauthorized")
        for key in ("k1", "k2"):
            ok = c.post("/embed", files=files(sample_png()), headers={"Authorization": f"Bearer {key}"})
            assert ok.status_code == 200
        for open_route in ("/health/live", "/health/ready", "/metrics", "/"):
            assert c.get(open_route).status_code == 200


def test_cors_allow_list(tiny_model_dir: Path) -> None:
    with make_client(tiny_model_dir, cors_origins="https://app.example") as c:
        preflight = c.options("/embed", headers={"Origin": "https://app.example", "Access-Control-Request-Method":
                                                 "POST", "Access-Control-Request-Headers": "authorization"})
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "https://app.example"
        r = c.post("/embed", files=files(sample_png()), headers={"Origin": "https://app.example"})
        assert r.headers["access-control-allow-origin"] == "https://app.example"
        assert "x-request-id" in r.headers["access-control-expose-headers"].lower()
        preflight = c.options("/v2/models/mae-test-embed/infer", headers={
            "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "inference-header-content-length"})
        assert preflight.status_code == 200  # a browser may send the OIP binary extension
        assert "inference-header-content-length" in r.headers["access-control-expose-headers"].lower()
        other = c.post("/embed", files=files(sample_png()), headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers
    with make_client(tiny_model_dir) as c:  # off by default
        r = c.post("/embed", files=files(sample_png()), headers={"Origin": "https://app.example"})
        assert "access-control-allow-origin" not in r.headers


def test_bad_model_directories_refuse_to_start(tiny_model_dir: Path, tmp_path: Path) -> None:
    from service.app import create_app

    with pytest.raises(ModelDirError, match="no such model directory"):
        create_app(Settings(model_dir=tmp_path / "missing"))
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in tiny_model_dir.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "decoder.onnx").write_bytes((broken / "decoder.onnx").read_bytes()[:-10] + b"0" * 10)
    with pytest.raises(ModelDirError, match="decoder.onnx.*sha256"):
        create_app(Settings(model_dir=broken))
    with pytest.raises(RuntimeConfigError, match="CUDAExecutionProvider"):
        create_app(Settings(model_dir=tiny_model_dir, device="cuda"))


def test_a_batch_that_runs_alone_uses_the_all_core_sessions_with_the_same_results(tiny_model_dir: Path) -> None:
    from model_dir.schema import load_model_dir
    from service.engine_onnxruntime import OnnxRuntimeEngine

    runtime = OnnxRuntimeEngine(load_model_dir(tiny_model_dir), device="cpu", intra_op_threads=1, lone_threads=2)
    assert set(runtime.lone_sessions) == set(runtime.sessions) and runtime.describe()["lone_batch_threads"] == 2
    assert all(runtime.lone_sessions[g].session is not runtime.sessions[g].session for g in runtime.sessions)
    pixels = np.random.default_rng(0).standard_normal((3, 1, 28, 28)).astype(np.float32)
    ids = runtime.all_patches(3)
    np.testing.assert_allclose(runtime.encode(pixels, ids, alone=True), runtime.encode(pixels, ids), atol=1e-5)
    alone, shared = runtime.classify(pixels, alone=True), runtime.classify(pixels)
    np.testing.assert_allclose(alone.logits, shared.logits, atol=1e-5)
    np.testing.assert_allclose(alone.features, shared.features, atol=1e-5)
    assert OnnxRuntimeEngine(load_model_dir(tiny_model_dir), device="cpu", intra_op_threads=2, lone_threads=2).lone_sessions == {}


def test_liveness_fails_while_the_engine_is_wedged_and_recovers(tiny_model_dir: Path) -> None:
    """An encoder call that never returns (the engine stuck, as a hung driver or a deadlock would leave it): once
    the batch has run past MAE_LIVENESS_BATCH_TIMEOUT_S (and 20 times the queue's average), /health/live and
    /v2/health/live answer 503 and say which queue; when the call returns, they are 200 again and the request
    gets its answer."""
    import threading
    import time

    with make_client(tiny_model_dir, liveness_batch_timeout_s=0.5) as client:
        assert client.post("/embed", files=files(sample_png())).status_code == 200  # an average batch time
        server = client.app.state.server
        engine_encode, release = server.engine.encode, threading.Event()

        def stuck(*args, **kwargs):
            release.wait(30)
            return engine_encode(*args, **kwargs)

        server.engine.encode = stuck
        answers: list[int] = []
        request = threading.Thread(target=lambda: answers.append(
            client.post("/embed", files=files(sample_png())).status_code))
        request.start()
        try:
            assert client.get("/health/live").status_code == 200  # running, not yet overdue
            deadline = time.monotonic() + 10
            while (live := client.get("/health/live")).status_code == 200:
                assert time.monotonic() < deadline, "the stuck batch never made /health/live fail"
                time.sleep(0.05)
            assert live.status_code == 503
            error = live.json()["error"]
            assert error["type"] == "wedged" and "encoder queue has run for" in error["message"], error
            oip = client.get("/v2/health/live")
            assert oip.status_code == 503 and oip.json() == {"live": False}
            assert client.get("/health/ready").status_code == 200  # readiness is another question
        finally:
            release.set()
            request.join(30)
        assert answers == [200]
        assert client.get("/health/live").json() == {"status": "live"}
        assert client.get("/v2/health/live").json() == {"live": True}


def test_liveness_fails_when_a_queue_worker_dies(tiny_model_dir: Path) -> None:
    """A batcher worker that stopped (the "engine thread dead" case: its queue would never run a batch again)
    makes /health/live a 503 that names the queue."""
    with make_client(tiny_model_dir) as client:
        assert client.post("/embed", files=files(sample_png())).status_code == 200
        assert client.get("/health/live").status_code == 200
        queue = next(iter(client.app.state.server.batcher.queues.values()))
        client.portal.call(_cancel, queue._task)
        live = client.get("/health/live")
        assert live.status_code == 503 and "worker has stopped" in live.json()["error"]["message"], live.text
        assert client.get("/v2/health/live").status_code == 503


async def _cancel(task) -> None:
    import asyncio

    task.cancel()
    await asyncio.wait([task])  # done, cancelled, without raising here


def test_uploads_over_the_spool_size_need_no_temporary_files(client: TestClient, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A 3 MB multipart image (Starlette spools parts over 1 MB to a temporary file) is answered with no usable
    temporary directory at all, as in a container whose small /tmp is full: the parts stay in memory."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no-such-dir"))
    noise = np.random.default_rng(0).integers(0, 256, (1000, 1000, 3), dtype=np.uint8)
    big = encode(Image.fromarray(noise), "PNG")
    assert len(big) > 2 * 1024 * 1024
    r = client.post("/embed", files=files(big, sample_png()))
    assert r.status_code == 200, r.text
    assert len(r.json()["data"]) == 2


def test_auto_device_uses_cuda_only_when_the_session_gets_it(tiny_model_dir: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """With CUDA listed but unusable (the one mock allowed: this CPU build pretends to have it), auto stays on CPU."""
    import onnxruntime as ort

    real = ort.get_available_providers()
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", *real])
    from model_dir.schema import load_model_dir
    from service.engine_onnxruntime import OnnxRuntimeEngine

    runtime = OnnxRuntimeEngine(load_model_dir(tiny_model_dir), device="auto")
    assert runtime.device == "cpu"
    described = runtime.describe()
    assert described["graphs"]["encoder"]["providers"] == ["CPUExecutionProvider"]
    # /info says why: no driver here (the GPU image test sees the same reason with the CUDA wheels loaded)
    assert described["device_reason"].startswith("MAE_DEVICE=auto: CUDAExecutionProvider is in this build but the "
                                                 "sessions did not get it: the NVIDIA driver's libcuda.so.1 cannot "
                                                 "be loaded"), described["device_reason"]
    assert described["cuda_libraries"] == [] and "no CUDA user-space library" in described["device_reason"]
    with pytest.raises(RuntimeConfigError, match=r"only got .*libcuda\.so\.1 cannot be loaded.*MAE_DEVICE=auto"):
        OnnxRuntimeEngine(load_model_dir(tiny_model_dir), device="cuda")
    assert OnnxRuntimeEngine(load_model_dir(tiny_model_dir), device="cpu").describe()["device_reason"] == "MAE_DEVICE=cpu"


def test_demo_page_and_samples_are_served(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "/static/app.js" in page.text and "http" not in page.text.replace("http-equiv", "")  # no CDN
    for asset in ("/static/app.js", "/static/style.css"):
        assert client.get(asset).status_code == 200
    samples = client.get("/samples").json()
    assert {s["name"] for s in samples} >= {"sneaker", "bag"}
    assert client.get(samples[0]["url"]).headers["content-type"] == "image/png"


def test_api_docs_load_their_assets_from_the_server(client: TestClient) -> None:
    """/docs and /redoc work without internet access (air-gapped hosts): every script, style and icon
    they reference is a path on this server, and it is served."""
    for page_url in ("/docs", "/redoc"):
        page = client.get(page_url)
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assets = re.findall(r"""(?:src|href|url)\s*[=:]\s*['"]([^'"]+)['"]""", page.text)
        assert assets and not [a for a in assets if "//" in a], assets  # no http(s):// or protocol-relative URL
        for asset in assets:
            assert client.get(asset).status_code == 200, asset
