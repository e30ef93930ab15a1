"""What each route computes around the runtime: batch functions (inference thread) and their decoding/encoding.

The batch functions take the payloads of one batch and return one result per payload; the rest
turns those results into response values. No HTTP and no queues here.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from model_dir.reconstruction import Reconstruction, enlarge, panel, reconstruct, to_uint8
from model_dir.schema import ModelDir
from service.engine import Engine
from service.imaging import ModelImage, encode_png, load_model_image, read_header, to_model_image
from service.masking import Masking


@dataclass(frozen=True)
class MaskedImage:
    """A reconstruct payload: the image and its mask."""

    image: ModelImage
    masking: Masking


class Pipelines:
    """Model-specific steps of /embed, /reconstruct and /classify."""

    def __init__(self, model_dir: ModelDir, runtime: Engine, max_image_pixels: int):
        self.spec = model_dir.spec
        self.runtime = runtime
        self.max_image_pixels = max_image_pixels
        self.labels: list[str] = list(self.spec.labels or [])
        if not self.labels and model_dir.has("classifier"):
            num_classes = model_dir.file("classifier").outputs[0].shape[-1]
            self.labels = [f"class_{i}" for i in range(int(num_classes))]

    def load(self, data: bytes) -> ModelImage:
        return load_model_image(data, self.spec.preprocessing, self.max_image_pixels)

    def header(self, data: bytes) -> Image.Image:
        """The image's header only (format and pixel limits checked; nothing decompressed yet)."""
        return read_header(data, self.max_image_pixels)

    def finish(self, header: Image.Image) -> ModelImage:
        """Decode an image `header` accepted into the model's input."""
        return to_model_image(header, self.spec.preprocessing)

    # -- batch functions (inference thread; `alone`: no other batch runs or waits, see Engine) ------------

    def embed_batch(self, images: list[ModelImage], *, alone: bool = False) -> list[np.ndarray]:
        """[2, D] float32 per image: the cls token and the mean of the patch tokens of its full-image latent
        (pooled here, for the whole batch in one numpy call, rather than per request on the event loop)."""
        pixels = np.stack([i.pixels for i in images])
        latent = self.runtime.encode(pixels, self.runtime.all_patches(len(images)), alone=alone)
        tokens = np.empty((len(images), 2, latent.shape[-1]), dtype=np.float32)
        tokens[:, 0] = latent[:, 0]
        np.mean(latent[:, 1:], axis=1, dtype=np.float32, out=tokens[:, 1])
        return list(tokens)

    def reconstruct_batch(self, items: list[MaskedImage], *, alone: bool = False) -> list[np.ndarray]:
        """Decoder predictions [L, p*p*C], one per image (all items of a batch share K)."""
        pixels = np.stack([i.image.pixels for i in items])
        latent = self.runtime.encode(pixels, np.stack([i.masking.ids_keep for i in items]), alone=alone)
        return list(self.runtime.decode(latent, np.stack([i.masking.ids_restore for i in items]), alone=alone))

    def classify_batch(self, images: list[ModelImage], *, alone: bool = False) -> list[np.ndarray]:
        """Logits [num_classes], one per image."""
        return list(self.runtime.classify(np.stack([i.pixels for i in images]), alone=alone))

    # -- results -> response values ----------------------------------------------------------------------

    @staticmethod
    def pool(tokens: np.ndarray, pooling: str, normalize: bool) -> np.ndarray:
        """[2, D] from embed_batch -> float32 embedding: cls token, mean of patch tokens, or both concatenated."""
        vector = {"cls": tokens[0], "mean": tokens[1], "cls+mean": tokens.reshape(-1)}[pooling].copy()
        if normalize:
            vector /= max(float(np.linalg.norm(vector)), 1e-12)
        return vector

    @staticmethod
    def encode_embedding(vector: np.ndarray, encoding_format: str) -> np.ndarray | str:
        """float: the float32 array itself (the JSON response writes it as numbers); base64: little-endian f4."""
        if encoding_format == "base64":
            return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
        return vector

    @staticmethod
    def probabilities(logits: np.ndarray) -> np.ndarray:
        """Softmax over the last axis (float64, shifted by the maximum)."""
        z = logits.astype(np.float64) - np.max(logits, axis=-1, keepdims=True)
        return np.exp(z) / np.exp(z).sum(axis=-1, keepdims=True)

    def top_k(self, logits: np.ndarray, k: int) -> list[dict[str, Any]]:
        """Softmax over the logits, the k most probable classes first."""
        probs = self.probabilities(logits)
        order = np.argsort(-probs, kind="stable")[:k]
        return [{"label": self.labels[i], "class_id": int(i), "score": float(probs[i])} for i in order]

    def reconstruction(self, item: MaskedImage, pred: np.ndarray) -> Reconstruction:
        return reconstruct(item.image.rgb, pred, item.masking.mask, self.spec.preprocessing,
                           self.spec.architecture.patch_size, self.spec.norm_pix_loss)

    def reconstruct_png(self, items: list[MaskedImage], preds: list[np.ndarray]) -> bytes:
        """One row per image: original | masked | reconstruction | pasted, enlarged when small."""
        rows = []
        for item, pred in zip(items, preds, strict=True):
            r = self.reconstruction(item, pred)
            rows.append([enlarge(to_uint8(x)) for x in (r.original, r.masked, r.reconstruction, r.pasted)])
        return encode_png(panel(rows))

    def reconstruct_json(self, items: list[MaskedImage], preds: list[np.ndarray]) -> list[dict[str, Any]]:
        """Per image: the mask, the errors and the four pictures as base64 PNG at the model's resolution."""
        out = []
        for index, (item, pred) in enumerate(zip(items, preds, strict=True)):
            r = self.reconstruction(item, pred)
            pictures = {name: base64.b64encode(encode_png(to_uint8(getattr(r, name)))).decode("ascii")
                        for name in ("original", "masked", "reconstruction", "pasted")}
            out.append({"index": index, "mask": item.masking.mask.tolist(), "mse_masked": r.mse_masked,
                        "mse_masked_pixels": r.mse_masked_pixels, "images": pictures})
        return out
