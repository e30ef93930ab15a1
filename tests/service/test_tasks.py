"""The per-route tasks on their own, without HTTP or queues: prepare -> run_batch -> respond."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydantic import BaseModel
from service_helpers import sample_png

from model_dir.schema import load_model_dir
from service.engine import open_engine
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
    body = EmbedResponse.model_validate_json(written(tasks.embed.respond(embed, tasks.embed.run_batch([image, image]))))
    assert body.dim == 2 * tasks.embed.spec.embedding.dim and len(body.data) == 2
    np.testing.assert_allclose(np.linalg.norm(body.data[0].embedding), 1.0, rtol=1e-5)

    job = tasks.reconstruct.prepare(ReconstructOptions(seed=1, response_format="json"))
    items = [job.payload(image)]
    answer = written(tasks.reconstruct.respond(job, items, tasks.reconstruct.run_batch(items)))
    assert ReconstructResponse.model_validate_json(answer).grid.num_visible == job.key.num_visible

    classify = tasks.classify.prepare(ClassifyOptions(top_k=2))
    labels = ClassifyResponse.model_validate_json(written(tasks.classify.respond(classify, tasks.classify.run_batch([image]))))
    scores = [p.score for p in labels.data[0].predictions]
    assert len(scores) == 2 and scores == sorted(scores, reverse=True)
    with pytest.raises(InvalidOption, match="top_k"):
        tasks.classify.prepare(ClassifyOptions(top_k=len(tasks.classify.labels) + 1))
