"""Image codecs: client bytes -> the model's pixels (per model.json preprocessing), and arrays -> PNG.

Decoding is defensive: the format is checked against an allow-list and the pixel count against a
limit from the header alone, before any pixel data is decompressed (decompression bombs).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from model_dir.reconstruction import to_uint8
from model_dir.schema import Preprocessing

# PIL format names accepted from clients (MPO: multi-picture JPEG as written by many cameras).
ALLOWED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF"})
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})


class ImageRejected(ValueError):
    """Base of the decode failures; `kind` is `invalid`, `unsupported` or `too_large`."""

    kind = "invalid"


class UnsupportedImage(ImageRejected):
    kind = "unsupported"


class ImageTooLarge(ImageRejected):
    kind = "too_large"


@dataclass(frozen=True)
class ModelImage:
    """One client image at the model's resolution: as shown (uint8) and as fed to the encoder."""

    rgb: np.ndarray  # [H, W, C] uint8, C = 1 or 3
    pixels: np.ndarray  # [C, H, W] float32, normalized with the model's mean and std


def read_header(data: bytes, max_pixels: int) -> Image.Image:
    """Parse only the header (PIL opens lazily): an allowed format and a pixel count within the limit,
    checked before any pixel data is decompressed."""
    try:
        # No warnings.catch_warnings() here: it swaps process-wide state and is not thread-safe (the decode
        # pool runs this concurrently). Our own pixel limit below applies before any decompression; PIL's
        # DecompressionBombWarning may still be logged for images that our limit then refuses.
        im = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as e:
        raise ImageRejected("not a recognised image format") from e
    except Image.DecompressionBombError as e:
        raise ImageTooLarge(f"image too large to decode ({e})") from e
    except Exception as e:  # PIL raises many types on corrupt headers
        raise ImageRejected(f"cannot read image header ({type(e).__name__}: {e})") from e
    if im.format not in ALLOWED_FORMATS:
        raise UnsupportedImage(f"image format {im.format} is not supported (JPEG, PNG, WebP, GIF, BMP, TIFF)")
    width, height = im.size
    if width * height > max_pixels:
        raise ImageTooLarge(f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}")
    if width < 1 or height < 1:
        raise ImageRejected(f"image has no pixels ({width}x{height})")
    return im


def decode_pixels(im: Image.Image) -> Image.Image:
    """The first frame of an image whose header `read_header` accepted, decoded and upright per EXIF."""
    try:
        im.seek(0)
        im.load()
        return ImageOps.exif_transpose(im)
    except Exception as e:
        raise ImageRejected(f"cannot decode image ({type(e).__name__}: {e})") from e


def to_channels(im: Image.Image, channels: str) -> Image.Image:
    """Any PIL mode -> `L` or `RGB`: 16-bit scaled to 8-bit, transparency composited over black."""
    if im.mode in _SIXTEEN_BIT_MODES:
        wide = np.asarray(im).astype(np.float64)
        im = Image.fromarray(np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8), "L")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba).convert("RGB")
    if im.mode in ("1", "F"):
        im = im.convert("L")
    if im.mode not in ("L", "RGB"):
        im = im.convert("RGB")  # CMYK, YCbCr, P without transparency, ...
    return im.convert(channels) if im.mode != channels else im


def resize_and_crop(im: Image.Image, prep: Preprocessing) -> Image.Image:
    """Short side to `prep.resize` (bicubic), then the centre `prep.crop` square, as torchvision does."""
    width, height = im.size
    if min(width, height) != prep.resize:
        if width <= height:
            size = (prep.resize, int(prep.resize * height / width))
        else:
            size = (int(prep.resize * width / height), prep.resize)
        im = im.resize(size, Image.Resampling.BICUBIC)
        width, height = im.size
    if (width, height) != (prep.crop, prep.crop):
        top = int(round((height - prep.crop) / 2.0))
        left = int(round((width - prep.crop) / 2.0))
        im = im.crop((left, top, left + prep.crop, top + prep.crop))
    return im


def normalize(rgb: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """uint8 [H, W, C] -> float32 [C, H, W], scaled to [0, 1] then normalized."""
    mean = np.asarray(prep.mean, dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(prep.std, dtype=np.float32).reshape(-1, 1, 1)
    return ((rgb.transpose(2, 0, 1).astype(np.float32) / 255.0 - mean) / std).astype(np.float32)


def from_pixels(pixels: np.ndarray, prep: Preprocessing) -> ModelImage:
    """Pixels [C, H, W] a client sent already normalized -> the model's input as is, and the picture they show
    (denormalized to uint8, what a reconstruction is composited with)."""
    mean = np.asarray(prep.mean, dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(prep.std, dtype=np.float32).reshape(-1, 1, 1)
    return ModelImage(rgb=to_uint8(pixels * std + mean), pixels=np.ascontiguousarray(pixels, dtype=np.float32))


def load_model_image(data: bytes, prep: Preprocessing, max_pixels: int) -> ModelImage:
    """Client bytes -> the model's input (decode, orient, convert channels, resize, crop, normalize)."""
    return to_model_image(read_header(data, max_pixels), prep)


def to_model_image(header: Image.Image, prep: Preprocessing) -> ModelImage:
    """An image `read_header` accepted -> the model's input (decode, orient, channels, resize, crop, normalize)."""
    im = decode_pixels(header)
    try:
        im = resize_and_crop(to_channels(im, prep.channels), prep)
    except (OSError, ValueError) as e:
        raise UnsupportedImage(f"cannot convert a {im.mode} image to {prep.channels} ({e})") from e
    rgb = np.asarray(im, dtype=np.uint8)
    rgb = rgb[:, :, None] if rgb.ndim == 2 else rgb
    return ModelImage(rgb=rgb, pixels=normalize(rgb, prep))


def encode_png(rgb: np.ndarray) -> bytes:
    """uint8 [H, W, 1|3] -> PNG bytes (deterministic for the same array)."""
    im = Image.fromarray(rgb[:, :, 0] if rgb.shape[2] == 1 else rgb, "L" if rgb.shape[2] == 1 else "RGB")
    out = io.BytesIO()
    im.save(out, format="PNG", compress_level=6)
    return out.getvalue()
