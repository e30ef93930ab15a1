"""Similar-image search: a gallery (vectors with their ids, paths and labels, and the images where it owns them)
and its exact cosine index.

A gallery comes from a Parquet file `mae-embed` wrote (vectors stored, checked against the served model), a
folder of images, or the bundled Fashion-MNIST test images (both embedded at startup by the server, through the
same code as /embed). The index is an exact matmul over L2-normalized float32 vectors: benchmarks/search_index.py
measured it against approximate indexes on the 60k Fashion-MNIST train split (README, "Similar-image search"),
and up to MAE_GALLERY_MAX_ITEMS rows it answers within a few milliseconds with recall 1 by construction.
No HTTP here.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from model_dir.schema import ModelJson
from service.engine import RuntimeConfigError
from service.imaging import encode_png

BUNDLED_GALLERY = Path(__file__).resolve().parent / "gallery" / "fashion-mnist-test.npz"
BUNDLED_DATASET = "fashion-mnist"  # the dataset the bundled gallery's images come from (model.json training.dataset)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
THUMBNAIL_PIXELS = 96  # the longer side of a thumbnail of a gallery image that is larger

# The Parquet layout mae-embed writes (service/bulk_embed.py): these columns (label only where the inputs had
# labels), and these keys in the schema's metadata naming what embedded the vectors (JSON for a non-string value:
# a pooling of "null" is the model's default, or none for source=classifier).
PARQUET_COLUMNS = ("path", "embedding")
META_MODEL, META_VERSION, META_SOURCE, META_POOLING = "mae.model", "mae.model_version", "mae.source", "mae.pooling"


class GalleryError(RuntimeConfigError):
    """A gallery that cannot be served with this model: missing, unreadable, or embedded by another model."""


@dataclass(frozen=True)
class Embedding:
    """What the vectors of a gallery are, which a query must match: the /embed source and pooling."""

    source: str  # encoder or classifier
    pooling: str | None  # the encoder's; None for source=classifier


@dataclass
class Gallery:
    """N gallery items: per item a path (or None), a label (or None), and once embedded a unit-norm vector.

    `pictures` holds the images of a gallery that owns them in memory (the bundled one, [N, H, W] uint8); a folder
    gallery's images are its files (`paths`, under `root`); a Parquet gallery's paths are where mae-embed read
    them, served only when they are files under the Parquet file's folder (absolute, or relative to it)."""

    origin: str  # where it came from, for /info and the log
    embedding: Embedding
    paths: list[str | None]
    labels: list[str | None]
    root: Path | None = None
    pictures: np.ndarray | None = None
    vectors: np.ndarray | None = None  # [N, D] float32, L2-normalized; None until embedded
    by_label: dict[str, np.ndarray] = field(init=False)  # label -> the ids of its items, ascending

    def __post_init__(self) -> None:
        names = np.array([label or "" for label in self.labels], dtype=object)
        self.by_label = {label: np.flatnonzero(names == label) for label in sorted({x for x in self.labels if x})}

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def ready(self) -> bool:
        return self.vectors is not None

    def set_vectors(self, vectors: np.ndarray) -> None:
        """The gallery's vectors [N, D], normalized here (a cosine index needs unit rows)."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or len(vectors) != len(self):
            raise GalleryError(f"{self.origin}: {len(self)} items but vectors of shape {list(vectors.shape)}")
        self.vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)

    def label_counts(self) -> dict[str, int]:
        return {label: len(ids) for label, ids in self.by_label.items()}

    def search(self, queries: np.ndarray, k: int, label: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(ids [Q, k] int64, scores [Q, k] float32) of the k most cosine-similar items per unit-norm query, best
        first; with `label`, among that label's items only. Exact: one matmul, argpartition, a sort of k."""
        assert self.vectors is not None, "gallery not embedded yet"
        candidates = None if label is None else self.by_label[label]
        scores = queries.astype(np.float32) @ self.vectors.T  # [Q, N]
        if candidates is not None:
            scores = scores[:, candidates]  # [Q, n_label]
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k] if k < scores.shape[1] else np.tile(
            np.arange(scores.shape[1]), (len(scores), 1))
        top_scores = np.take_along_axis(scores, top, axis=1)
        order = np.argsort(-top_scores, axis=1, kind="stable")
        ids = np.take_along_axis(top, order, axis=1)
        if candidates is not None:
            ids = candidates[ids]
        return ids.astype(np.int64), np.take_along_axis(top_scores, order, axis=1)

    def has_image(self, item: int) -> bool:
        return self.pictures is not None or self._file(item) is not None

    def _file(self, item: int) -> Path | None:
        """The image file of an item, when the gallery owns it: under the gallery's root folder, a file."""
        path = self.paths[item]
        if self.root is None or path is None:
            return None
        file = (self.root / path).resolve()
        return file if file.is_relative_to(self.root) and file.is_file() else None

    def thumbnail(self, item: int) -> bytes | None:
        """PNG of an item's image, at most THUMBNAIL_PIXELS on its longer side; None when it has none."""
        if self.pictures is not None:
            return encode_png(self.pictures[item][:, :, None] if self.pictures.ndim == 3 else self.pictures[item])
        file = self._file(item)
        if file is None:
            return None
        try:
            with Image.open(file) as im:
                im.thumbnail((THUMBNAIL_PIXELS, THUMBNAIL_PIXELS))
                rgb = np.asarray(im.convert("L" if im.mode in ("1", "L", "I", "I;16", "F") else "RGB"))
        except OSError:
            return None
        return encode_png(rgb[:, :, None] if rgb.ndim == 2 else rgb)

    def image_bytes(self, item: int) -> bytes:
        """The encoded image of an item, to embed it as a client's image would be (folder and bundled galleries)."""
        if self.pictures is not None:
            return encode_png(self.pictures[item][:, :, None])
        assert self.root is not None and self.paths[item] is not None
        return (self.root / str(self.paths[item])).read_bytes()


