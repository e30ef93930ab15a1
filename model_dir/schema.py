"""The model directory: the one definition of the `model.json` schema, and the loader that checks a directory.

The exporter (`training/`) writes a directory with `write_model_json` and `make_file_spec`;
the server (`service/`) reads it with `load_model_dir` and, once it has ONNX Runtime sessions, checks each one
against its declaration with `check_session_io`. Torch-free and onnx-free on purpose.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

SCHEMA_VERSION = 1
MODEL_JSON = "model.json"
GRAPHS = ("encoder", "decoder", "classifier")
PRECISIONS = ("fp32", "fp16", "int8")

CLASSIFIER_OUTPUTS = ("logits", "features")  # the classifier graph's outputs; `features` since ClassifierInfo.features
Graph = Literal["encoder", "decoder", "classifier"]
Precision = Literal["fp32", "fp16", "int8"]
Pooling = Literal["cls", "mean", "cls+mean"]
DType = Literal["float32", "float16", "int64", "int32"]
Dim = int | str  # a fixed size, or a symbolic one such as "B" or "K"

# ONNX Runtime's NodeArg.type strings for the dtypes above.
ORT_TYPES: dict[str, str] = {
    "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64", "tensor(int32)": "int32",
}


class ModelDirError(ValueError):
    """A model directory the server must not load: the message names the file and the problem."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorSpec(_Strict):
    """One graph input or output: its name, shape (ints and symbolic names) and element type."""

    name: str
    shape: list[Dim]
    dtype: DType


class _HashedFile(_Strict):
    """A file of the directory: its path (relative, no '..') and sha256."""

    path: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")

    @field_validator("path")
    @classmethod
    def _relative(cls, v: str) -> str:
        return _check_relative(v)


class ExternalDataFile(_HashedFile):
    """A weights file an `.onnx` file refers to (written beside it for graphs over 2 GB)."""


class FileSpec(_HashedFile):
    """One ONNX file of the directory, with what the server checks before and after loading it."""

    bytes: int = Field(ge=0)
    external_data: list[ExternalDataFile] = []
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    quantization: str | None = None  # the int8 recipe (training/quantize.py) of an int8 variant


class SelfCheckSpec(_HashedFile):
    """The stored self-check (`selfcheck.npz`): inputs and reference outputs the server checks every variant on."""

    bytes: int = Field(ge=0)
    images: int = Field(gt=0)
    inputs: Literal["random", "real"]
    reference: Literal["torch", "onnxruntime-fp32"]  # torch at export; fp32 ONNX Runtime when derived from a directory
    keeps: list[int]  # the kept-patch counts K of the stored cases


class WeightsSpec(_HashedFile):
    """`weights.safetensors`: the torch engine's state dicts (`mae.*`: encoder and decoder, `classifier.*`).

    Optional: the ONNX Runtime engine never reads it, and without it the torch engine recovers the
    weights from the fp32 graphs."""

    bytes: int = Field(ge=0)


class Architecture(_Strict):
    img_size: int = Field(gt=0)
    patch_size: int = Field(gt=0)
    in_chans: int = Field(gt=0)
    embed_dim: int = Field(gt=0)
    depth: int = Field(gt=0)
    num_heads: int = Field(gt=0)
    decoder_embed_dim: int = Field(gt=0)
    decoder_depth: int = Field(ge=0)
    decoder_num_heads: int = Field(gt=0)
    mlp_ratio: float = Field(gt=0)
    layer_norm_eps: float = Field(gt=0)
    num_patches: int = Field(gt=0)
    grid_size: int = Field(gt=0)

    @model_validator(mode="after")
    def _consistent(self) -> Architecture:
        if self.grid_size * self.patch_size != self.img_size or self.grid_size**2 != self.num_patches:
            raise ValueError(f"img_size {self.img_size}, patch_size {self.patch_size}, grid_size {self.grid_size} "
                             f"and num_patches {self.num_patches} disagree")
        return self

    @property
    def patch_dim(self) -> int:
        return self.patch_size**2 * self.in_chans


