"""One task per route: `job` (raw options of any protocol -> a checked job), `run_batch` (one batch, inference
thread), `result` (the batch outputs of one request -> the task's result), and the result written out.

LitServe's decode -> batch -> predict -> unbatch -> encode, made explicit: the server decodes the
images and runs a job's payloads through the queue its key names, then has the task make its
result (`Server.run`); a task's `run_batch` is what one batch computes. Every protocol goes
through the same `job` (one options model per task, less what a protocol does not offer) and gets
the same result type (`Embeddings`, `Reconstructions`, `Classes`); a route only writes it out:
`respond` builds the native response model the OpenAPI document shows, `arrays` the named arrays
the Open Inference Protocol sends (`array_specs` declares them), and the OpenAI-style route its own
shape from `Embeddings`. No HTTP and no queues here.
"""

from __future__ import annotations

import base64
import secrets
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, NamedTuple, TypeVar

import numpy as np
from pydantic import BaseModel

from model_dir.reconstruction import Reconstruction, panel, panel_row, reconstruct, to_uint8
from model_dir.schema import ModelDir
from service.engine import Engine
from service.errors import InvalidOption
from service.fetch import ImageURL
from service.imaging import ImageRejected, ModelImage, encode_png, load_model_image
from service.inputs import parse_options
from service.masking import MAX_SEED, Masking, len_keep, random_masking
from service.schemas import (
    ClassifyItem,
    ClassifyOptions,
    ClassifyResponse,
    EmbeddingItem,
    EmbedOptions,
    EmbedResponse,
    Neighbor,
    PatchGrid,
    Prediction,
    ReconstructImages,
    ReconstructItem,
    ReconstructOptions,
    ReconstructResponse,
    SearchItem,
    SearchOptions,
    SearchResponse,
    Usage,
)
from service.search import Gallery, GalleryError

ImageSource = bytes | ImageURL | ModelImage  # an encoded file, one to fetch, or an image already at the model's input
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


@dataclass(frozen=True, kw_only=True)
class SearchJob(Job):
    embed: EmbedJob  # the query embeddings: the gallery's source and pooling, normalized, in /embed's queue
    k: int
    label: str | None


@dataclass(frozen=True)
class Embeddings:
    """/embed's result: one float32 vector per image, pooled (and normalized) as the job asked."""

    job: EmbedJob
    vectors: list[np.ndarray]

    @property
    def dim(self) -> int:
        return int(self.vectors[0].shape[0])

    def encoded(self) -> list[np.ndarray | str]:
        """Each vector as the job's encoding_format writes it: the float32 array itself (a JSON response writes it
        as numbers), or base64 of its little-endian float32 bytes."""
        if self.job.encoding_format == "base64":
            return [base64.b64encode(v.astype("<f4").tobytes()).decode("ascii") for v in self.vectors]
        return list(self.vectors)


@dataclass(frozen=True)
class Reconstructions:
    """/reconstruct's result: per image its mask and the pictures and errors of its reconstruction."""

    job: ReconstructJob
    items: list[MaskedImage]
    found: list[Reconstruction]


@dataclass(frozen=True)
class Classes:
    """/classify's result: the softmax over the classifier's logits, one row per image (float64)."""

    job: ClassifyJob
    probabilities: np.ndarray


@dataclass(frozen=True)
class Neighbors:
    """/search's result: per query image the ids of its k nearest gallery items and their cosine similarities."""

    job: SearchJob
    ids: np.ndarray  # [Q, k] int64
    scores: np.ndarray  # [Q, k] float32


@dataclass(frozen=True)
class ArraySpec:
    """One named output array of a task (-1: any size), as the Open Inference Protocol's metadata declares it."""

    name: str
    datatype: str
    shape: list[int]


@dataclass(frozen=True)
class Arrays:
    """A result as named arrays, and the scalars that go with them (a reconstruction's seed)."""

    outputs: dict[str, np.ndarray]
    parameters: dict[str, Any] = field(default_factory=dict)


