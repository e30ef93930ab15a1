"""Deployment tests: the images built and run (podman), replicas behind nginx, the Kubernetes and KServe files.

They start real servers the way the service tests do, so the service tests' helpers (tests/service/
service_helpers.py: server processes on free ports, sample images, metrics parsing) are importable here too.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "service"))