class Preprocessing(_Strict):
    """How a client image becomes `pixels`: resize the short side, centre-crop, scale to [0, 1], normalize."""

    resize: int = Field(gt=0)
    crop: int = Field(gt=0)
    channels: Literal["L", "RGB"]
    mean: list[float]
    std: list[float]

    @model_validator(mode="before")
    @classmethod
    def _drop_interpolation(cls, data: Any) -> Any:
        """Older directories name `interpolation: bicubic`, the only resampling the server has: accepted, not kept."""
        if isinstance(data, dict) and data.get("interpolation") == "bicubic":
            return {k: v for k, v in data.items() if k != "interpolation"}
        return data

    @model_validator(mode="after")
    def _per_channel(self) -> Preprocessing:
        n = 1 if self.channels == "L" else 3
        if len(self.mean) != n or len(self.std) != n or any(s <= 0 for s in self.std):
            raise ValueError(f"channels {self.channels} needs {n} mean and {n} positive std values")
        return self


class Embedding(_Strict):
    default_pooling: Pooling = "cls"
    dim: int = Field(gt=0)


class ClassifierInfo(_Strict):
    source: Literal["probe", "finetune"]
    pooling: Pooling
    top1: float | None = None
    # The graph's second output `features` [B, D]: the input of its last Linear (unnormalized), which
    # `/embed?source=classifier` serves. Directories exported before it have `logits` only (false).
    features: bool = False


class KnnTop1(_Strict):
    """Weighted-kNN top-1 (%) of one embedding source: the test split against the train split as memory, and
    leave-one-out over the test fixture (the figure tests/service/test_default_model.py checks through /embed)."""

    test_top1: float = Field(ge=0, le=100)
    fixture_top1: float = Field(ge=0, le=100)