OptionsT = TypeVar("OptionsT", bound=BaseModel)
JobT = TypeVar("JobT", bound=Job)
ResultT = TypeVar("ResultT")


class Task(ABC, Generic[OptionsT, JobT, ResultT]):
    """What every task is: the model's description and the engine; `graph` is the one the route needs, `options`
    every option the task has (the native routes offer all of them; a protocol route may offer fewer)."""

    route: ClassVar[str]
    graph: ClassVar[str]
    options: ClassVar[type[BaseModel]]
    heavy_result: ClassVar[bool] = False  # `result` does real work (pictures): the server runs it off the event loop

    def __init__(self, *, model_dir: ModelDir, engine: Engine):
        self.spec = model_dir.spec
        self.engine = engine

    def job(self, raw: Mapping[str, Any], *, absent: Collection[str] = (), fixed: Mapping[str, Any] | None = None
            ) -> JobT:
        """The one path from a request's raw options, in any protocol, to its job: `absent` names the options the
        protocol does not offer (a request that gives one is a 422 that lists those it does), `fixed` the values it
        sets for them; the rest is validated by `options` (422 naming every problem) and checked by `prepare`."""
        given = sorted(set(raw) & set(absent))
        if given:
            offered = [name for name in self.options.model_fields if name not in absent]
            raise InvalidOption(f"{', '.join(given)}: not an option here (the options here: "
                                f"{', '.join(offered) or 'none'})")
        return self.prepare(parse_options(self.options, {**raw, **(fixed or {})}))

    @abstractmethod
    def prepare(self, options: OptionsT) -> JobT:
        """Checked options -> the job: its queue and what each image's payload is (the model-dependent checks)."""

    def runner(self, job: JobT) -> Callable[..., list[Any]]:
        """The function that computes one batch of the job's queue."""
        return self.run_batch

    @abstractmethod
    def run_batch(self, payloads: list[Any], *, alone: bool = False) -> list[Any]:
        """One batch of payloads -> one output each (in an inference thread)."""

    @abstractmethod
    def result(self, job: JobT, payloads: list[Any], outputs: list[Any]) -> ResultT:
        """One request's payloads and batch outputs -> its result."""

    @abstractmethod
    def respond(self, result: ResultT) -> BaseModel:
        """The native route's response model."""

    @abstractmethod
    def arrays(self, result: ResultT) -> Arrays:
        """The result as the named arrays of `array_specs`."""

    @abstractmethod
    def array_specs(self) -> list[ArraySpec]:
        """The arrays `arrays` returns: names, datatypes, shapes."""

    def usage(self, count: int) -> Usage:
        return Usage.model_construct(images=count)


