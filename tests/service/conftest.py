"""Service fixtures: the tiny exported model as an in-process client, and an encoder-only copy of it."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from service_helpers import make_client


@pytest.fixture(scope="session")
def encoder_only_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model without decoder and classifier (as an encoder-only checkpoint would export), fp32 only."""
    out = tmp_path_factory.mktemp("encoder-only")
    spec = json.loads((tiny_model_dir / "model.json").read_text())
    spec["files"] = {"encoder": {"fp32": spec["files"]["encoder"]["fp32"]}}
    spec["classifier"] = None
    spec["weights"] = None  # as an encoder-only checkpoint's export would hold other weights: the torch engine recovers
    for f in [*spec["files"]["encoder"].values(), spec["self_check"]]:
        shutil.copy(tiny_model_dir / f["path"], out / f["path"])
    (out / "model.json").write_text(json.dumps(spec))
    return out


@pytest.fixture(scope="module")
def client(tiny_model_dir: Path) -> Iterator[TestClient]:
    with make_client(tiny_model_dir) as c:
        yield c