class Knn(_Strict):
    """Retrieval figures benchmarks/knn_retrieval.py measured: the vote's k and temperature, and the top-1 of
    each /embed pooling and of the classifier's features, where measured."""

    model_config = ConfigDict(serialize_by_alias=True)  # the pooling is `cls+mean` on disk and in /info
    k: int = Field(gt=0)
    temperature: float = Field(gt=0)
    cls: KnnTop1 | None = None
    mean: KnnTop1 | None = None
    cls_mean: KnnTop1 | None = Field(None, alias="cls+mean")
    classifier: KnnTop1 | None = None

    @model_serializer(mode="wrap")
    def _measured_only(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """What was measured: a source without figures is left out (model.json, /info), not written as null."""
        return {k: v for k, v in handler(self).items() if v is not None}


class Training(BaseModel):
    """Facts from training: dataset, epochs and kNN figures, plus whatever metrics the checkpoints carried."""

    model_config = ConfigDict(extra="allow", frozen=True)
    dataset: str | None = None
    epochs: int | None = None
    knn: Knn | None = None


class VerificationRow(_Strict):
    """ONNX Runtime against torch for one graph, precision, input kind and shape."""

    graph: Literal["encoder", "decoder", "classifier", "encoder+decoder", "classifier.features"]
    precision: Precision
    inputs: Literal["random", "real"]
    batch: int
    keep: int | None  # K, for the graphs that take ids_keep
    max_abs_diff: float
    cosine: float
    passed: bool


class Verification(_Strict):
    fp32_max_abs_diff: float  # the limits the rows were checked against
    min_cosine: dict[str, float]  # on the encoder latent and the classifier logits and features
    min_cosine_chained: dict[str, float] = {}  # on the decoder pred after a reduced-precision encoder
    rows: list[VerificationRow]


class ModelJson(_Strict):
    """The content of `model.json`."""

    schema_version: Literal[1] = SCHEMA_VERSION
    name: str = Field(min_length=1)
    version: str
    architecture: Architecture
    preprocessing: Preprocessing
    norm_pix_loss: bool
    labels: list[str] | None
    embedding: Embedding
    classifier: ClassifierInfo | None
    training: Training
    files: dict[Graph, dict[Precision, FileSpec]]
    verification: Verification | None = None
    self_check: SelfCheckSpec | None = None
    weights: WeightsSpec | None = None

    @model_validator(mode="after")
    def _graphs(self) -> ModelJson:
        if not self.files.get("encoder"):
            raise ValueError("files: an encoder graph is required")
        if any(not by_precision for by_precision in self.files.values()):
            raise ValueError("files: every graph listed needs at least one precision")
        if ("classifier" in self.files) != (self.classifier is not None):
            raise ValueError("files.classifier and classifier must be given together")
        if self.classifier is not None:
            want = CLASSIFIER_OUTPUTS if self.classifier.features else CLASSIFIER_OUTPUTS[:1]
            for precision, f in self.files["classifier"].items():
                if [t.name for t in f.outputs] != list(want):
                    raise ValueError(f"files.classifier.{precision}: outputs {[t.name for t in f.outputs]}, "
                                     f"classifier.features {self.classifier.features} needs {list(want)}")
        return self

    def classifier_features_dim(self) -> int | None:
        """The size of the classifier graph's `features` output, None when it has none."""
        if self.classifier is None or not self.classifier.features:
            return None
        return int(next(iter(self.files["classifier"].values())).outputs[1].shape[-1])


@dataclass(frozen=True)
class ModelDir:
    """A checked model directory: the parsed `model.json` and absolute paths to its files."""

    root: Path
    spec: ModelJson

    def has(self, graph: str) -> bool:
        return graph in self.spec.files

    def precisions(self, graph: str) -> list[str]:
        return list(self.spec.files.get(graph, {}))

    def file(self, graph: str, precision: str = "fp32") -> FileSpec:
        if graph not in self.spec.files:
            raise ModelDirError(f"{self.root / MODEL_JSON}: no {graph} graph in this model directory")
        by_precision = self.spec.files[graph]
        if precision not in by_precision:
            raise ModelDirError(f"{self.root / MODEL_JSON}: no {precision} variant of the {graph} graph "
                                f"(available: {', '.join(by_precision)})")
        return by_precision[precision]

    def path(self, graph: str, precision: str = "fp32") -> Path:
        return self.root / self.file(graph, precision).path


def _check_relative(path: str) -> str:
    p = PurePosixPath(path)
    if p.is_absolute() or ".." in p.parts or not p.parts:
        raise ValueError(f"file path {path!r} must be relative to the model directory, without '..'")
    return path


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def make_file_spec(root: str | Path, path: str, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec],
                   external_data: Sequence[str] = ()) -> FileSpec:
    """Describe `root/path` (and its external data files) with sizes and hashes, for `model.json`."""
    root = Path(root)
    return FileSpec(
        path=path, sha256=sha256_file(root / path), bytes=(root / path).stat().st_size,
        external_data=[ExternalDataFile(path=p, sha256=sha256_file(root / p)) for p in external_data],
        inputs=list(inputs), outputs=list(outputs),
    )


def write_model_json(directory: str | Path, spec: ModelJson) -> Path:
    path = Path(directory) / MODEL_JSON
    path.write_text(json.dumps(spec.model_dump(mode="json"), indent=2) + "\n")
    return path