def open_gallery(setting: str, spec: ModelJson, model_is_bundled: bool, max_items: int) -> Gallery | None:
    """The gallery MAE_GALLERY names: `auto` (the bundled images with the bundled model, else none), `none`, a
    Parquet file from mae-embed, or a folder of images. Vectors are read from a Parquet file here; the others are
    embedded later (`Gallery.set_vectors`). GalleryError names the problem."""
    if setting in ("", "none"):
        return None
    default = Embedding("encoder", spec.embedding.default_pooling)
    if setting == "auto":
        if not (model_is_bundled and BUNDLED_GALLERY.is_file()):
            return None
        return bundled_gallery(default, max_items)
    path = Path(setting).expanduser()
    if path.is_dir():
        return folder_gallery(path, default, max_items)
    if path.is_file():
        return parquet_gallery(path, spec, max_items)
    raise GalleryError(f"gallery {path}: no such file or folder (MAE_GALLERY: auto, none, a Parquet file from "
                       "mae-embed, or a folder of images)")


def bundled_gallery(embedding: Embedding, max_items: int) -> Gallery:
    """The Fashion-MNIST test images shipped beside the bundled model (service/gallery), with their labels."""
    with np.load(BUNDLED_GALLERY) as data:
        images, label_ids, names, indices = data["images"], data["labels"], data["label_names"], data["indices"]
    _check_size(len(images), max_items, str(BUNDLED_GALLERY))
    return Gallery(origin=f"bundled: {len(images)} Fashion-MNIST test images", embedding=embedding,
                   paths=[f"fashion-mnist/t10k/{int(i):05d}" for i in indices],
                   labels=[str(names[c]) for c in label_ids], pictures=images)