class EmbedTask(Task[EmbedOptions, EmbedJob, Embeddings]):
    """/embed: the encoder on every patch, the cls token and the mean of the patch tokens pooled per request
    (source=encoder); or the classifier graph's features, the input of its last Linear (source=classifier)."""

    route, graph, options = "/embed", "encoder", EmbedOptions
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

    def runner(self, job: EmbedJob) -> Callable[..., list[Any]]:
        return self.run_features_batch if job.key == self.features_key else self.run_batch

    def dim(self, job: EmbedJob) -> int:
        """The size of the job's embeddings."""
        if job.source == "classifier":
            return int(self.features_dim or 0)
        return self.spec.architecture.embed_dim * (2 if job.pooling == "cls+mean" else 1)

    def sources(self) -> dict[str, dict[str, Any]]:
        """/info's embedding sources: each one's size and the kNN figures benchmarks/knn_retrieval.py recorded
        in model.json (training.knn), where there are some."""
        knn = self.spec.training.knn
        sources: dict[str, dict[str, Any]] = {"encoder": {
            "dim": self.spec.embedding.dim, "default_pooling": self.spec.embedding.default_pooling,
            "knn": knn.model_dump(exclude={"classifier"}, exclude_none=True) if knn else None}}
        if self.features_dim is not None:
            figures = knn.classifier if knn else None
            sources["classifier"] = {"dim": self.features_dim, "knn": None if figures is None else {
                "k": knn.k, "temperature": knn.temperature, **figures.model_dump()}}
        return sources

    def run_batch(self, images: list[ModelImage], *, alone: bool = False) -> list[np.ndarray]:
        """[2, D] float32 per image: the cls token and the mean of the patch tokens of its full-image latent,
        pooled by the engine for the whole batch (on the device, where the latent lives on one)."""
        return list(self.engine.embed(np.stack([i.pixels for i in images]), alone=alone))

    def run_features_batch(self, images: list[ModelImage], *, alone: bool = False) -> list[np.ndarray]:
        """[D] float32 per image: the classifier graph's features (source=classifier)."""
        return list(self.engine.classify(np.stack([i.pixels for i in images]), alone=alone).features)

    def result(self, job: EmbedJob, payloads: list[ModelImage], outputs: list[np.ndarray]) -> Embeddings:
        """[2, D] per image from run_batch -> the job's pooling (cls token, mean of patch tokens, or both); [D]
        from run_features_batch -> the features themselves; L2-normalized when the job asks."""
        vectors = []
        for t in outputs:
            vector = (t if job.pooling is None else {"cls": t[0], "mean": t[1], "cls+mean": t.reshape(-1)}[job.pooling]
                      ).copy()
            if job.normalize:
                vector /= max(float(np.linalg.norm(vector)), 1e-12)
            vectors.append(vector)
        return Embeddings(job, vectors)

    def respond(self, result: Embeddings) -> EmbedResponse:
        # model_construct: no validation of what this code builds (an embedding stays a numpy array, written
        # by orjson); the conformance tests check the bodies against the schema
        job = result.job
        return EmbedResponse.model_construct(
            model=self.spec.name, dim=result.dim, source=job.source, pooling=job.pooling, normalized=job.normalize,
            encoding_format=job.encoding_format, usage=self.usage(len(result.vectors)),
            data=[EmbeddingItem.model_construct(index=i, embedding=e) for i, e in enumerate(result.encoded())])

    def arrays(self, result: Embeddings) -> Arrays:
        return Arrays({"embedding": np.stack(result.vectors)})

    def array_specs(self) -> list[ArraySpec]:
        # the width depends on the request's pooling and source (/info's embedding_sources): a variable dimension
        return [ArraySpec("embedding", "FP32", [-1, -1])]