def read_model_json(directory: str | Path) -> ModelJson:
    """Parse and validate `model.json` alone (no file checks)."""
    path = Path(directory) / MODEL_JSON
    if not path.is_file():
        raise ModelDirError(f"{path}: missing (not a model directory; create one with mae-export)")
    try:
        raw: Any = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelDirError(f"{path}: not valid JSON ({e})") from e
    if isinstance(raw, dict) and raw.get("schema_version") != SCHEMA_VERSION:
        raise ModelDirError(f"{path}: schema_version {raw.get('schema_version')!r} is not supported "
                            f"(this server reads {SCHEMA_VERSION})")
    try:
        return ModelJson.model_validate(raw)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(x) for x in err['loc']) or '(root)'}: {err['msg']}"
                             for err in e.errors())
        raise ModelDirError(f"{path}: invalid model.json: {problems}") from e


def load_model_dir(path: str | Path, verify_hashes: bool = True) -> ModelDir:
    """Read `model.json` and check that every declared file exists with its declared size and sha256.

    `verify_hashes=False` skips hashing (seconds for a ViT-H) but still checks presence and size.
    """
    root = Path(path).resolve()
    if not root.is_dir():
        raise ModelDirError(f"{root}: no such model directory")
    spec = read_model_json(root)
    for graph, by_precision in spec.files.items():
        for precision, f in by_precision.items():
            what = f"{graph} ({precision})"
            _check_file(root / f.path, f.sha256, what, f.bytes, verify_hashes)
            for ext in f.external_data:
                _check_file(root / ext.path, ext.sha256, f"external data of {f.path}", None, verify_hashes)
    for what, extra in (("self-check", spec.self_check), ("weights", spec.weights)):
        if extra is not None:
            _check_file(root / extra.path, extra.sha256, what, extra.bytes, verify_hashes)
    return ModelDir(root=root, spec=spec)


def _check_file(path: Path, sha256: str, what: str, size: int | None, verify_hash: bool) -> None:
    if not path.is_file():
        raise ModelDirError(f"{path}: missing ({what} declared in {MODEL_JSON})")
    if size is not None and path.stat().st_size != size:
        raise ModelDirError(f"{path}: size {path.stat().st_size} bytes differs from the {size} declared "
                            f"in {MODEL_JSON} ({what}); the file is corrupt or was replaced")
    if verify_hash:
        actual = sha256_file(path)
        if actual != sha256:
            raise ModelDirError(f"{path}: sha256 {actual} differs from {sha256} declared in {MODEL_JSON} "
                                f"({what}); the file is corrupt or was replaced")


def check_session_io(spec: FileSpec, session: Any) -> None:
    """Compare an ONNX Runtime session's inputs and outputs with the declared ones (names, dtypes, shapes).

    A declared int dim must be that fixed size in the graph; a declared symbolic dim must not be
    fixed in the graph (a batch axis baked in at export would otherwise pass unnoticed).
    """
    for kind, declared, actual in (("input", spec.inputs, session.get_inputs()),
                                   ("output", spec.outputs, session.get_outputs())):
        names = [a.name for a in actual]
        if names != [d.name for d in declared]:
            raise ModelDirError(f"{spec.path}: graph {kind}s are {names}, "
                                f"{MODEL_JSON} declares {[d.name for d in declared]}")
        for d, a in zip(declared, actual, strict=True):
            dtype = ORT_TYPES.get(a.type, a.type)
            if dtype != d.dtype:
                raise ModelDirError(f"{spec.path}: {kind} {d.name!r} has dtype {dtype}, {MODEL_JSON} declares {d.dtype}")
            shape = list(a.shape)
            if len(shape) != len(d.shape):
                raise ModelDirError(f"{spec.path}: {kind} {d.name!r} has rank {len(shape)} {shape}, "
                                    f"{MODEL_JSON} declares {d.shape}")
            for axis, (want, got) in enumerate(zip(d.shape, shape, strict=True)):
                fixed = isinstance(got, int) and got >= 0
                if (isinstance(want, int) and got != want) or (isinstance(want, str) and fixed):
                    raise ModelDirError(f"{spec.path}: {kind} {d.name!r} axis {axis} is {got} in the graph, "
                                        f"{MODEL_JSON} declares {want} (shape {shape} vs {d.shape})")
