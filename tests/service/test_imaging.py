"""Image decoding and preprocessing: formats, orientation, modes, limits, resize and crop; PNG output."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image
from service_helpers import encode, gradient

from model_dir.schema import Preprocessing
from service.imaging import (
    ImageRejected,
    ImageTooLarge,
    UnsupportedImage,
    decode_pixels,
    encode_png,
    load_model_image,
    read_header,
    resize_and_crop,
)


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """What the server does with client bytes before converting them: header checks, then the decode."""
    return decode_pixels(read_header(data, max_pixels))


GRAY = Preprocessing(resize=28, crop=28, channels="L", mean=[0.286], std=[0.353])
RGB = Preprocessing(resize=32, crop=24, channels="RGB", mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])


@pytest.mark.parametrize(("fmt", "kwargs"), [
    ("PNG", {}), ("JPEG", {"quality": 95}), ("WEBP", {"lossless": True}), ("GIF", {}), ("BMP", {}),
    ("TIFF", {}), ("TIFF", {"compression": "tiff_lzw"}),
])
def test_every_format_decodes_to_the_model_input(fmt: str, kwargs: dict) -> None:
    im = gradient((40, 30))
    image = load_model_image(encode(im, fmt, **kwargs), RGB, 10**6)
    assert image.rgb.shape == (24, 24, 3) and image.rgb.dtype == np.uint8
    assert image.pixels.shape == (3, 24, 24) and image.pixels.dtype == np.float32
    # Lossless formats give exactly what resizing the original gives (GIF quantizes the colours).
    expected = np.asarray(resize_and_crop(im, RGB))
    tolerance = {"JPEG": 12, "GIF": 40}.get(fmt, 0)
    assert np.abs(image.rgb.astype(int) - expected.astype(int)).max() <= tolerance


def test_normalization_uses_model_mean_and_std() -> None:
    im = Image.new("L", (28, 28), 200)
    image = load_model_image(encode(im, "PNG"), GRAY, 10**6)
    np.testing.assert_allclose(image.pixels, (200 / 255 - 0.286) / 0.353, rtol=1e-6)


def test_gif_uses_first_frame() -> None:
    frames = [Image.new("L", (28, 28), v) for v in (10, 250)]
    out = io.BytesIO()
    frames[0].save(out, format="GIF", save_all=True, append_images=frames[1:])
    assert int(load_model_image(out.getvalue(), GRAY, 10**6).rgb.mean()) == 10


def test_exif_orientation_is_applied() -> None:
    im = gradient((40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    decoded = _open(encode(im, "JPEG", quality=95, exif=exif), 10**6)
    assert decoded.size == (20, 40)
    upright = np.asarray(im.transpose(Image.Transpose.ROTATE_270)).astype(int)
    assert np.abs(np.asarray(decoded).astype(int) - upright).mean() < 4


def test_sixteen_bit_grayscale_is_scaled_not_clipped() -> None:
    wide = np.full((28, 28), 40000, dtype=np.uint16)
    im = Image.fromarray(wide)
    assert im.mode.startswith("I")
    image = load_model_image(encode(im, "PNG"), GRAY, 10**6)
    assert int(image.rgb[0, 0, 0]) == round(40000 / 257)


def test_cmyk_palette_rgba_and_bilevel_convert() -> None:
    rgb = gradient((28, 28))
    cmyk = load_model_image(encode(rgb.convert("CMYK"), "JPEG", quality=95), RGB, 10**6)
    assert cmyk.rgb.shape == (24, 24, 3)
    palette = load_model_image(encode(rgb.convert("P"), "PNG"), GRAY, 10**6)
    assert palette.rgb.shape == (28, 28, 1)
    rgba = Image.new("RGBA", (28, 28), (255, 255, 255, 0))  # fully transparent white -> black background
    assert load_model_image(encode(rgba, "PNG"), GRAY, 10**6).rgb.max() == 0
    bilevel = Image.new("1", (28, 28), 1)
    assert load_model_image(encode(bilevel, "PNG"), GRAY, 10**6).rgb.min() == 255


def test_gray_to_rgb_and_rgb_to_gray() -> None:
    gray = Image.new("L", (28, 28), 77)
    assert load_model_image(encode(gray, "PNG"), RGB, 10**6).rgb.tolist() == np.full((24, 24, 3), 77).tolist()
    red = Image.new("RGB", (28, 28), (255, 0, 0))
    assert int(load_model_image(encode(red, "PNG"), GRAY, 10**6).rgb[0, 0, 0]) == 76  # ITU-R 601 luma


def test_resize_short_side_then_center_crop() -> None:
    im = gradient((64, 32))
    out = resize_and_crop(im, RGB)
    assert out.size == (24, 24)
    expected = im.resize((64, 32), Image.Resampling.BICUBIC).crop((20, 4, 44, 28))
    np.testing.assert_array_equal(np.asarray(out), np.asarray(expected))


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with a tiny (truncated) image body."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 10)) + chunk(b"IEND", b"")


def test_pixel_limit_is_checked_before_decoding() -> None:
    bomb = _png_header_only(50_000, 50_000)  # 2.5 gigapixels declared in 60 bytes
    with pytest.raises(ImageTooLarge, match="over the limit|too large"):
        _open(bomb, 40_000_000)
    with pytest.raises(ImageTooLarge, match="over the limit"):
        _open(encode(Image.new("L", (100, 100)), "PNG"), 9_999)
    # Between PIL's own warning (89 M pixels) and error (179 M) thresholds our limit decides.
    with pytest.raises(ImageTooLarge, match="over the limit"):
        _open(_png_header_only(10_000, 10_000), 40_000_000)


def test_garbage_truncated_and_unsupported() -> None:
    with pytest.raises(ImageRejected) as garbage:
        _open(b"definitely not an image", 10**6)
    assert garbage.value.kind == "invalid"
    png = encode(gradient((64, 64)), "PNG")
    with pytest.raises(ImageRejected) as truncated:
        _open(png[: len(png) // 2], 10**6)
    assert truncated.value.kind == "invalid"
    with pytest.raises(UnsupportedImage):
        _open(encode(Image.new("RGB", (16, 16)), "ICO"), 10**6)


def test_png_encoding_is_deterministic_and_lossless() -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (10, 12, 3), dtype=np.uint8)
    assert encode_png(rgb) == encode_png(rgb.copy())
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(encode_png(rgb)))), rgb)
