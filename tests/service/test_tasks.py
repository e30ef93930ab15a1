"""The per-route tasks on their own, without HTTP or queues: job -> run_batch -> result -> respond / arrays."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydantic import BaseModel
from service_helpers import sample_png

from model_dir.schema import load_model_dir
from service.errors import InvalidOption
from service.imaging import load_model_image
from service.responses import JSONResponse
from service.schemas import (
    ClassifyOptions,
    ClassifyResponse,
    EmbedOptions,
    EmbedResponse,
    ReconstructOptions,
    ReconstructResponse,
)
from service.server import open_engine
from service.tasks import QueueKey, Tasks


@pytest.fixture(scope="module")
def tasks(tiny_model_dir: Path) -> Tasks:
    from service.settings import Settings

    model_dir = load_model_dir(tiny_model_dir)
    return Tasks.open(model_dir=model_dir, engine=open_engine(model_dir, Settings(model_dir=tiny_model_dir)))


def test_reconstruct_prepare_is_the_one_check_of_the_visible_patches(tasks: Tasks) -> None:
    task = tasks.reconstruct
    num_patches = task.spec.architecture.num_patches
    job = task.prepare(ReconstructOptions(mask_ratio=0.5, seed=3))
    assert job.key == QueueKey("encoder+decoder", int(num_patches * 0.5)) and job.seed == 3
    assert int(job.masking.mask.sum()) == num_patches - job.key.num_visible
    assert task.prepare(ReconstructOptions(mask_ratio=0.5, seed=3)).key == job.key  # a value: one queue per K
    with pytest.raises(InvalidOption, match="leaves no visible patch"):
        task.prepare(ReconstructOptions(mask_ratio=0.99))


def written(model: BaseModel) -> bytes:
    """The body a route sends for a task's response model."""
    return bytes(JSONResponse(model).body)


def test_each_task_responds_with_its_documented_model(tasks: Tasks) -> None:
    """The response models are built without validation (model_construct); what goes out still validates."""
    image = load_model_image(sample_png(), tasks.embed.spec.preprocessing, 10**7)
    embed = tasks.embed.prepare(EmbedOptions(pooling="cls+mean"))
    result = tasks.embed.result(embed, [image, image], tasks.embed.run_batch([image, image]))
    body = EmbedResponse.model_validate_json(written(tasks.embed.respond(result)))
    assert body.dim == 2 * tasks.embed.spec.embedding.dim and len(body.data) == 2
    np.testing.assert_allclose(np.linalg.norm(body.data[0].embedding), 1.0, rtol=1e-5)

    job = tasks.reconstruct.prepare(ReconstructOptions(seed=1, response_format="json"))
    items = [job.payload(image)]
    answer = written(tasks.reconstruct.respond(tasks.reconstruct.result(job, items, tasks.reconstruct.run_batch(items))))
    assert ReconstructResponse.model_validate_json(answer).grid.num_visible == job.key.num_visible

    classify = tasks.classify.prepare(ClassifyOptions(top_k=2))
    result = tasks.classify.result(classify, [image], tasks.classify.run_batch([image]))
    labels = ClassifyResponse.model_validate_json(written(tasks.classify.respond(result)))
    scores = [p.score for p in labels.data[0].predictions]
    assert len(scores) == 2 and scores == sorted(scores, reverse=True)
    with pytest.raises(InvalidOption, match="top_k"):
        tasks.classify.prepare(ClassifyOptions(top_k=len(tasks.classify.labels) + 1))


@pytest.mark.parametrize("name", ["embed", "reconstruct", "classify"])
def test_arrays_are_what_the_specs_declare(tasks: Tasks, name: str) -> None:
    """Every task's named arrays have the names, datatypes and shapes its array_specs declare (-1: any)."""
    task = tasks.named(name)
    image = load_model_image(sample_png(), task.spec.preprocessing, 10**7)
    job = task.job({})
    payloads = [job.payload(image)] * 2
    arrays = task.arrays(task.result(job, payloads, task.run_batch(payloads))).outputs
    specs = task.array_specs()
    assert list(arrays) == [s.name for s in specs]
    datatypes = {"FP32": np.float32, "UINT8": np.uint8, "INT64": np.int64, "BYTES": object}
    for spec in specs:
        array = arrays[spec.name]
        assert array.dtype == datatypes[spec.datatype] and array.ndim == len(spec.shape), spec
        assert all(want in (-1, got) for want, got in zip(spec.shape, array.shape, strict=True)), (spec, array.shape)
        assert array.shape[0] == 2


def test_job_is_one_check_of_the_options_whatever_the_protocol(tasks: Tasks) -> None:
    """`job` validates raw options with the task's options model; what a protocol does not offer is named."""
    assert tasks.embed.job({"pooling": "cls", "normalize": "false"}).pooling == "cls"  # strings, as forms send them
    with pytest.raises(InvalidOption, match="pooling"):
        tasks.embed.job({"pooling": "max"})
    with pytest.raises(InvalidOption, match="unknown"):
        tasks.embed.job({"unknown": 1})
    with pytest.raises(InvalidOption, match=r"encoding_format: not an option here \(the options here: source, "
                       r"pooling, normalize\)"):
        tasks.embed.job({"encoding_format": "float"}, absent=("encoding_format",))
    assert tasks.classify.job({}, absent=("top_k",), fixed={"top_k": 1}).top_k == 1