class ReconstructTask(Task[ReconstructOptions, ReconstructJob, Reconstructions]):
    """/reconstruct: mask (seeded), encode the visible patches, decode; pictures and errors per image."""

    route, graph, options = "/reconstruct", "decoder", ReconstructOptions
    heavy_result = True

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

    def result(self, job: ReconstructJob, payloads: list[MaskedImage], outputs: list[np.ndarray]) -> Reconstructions:
        return Reconstructions(job, payloads, [
            reconstruct(item.image.rgb, pred, item.masking.mask, self.spec.preprocessing,
                        self.spec.architecture.patch_size, self.spec.norm_pix_loss)
            for item, pred in zip(payloads, outputs, strict=True)])

    def respond_png(self, result: Reconstructions) -> bytes:
        """One panel row per image: original | masked | reconstruction | pasted, enlarged when small."""
        return encode_png(panel([panel_row(r) for r in result.found]))

    def respond(self, result: Reconstructions) -> ReconstructResponse:
        """Per image: the mask, the errors and the four pictures as base64 PNG at the model's resolution."""
        spec, a, job = self.spec, self.spec.architecture, result.job
        data = [ReconstructItem.model_construct(
            index=index, mask=item.masking.mask.tolist(), mse_masked=r.mse_masked,
            mse_masked_pixels=r.mse_masked_pixels, images=ReconstructImages.model_construct(**{
                name: base64.b64encode(encode_png(to_uint8(getattr(r, name)))).decode("ascii") for name in PICTURES}))
            for index, (item, r) in enumerate(zip(result.items, result.found, strict=True))]
        grid = PatchGrid.model_construct(rows=a.grid_size, cols=a.grid_size, patch_size=a.patch_size,
                                         num_patches=a.num_patches, num_visible=job.key.num_visible)
        return ReconstructResponse.model_construct(
            model=spec.name, seed=job.seed, mask_ratio=job.mask_ratio, norm_pix_loss=spec.norm_pix_loss,
            denormalized_with_target_stats=spec.norm_pix_loss, grid=grid, data=data, usage=self.usage(len(data)))

    def arrays(self, result: Reconstructions) -> Arrays:
        found = result.found
        return Arrays({
            "reconstruction": np.stack([r.reconstruction for r in found]).astype(np.float32),
            "pasted": np.stack([r.pasted for r in found]).astype(np.float32),
            "mask": np.stack([item.masking.mask for item in result.items]).astype(np.uint8),
            "mse_masked": np.array([np.nan if r.mse_masked is None else r.mse_masked for r in found], np.float32),
        }, {"seed": result.job.seed, "mask_ratio": result.job.mask_ratio})

    def array_specs(self) -> list[ArraySpec]:
        a = self.spec.architecture
        image = [-1, a.in_chans, a.img_size, a.img_size]
        return [ArraySpec("reconstruction", "FP32", image), ArraySpec("pasted", "FP32", image),
                ArraySpec("mask", "UINT8", [-1, a.num_patches]), ArraySpec("mse_masked", "FP32", [-1])]


class ClassifyTask(Task[ClassifyOptions, ClassifyJob, Classes]):
    """/classify: the classifier graph; softmax scores and the top-k labels."""

    route, graph, options = "/classify", "classifier", ClassifyOptions
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

    def result(self, job: ClassifyJob, payloads: list[ModelImage], outputs: list[np.ndarray]) -> Classes:
        """Softmax over the logits (float64, shifted by each row's maximum)."""
        z = np.stack(outputs).astype(np.float64)
        e = np.exp(z - np.max(z, axis=-1, keepdims=True))
        return Classes(job, e / e.sum(axis=-1, keepdims=True))

    def top_k(self, probabilities: np.ndarray, k: int) -> list[Prediction]:
        """The k most probable classes of one image, first the most probable."""
        order = np.argsort(-probabilities, kind="stable")[:k]
        return [Prediction.model_construct(label=self.labels[i], class_id=int(i), score=float(probabilities[i]))
                for i in order]

    def respond(self, result: Classes) -> ClassifyResponse:
        return ClassifyResponse.model_construct(
            model=self.spec.name, usage=self.usage(len(result.probabilities)),
            data=[ClassifyItem.model_construct(index=i, predictions=self.top_k(row, result.job.top_k))
                  for i, row in enumerate(result.probabilities)])

    def arrays(self, result: Classes) -> Arrays:
        top = np.argmax(result.probabilities, axis=1)
        return Arrays({"probabilities": result.probabilities.astype(np.float32), "class_id": top.astype(np.int64),
                       "label": np.array([self.labels[i] for i in top], dtype=object)})

    def array_specs(self) -> list[ArraySpec]:
        return [ArraySpec("probabilities", "FP32", [-1, len(self.labels)]), ArraySpec("class_id", "INT64", [-1]),
                ArraySpec("label", "BYTES", [-1])]