def folder_gallery(folder: Path, embedding: Embedding, max_items: int) -> Gallery:
    """Every image file under `folder` (sorted), labelled by its subfolder (ImageFolder's layout; none at the top)."""
    root = folder.resolve()
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise GalleryError(f"gallery {folder}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in it")
    _check_size(len(files), max_items, str(folder))
    paths = [str(p.relative_to(root)) for p in files]
    labels = [p.parent.name if p.parent != root else None for p in files]
    return Gallery(origin=f"folder: {root}", embedding=embedding, paths=paths, labels=labels, root=root)


def parquet_gallery(file: Path, spec: ModelJson, max_items: int) -> Gallery:
    """A Parquet file from mae-embed: its vectors, refused when its metadata names another model, version, or
    width than the served model's."""
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise GalleryError(f"gallery {file}: reading Parquet needs pyarrow (pip install 'mae-service[bulk]')") from e
    try:
        table = pq.read_table(file)
    except Exception as e:  # pyarrow raises several types for a file that is not Parquet
        raise GalleryError(f"gallery {file}: not a readable Parquet file ({e})") from e
    missing = [c for c in PARQUET_COLUMNS if c not in table.column_names]
    if missing:
        raise GalleryError(f"gallery {file}: no column {', '.join(missing)} (mae-embed writes "
                           f"{', '.join(PARQUET_COLUMNS)})")
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    model, version = meta.get(META_MODEL), meta.get(META_VERSION)
    if (model, version) != (spec.name, spec.version):
        raise GalleryError(f"gallery {file} was embedded by model {model} {version}, not the served "
                           f"{spec.name} {spec.version}: its vectors cannot be compared with this model's "
                           "(embed the images again with mae-embed and this model)")
    source = meta.get(META_SOURCE, "encoder")
    pooling = None if meta.get(META_POOLING) in (None, "", "null") else meta[META_POOLING]
    if source == "encoder" and pooling is None:
        pooling = spec.embedding.default_pooling
    _check_size(table.num_rows, max_items, str(file))
    column = table.column("embedding").combine_chunks()
    width = getattr(column.type, "list_size", None)
    if width is None:
        raise GalleryError(f"gallery {file}: column embedding is {column.type}, not a fixed-size list of float32")
    vectors = column.values.to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, width)
    expected = (spec.classifier_features_dim() if source == "classifier"
                else spec.architecture.embed_dim * (2 if pooling == "cls+mean" else 1))
    if width != expected:
        raise GalleryError(f"gallery {file}: {width}-d vectors, but {source} {pooling or ''} embeddings of model "
                           f"{spec.name} have {expected}")
    labels = ([None if v is None else str(v) for v in table.column("label").to_pylist()]
              if "label" in table.column_names else [None] * table.num_rows)
    gallery = Gallery(origin=f"parquet: {file.resolve()}", embedding=Embedding(source, pooling),
                      paths=[None if v is None else str(v) for v in table.column("path").to_pylist()], labels=labels,
                      root=file.resolve().parent)
    gallery.set_vectors(vectors)
    return gallery


def _check_size(count: int, max_items: int, where: str) -> None:
    if count > max_items:
        raise GalleryError(f"gallery {where}: {count} items, over MAE_GALLERY_MAX_ITEMS {max_items} (exact search "
                           "grows linearly with the gallery; see README, Similar-image search)")


def write_bundled_gallery(out: Path, images: np.ndarray, labels: np.ndarray, label_names: list[str],
                          indices: np.ndarray) -> None:
    """The bundled gallery's file: images [N, H, W] uint8, their class ids, the class names, their dataset indices."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, images=images.astype(np.uint8), labels=labels.astype(np.int16),
                        label_names=np.array(label_names), indices=indices.astype(np.int32))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(buffer.getvalue())


def describe(gallery: Gallery) -> dict[str, object]:
    """/info's gallery: where it came from, its size, index, embedding, labels, and whether it is embedded."""
    return {"origin": gallery.origin, "size": len(gallery), "index": "exact", "source": gallery.embedding.source,
            "pooling": gallery.embedding.pooling, "ready": gallery.ready, "labels": gallery.label_counts(),
            "images": gallery.pictures is not None or gallery.root is not None}

