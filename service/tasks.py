"""The work behind each route, shared by the native routes and the protocol routes (OpenAI-style, OIP v2).

Each task checks its options (prepare), runs the images through its batcher queue (the queue keys
are the ones every route shares, so a request of any protocol joins the same batches, limits and
metrics), and returns arrays; each route only turns them into its protocol's response. Images come
as encoded files (bytes, decoded in the pool) or already as the model's input (ModelImage).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from starlette.requests import Request

from service.errors import InvalidOption
from service.imaging import ModelImage
from service.masking import MAX_SEED, Masking, len_keep, random_masking
from service.pipelines import MaskedImage

if TYPE_CHECKING:
    from service.app import Server

ImageSource = bytes | ModelImage  # an encoded file, or an image already at the model's input


async def embed(server: Server, request: Request, images: list[ImageSource], pooling: str | None,
                normalize: bool) -> tuple[str, list[np.ndarray]]:
    """(pooling used, one float32 embedding per image) from the `encoder` queue."""
    pipelines = server.pipelines
    pooling = pooling or server.model_dir.spec.embedding.default_pooling
    queue = server.queue("encoder", pipelines.embed_batch, "encoder")
    _, tokens = await server.infer(request, queue, images)
    return pooling, [pipelines.pool(t, pooling, normalize) for t in tokens]


@dataclass(frozen=True)
class Reconstructions:
    """What reconstruct() returns: the masked items, the decoder's predictions and the mask's facts."""

    items: list[MaskedImage]
    preds: list[np.ndarray]
    seed: int
    num_visible: int


def masking_for(server: Server, mask_ratio: float, seed: int | None) -> tuple[Masking, int, int]:
    """(masking, seed used, patches kept); 422 when the ratio leaves no patch visible."""
    num_patches = server.model_dir.spec.architecture.num_patches
    keep = len_keep(num_patches, mask_ratio)
    if keep < 1:
        raise InvalidOption(f"mask_ratio {mask_ratio} leaves no visible patch out of {num_patches}")
    seed = seed if seed is not None else secrets.randbelow(MAX_SEED + 1)
    return random_masking(num_patches, mask_ratio, seed), seed, keep


async def reconstruct(server: Server, request: Request, route: str, images: list[ImageSource], mask_ratio: float,
                      seed: int | None) -> Reconstructions:
    """Mask every image alike (seeded), encode the visible patches, decode: one `reconstruct/K=` queue per K."""
    server.require("decoder", route)
    masking, seed, keep = masking_for(server, mask_ratio, seed)
    queue = server.queue(f"reconstruct/K={keep}", server.pipelines.reconstruct_batch, "encoder+decoder")
    items, preds = await server.infer(request, queue, images, lambda image: MaskedImage(image, masking))
    return Reconstructions(items, preds, seed, keep)


def check_top_k(server: Server, k: int) -> None:
    labels = server.pipelines.labels
    if k > len(labels):
        raise InvalidOption(f"top_k {k} is over the {len(labels)} labels of model {server.model_dir.spec.name}")


async def classify(server: Server, request: Request, route: str, images: list[ImageSource]) -> list[np.ndarray]:
    """Logits [num_classes] per image from the `classifier` queue."""
    server.require("classifier", route)
    queue = server.queue("classifier", server.pipelines.classify_batch, "classifier")
    _, logits = await server.infer(request, queue, images)
    return logits