class SearchTask(Task[SearchOptions, SearchJob, Neighbors]):
    """/search: each image embedded as the gallery was (an /embed job, in /embed's queue and batches), then its
    k most similar gallery items (`Gallery.search`, exact cosine)."""

    route, graph, options = "/search", "encoder", SearchOptions
    heavy_result = True  # a matmul over the whole gallery: off the event loop

    def __init__(self, *, model_dir: ModelDir, engine: Engine, embed: EmbedTask, gallery: Gallery):
        super().__init__(model_dir=model_dir, engine=engine)
        self.embed, self.gallery = embed, gallery

    def prepare(self, options: SearchOptions) -> SearchJob:
        """The job; 422 for a label no item has, or a k over the items searched."""
        counts = self.gallery.label_counts()
        if options.label is not None and options.label not in counts:
            raise InvalidOption(f"label {options.label!r}: no gallery item has it (the labels: "
                                f"{', '.join(counts) or 'none, the gallery is unlabelled'})")
        items = len(self.gallery) if options.label is None else counts[options.label]
        if options.k > items:
            raise InvalidOption(f"k {options.k} is over the {items} gallery items"
                                + ("" if options.label is None else f" labelled {options.label!r}"))
        g = self.gallery.embedding
        embed = self.embed.prepare(EmbedOptions.model_construct(source=g.source, pooling=g.pooling, normalize=True,
                                                                encoding_format="float"))
        return SearchJob(key=embed.key, embed=embed, k=options.k, label=options.label)

    def embed_gallery(self, batch_size: int, max_pixels: int) -> None:
        """Vectors for a gallery that has none (a folder, the bundled images): each image read as a client's is and
        embedded as /search embeds its queries, `batch_size` at a time (startup; an inference thread)."""
        g, prep = self.gallery, self.spec.preprocessing
        job = self.prepare(SearchOptions.model_construct(k=1, label=None)).embed
        run = self.embed.runner(job)
        vectors: list[np.ndarray] = []
        for start in range(0, len(g), batch_size):
            items = range(start, min(start + batch_size, len(g)))
            images = []
            for item in items:
                try:
                    images.append(load_model_image(g.image_bytes(item), prep, max_pixels))
                except (OSError, ImageRejected) as e:
                    raise GalleryError(f"gallery {g.origin}: item {item} ({g.paths[item]}): {e}") from e
            vectors += self.embed.result(job, images, run(images)).vectors
        g.set_vectors(np.stack(vectors))

    def runner(self, job: SearchJob) -> Callable[..., list[Any]]:
        return self.embed.runner(job.embed)

    def run_batch(self, images: list[ModelImage], *, alone: bool = False) -> list[np.ndarray]:
        return self.embed.run_batch(images, alone=alone)

    def result(self, job: SearchJob, payloads: list[ModelImage], outputs: list[np.ndarray]) -> Neighbors:
        queries = np.stack(self.embed.result(job.embed, payloads, outputs).vectors)
        return Neighbors(job, *self.gallery.search(queries, job.k, job.label))

    def respond(self, result: Neighbors) -> SearchResponse:
        g = self.gallery
        data = [SearchItem.model_construct(index=q, neighbors=[
            Neighbor.model_construct(id=int(i), score=float(score), label=g.labels[i], path=g.paths[i])
            for i, score in zip(ids, scores, strict=True)]) for q, (ids, scores) in enumerate(
                zip(result.ids, result.scores, strict=True))]
        return SearchResponse.model_construct(model=self.spec.name, source=g.embedding.source,
                                              pooling=g.embedding.pooling, gallery_size=len(g), data=data,
                                              usage=self.usage(len(data)))

    def arrays(self, result: Neighbors) -> Arrays:
        return Arrays({"id": result.ids, "score": result.scores})

    def array_specs(self) -> list[ArraySpec]:
        return [ArraySpec("id", "INT64", [-1, -1]), ArraySpec("score", "FP32", [-1, -1])]


@dataclass(frozen=True)
class Tasks:
    """The server's three tasks."""

    embed: EmbedTask
    reconstruct: ReconstructTask
    classify: ClassifyTask

    @classmethod
    def open(cls, *, model_dir: ModelDir, engine: Engine) -> Tasks:
        return cls(*(task(model_dir=model_dir, engine=engine) for task in (EmbedTask, ReconstructTask, ClassifyTask)))

    def named(self, name: str) -> Task[Any, Any, Any]:
        """The task by its field name: embed, reconstruct or classify."""
        task: Task[Any, Any, Any] = getattr(self, name)
        return task
