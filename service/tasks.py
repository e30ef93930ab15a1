"""One task per route: `prepare` (checked options -> a job), `run_batch` (one batch, inference thread), `respond`.

LitServe's decode -> batch -> predict -> unbatch -> encode, made explicit: the server decodes the
images and runs a job's payloads through the queue its key names (`Server.run`); a task's
`run_batch` is what one batch computes; its `respond` builds the pydantic response model the
OpenAPI document shows. The native routes and the protocol routes (OpenAI-style, OIP v2) share
`prepare` and `run_batch`, so a request of any protocol joins the same batches, limits and
metrics; a protocol route only has its own response. No HTTP and no queues here.
"""

from __future__ import annotations

import base64
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple, get_args

import numpy as np

from model_dir.reconstruction import Reconstruction, panel, panel_row, reconstruct, to_uint8
from model_dir.schema import ModelDir, Pooling
from service.engine import Engine
from service.errors import InvalidOption
from service.imaging import ModelImage, encode_png
from service.masking import MAX_SEED, Masking, len_keep, random_masking
from service.schemas import (
    ClassifyItem,
    ClassifyOptions,
    ClassifyResponse,
    EmbeddingItem,
    EmbedOptions,
    EmbedResponse,
    PatchGrid,
    Prediction,
    ReconstructImages,
    ReconstructItem,
    ReconstructOptions,
    ReconstructResponse,
    Usage,
)

ImageSource = bytes | ModelImage  # an encoded file, or an image already at the model's input
PICTURES = ("original", "masked", "reconstruction", "pasted")


class QueueKey(NamedTuple):
    """The batcher queue a job joins: the items of one batch share the graphs they run (and the outputs they
    read) and K."""

    graphs: str  # also the queue's metrics label: encoder, encoder+decoder, classifier, classifier.features
    num_visible: int | None = None  # K, the visible patches of a reconstruction


@dataclass(frozen=True, kw_only=True)
class Job:
    """A request's checked options: the queue its images join and what each image's payload is."""

    key: QueueKey

    def payload(self, image: ModelImage) -> Any:
        return image


@dataclass(frozen=True, kw_only=True)
class EmbedJob(Job):
    source: str  # encoder or classifier
    pooling: str | None  # the encoder's; None for source=classifier
    normalize: bool
    encoding_format: str


@dataclass(frozen=True)
class MaskedImage:
    """A reconstruct payload: the image and its mask."""

    image: ModelImage
    masking: Masking


@dataclass(frozen=True, kw_only=True)
class ReconstructJob(Job):
    masking: Masking  # every image of a request masked alike
    seed: int
    mask_ratio: float
    response_format: str  # png or json (native route only)

    def payload(self, image: ModelImage) -> MaskedImage:
        return MaskedImage(image, self.masking)


@dataclass(frozen=True, kw_only=True)
class ClassifyJob(Job):
    top_k: int


class Task:
    """What every task holds: the model's description and the engine; `graph` is the one the route needs."""

    route: ClassVar[str]
    graph: ClassVar[str]

    def __init__(self, *, model_dir: ModelDir, engine: Engine):
        self.spec = model_dir.spec
        self.engine = engine

    def usage(self, count: int) -> Usage:
        return Usage.model_construct(images=count)

    def runner(self, job: Job) -> Callable[..., list[Any]]:
        """The function that computes one batch of the job's queue."""
        return self.run_batch  # type: ignore[attr-defined]


