"""Deployment tests: the images built and run (podman), replicas behind nginx, the Kubernetes and KServe files.

They start real servers the way the service tests do, so the service tests' helpers (tests/service/
service_helpers.py: server processes on free ports, sample images, metrics parsing) are importable here too.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "service"))


def build_image(variant: str) -> str:
    """`make image` (cpu) or `make image-gpu`: docker/podman_build.py; the image's name."""
    done = subprocess.run([sys.executable, str(ROOT / "docker" / "podman_build.py"), variant], capture_output=True,
                          text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return f"mae-serve:{variant}"


@pytest.fixture(scope="session")
def cpu_image() -> str:
    """The CPU image, built once per run (podman's layer cache makes a rebuild of unchanged sources quick)."""
    return build_image("cpu")