class EmbedTask(Task):
    """/embed: the encoder on every patch, the cls token and the mean of the patch tokens pooled per request
    (source=encoder); or the classifier graph's features, the input of its last Linear (source=classifier)."""

    route, graph = "/embed", "encoder"
    key = QueueKey("encoder")
    features_key = QueueKey("classifier.features")

    def __init__(self, *, model_dir: ModelDir, engine: Engine):
        super().__init__(model_dir=model_dir, engine=engine)
        self.features_dim = self.spec.classifier_features_dim() if engine.has("classifier") else None

    def prepare(self, options: EmbedOptions) -> EmbedJob:
        """The job; 422 for source=classifier with a pooling (it applies to the encoder) or on a model whose
        classifier graph has no features output (or that has no classifier)."""
        if options.source == "encoder":
            return EmbedJob(key=self.key, source="encoder", pooling=options.pooling or self.spec.embedding.default_pooling,
                            normalize=options.normalize, encoding_format=options.encoding_format)
        if options.pooling is not None:
            raise InvalidOption(f"pooling {options.pooling!r} applies to source=encoder only; source=classifier "
                                "serves the classifier's own pooled features")
        if self.features_dim is None:
            why = ("has no classifier graph" if not self.engine.has("classifier") else "has a classifier graph "
                   "without a features output (exported before it; mae-export --from-model-dir DIR --reexport "
                   "adds it)")
            raise InvalidOption(f"source=classifier: model {self.spec.name} {why}")
        return EmbedJob(key=self.features_key, source="classifier", pooling=None, normalize=options.normalize,
                        encoding_format=options.encoding_format)

    def runner(self, job: Job) -> Callable[..., list[Any]]:
        return self.run_features_batch if job.key == self.features_key else self.run_batch

    def dim(self, job: EmbedJob) -> int:
        """The size of the job's embeddings."""
        if job.source == "classifier":
            return int(self.features_dim or 0)
        return self.spec.architecture.embed_dim * (2 if job.pooling == "cls+mean" else 1)

    def sources(self) -> dict[str, dict[str, Any]]:
        """/info's embedding sources: each one's size and the kNN figures benchmarks/knn_retrieval.py recorded
        in model.json (training.knn), where there are some."""
        knn: dict[str, Any] = getattr(self.spec.training, "knn", None) or {}
        protocol = {k: knn[k] for k in ("k", "temperature") if k in knn}
        sources: dict[str, dict[str, Any]] = {"encoder": {
            "dim": self.spec.embedding.dim, "default_pooling": self.spec.embedding.default_pooling,
            "knn": {**protocol, **{p: knn[p] for p in get_args(Pooling) if p in knn}} if knn else None}}
        if self.features_dim is not None:
            sources["classifier"] = {"dim": self.features_dim,
                                     "knn": {**protocol, **knn["classifier"]} if "classifier" in knn else None}
        return sources

    def run_batch(self, images: list[ModelImage], *, alone: bool = False) -> list[np.ndarray]:
        """[2, D] float32 per image: the cls token and the mean of the patch tokens of its full-image latent
        (pooled here, for the whole batch in one numpy call, rather than per request on the event loop)."""
        pixels = np.stack([i.pixels for i in images])
        latent = self.engine.encode(pixels, self.engine.all_patches(len(images)), alone=alone)
        tokens = np.empty((len(images), 2, latent.shape[-1]), dtype=np.float32)
        tokens[:, 0] = latent[:, 0]
        np.mean(latent[:, 1:], axis=1, dtype=np.float32, out=tokens[:, 1])
        return list(tokens)

    def run_features_batch(self, images: list[ModelImage], *, alone: bool = False) -> list[np.ndarray]:
        """[D] float32 per image: the classifier graph's features (source=classifier)."""
        return list(self.engine.classify(np.stack([i.pixels for i in images]), alone=alone).features)

    @staticmethod
    def vectors(job: EmbedJob, tokens: list[np.ndarray]) -> list[np.ndarray]:
        """[2, D] per image from run_batch -> float32 embeddings: cls token, mean of patch tokens, or both;
        [D] from run_features_batch -> the features themselves."""
        out = []
        for t in tokens:
            vector = (t if job.pooling is None else {"cls": t[0], "mean": t[1], "cls+mean": t.reshape(-1)}[job.pooling]
                      ).copy()
            if job.normalize:
                vector /= max(float(np.linalg.norm(vector)), 1e-12)
            out.append(vector)
        return out

    @staticmethod
    def encode_embedding(vector: np.ndarray, encoding_format: str) -> np.ndarray | str:
        """float: the float32 array itself (the JSON response writes it as numbers); base64: little-endian f4."""
        if encoding_format == "base64":
            return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
        return vector

    def respond(self, job: EmbedJob, tokens: list[np.ndarray]) -> EmbedResponse:
        # model_construct: no validation of what this code builds (an embedding stays a numpy array, written
        # by orjson); the conformance tests check the bodies against the schema
        vectors = self.vectors(job, tokens)
        return EmbedResponse.model_construct(
            model=self.spec.name, dim=int(vectors[0].shape[0]), source=job.source, pooling=job.pooling,
            normalized=job.normalize,
            encoding_format=job.encoding_format, usage=self.usage(len(vectors)),
            data=[EmbeddingItem.model_construct(index=i, embedding=self.encode_embedding(v, job.encoding_format))
                  for i, v in enumerate(vectors)])


class ReconstructTask(Task):
    """/reconstruct: mask (seeded), encode the visible patches, decode; pictures and errors per image."""

    route, graph = "/reconstruct", "decoder"

    def prepare(self, options: ReconstructOptions) -> ReconstructJob:
        """The mask every image of the request gets; 422 when the ratio leaves no patch visible (the one place
        the model-dependent bound is checked; the schema checks 0 <= mask_ratio < 1)."""
        num_patches = self.spec.architecture.num_patches
        keep = len_keep(num_patches, options.mask_ratio)
        if keep < 1:
            raise InvalidOption(f"mask_ratio {options.mask_ratio} leaves no visible patch out of {num_patches}")
        seed = options.seed if options.seed is not None else secrets.randbelow(MAX_SEED + 1)
        return ReconstructJob(key=QueueKey("encoder+decoder", keep), masking=random_masking(num_patches, keep, seed),
                              seed=seed, mask_ratio=options.mask_ratio, response_format=options.response_format)

    def run_batch(self, items: list[MaskedImage], *, alone: bool = False) -> list[np.ndarray]:
        """Decoder predictions [L, p*p*C], one per image (all items of a batch share K)."""
        pixels = np.stack([i.image.pixels for i in items])
        latent = self.engine.encode(pixels, np.stack([i.masking.ids_keep for i in items]), alone=alone)
        return list(self.engine.decode(latent, np.stack([i.masking.ids_restore for i in items]), alone=alone))

    def reconstructions(self, items: list[MaskedImage], preds: list[np.ndarray]) -> list[Reconstruction]:
        return [reconstruct(item.image.rgb, pred, item.masking.mask, self.spec.preprocessing,
                            self.spec.architecture.patch_size, self.spec.norm_pix_loss)
                for item, pred in zip(items, preds, strict=True)]

    def respond_png(self, items: list[MaskedImage], preds: list[np.ndarray]) -> bytes:
        """One panel row per image: original | masked | reconstruction | pasted, enlarged when small."""
        return encode_png(panel([panel_row(r) for r in self.reconstructions(items, preds)]))

    def respond(self, job: ReconstructJob, items: list[MaskedImage], preds: list[np.ndarray]) -> ReconstructResponse:
        """Per image: the mask, the errors and the four pictures as base64 PNG at the model's resolution."""
        spec, a = self.spec, self.spec.architecture
        data = [ReconstructItem.model_construct(
            index=index, mask=item.masking.mask.tolist(), mse_masked=r.mse_masked,
            mse_masked_pixels=r.mse_masked_pixels, images=ReconstructImages.model_construct(**{
                name: base64.b64encode(encode_png(to_uint8(getattr(r, name)))).decode("ascii") for name in PICTURES}))
            for index, (item, r) in enumerate(zip(items, self.reconstructions(items, preds), strict=True))]
        grid = PatchGrid.model_construct(rows=a.grid_size, cols=a.grid_size, patch_size=a.patch_size,
                                         num_patches=a.num_patches, num_visible=job.key.num_visible)
        return ReconstructResponse.model_construct(
            model=spec.name, seed=job.seed, mask_ratio=job.mask_ratio, norm_pix_loss=spec.norm_pix_loss,
            denormalized_with_target_stats=spec.norm_pix_loss, grid=grid, data=data, usage=self.usage(len(data)))


class ClassifyTask(Task):
    """/classify: the classifier graph; softmax scores and the top-k labels."""

    route, graph = "/classify", "classifier"
    key = QueueKey("classifier")

    def __init__(self, *, model_dir: ModelDir, engine: Engine):
        super().__init__(model_dir=model_dir, engine=engine)
        self.labels: list[str] = list(self.spec.labels or [])
        if not self.labels and model_dir.has("classifier"):
            num_classes = model_dir.file("classifier").outputs[0].shape[-1]
            self.labels = [f"class_{i}" for i in range(int(num_classes))]

    def prepare(self, options: ClassifyOptions) -> ClassifyJob:
        if options.top_k > len(self.labels):
            raise InvalidOption(f"top_k {options.top_k} is over the {len(self.labels)} labels of model "
                                f"{self.spec.name}")
        return ClassifyJob(key=self.key, top_k=options.top_k)

    def run_batch(self, images: list[ModelImage], *, alone: bool = False) -> list[np.ndarray]:
        """Logits [num_classes], one per image."""
        return list(self.engine.classify(np.stack([i.pixels for i in images]), alone=alone).logits)

    @staticmethod
    def probabilities(logits: np.ndarray) -> np.ndarray:
        """Softmax over the last axis (float64, shifted by the maximum)."""
        z = logits.astype(np.float64) - np.max(logits, axis=-1, keepdims=True)
        return np.exp(z) / np.exp(z).sum(axis=-1, keepdims=True)

    def top_k(self, logits: np.ndarray, k: int) -> list[Prediction]:
        """Softmax over the logits, the k most probable classes first."""
        probs = self.probabilities(logits)
        order = np.argsort(-probs, kind="stable")[:k]
        return [Prediction.model_construct(label=self.labels[i], class_id=int(i), score=float(probs[i]))
                for i in order]

    def respond(self, job: ClassifyJob, logits: list[np.ndarray]) -> ClassifyResponse:
        return ClassifyResponse.model_construct(
            model=self.spec.name, usage=self.usage(len(logits)),
            data=[ClassifyItem.model_construct(index=i, predictions=self.top_k(row, job.top_k))
                  for i, row in enumerate(logits)])


@dataclass(frozen=True)
class Tasks:
    """The server's three tasks."""

    embed: EmbedTask
    reconstruct: ReconstructTask
    classify: ClassifyTask

    @classmethod
    def open(cls, *, model_dir: ModelDir, engine: Engine) -> Tasks:
        return cls(*(task(model_dir=model_dir, engine=engine) for task in (EmbedTask, ReconstructTask, ClassifyTask)))
