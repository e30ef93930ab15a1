"""The service never imports torch, `model` or `training`: checked in a fresh interpreter that serves a request."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from service_helpers import ROOT

PROBE = """
import sys
from fastapi.testclient import TestClient
import service, service.__main__
from service.app import create_app
from service.settings import Settings
with TestClient(create_app(Settings(model_dir=sys.argv[1]))) as client:
    png = open(sys.argv[2], "rb").read()
    assert client.post("/reconstruct", files={"image": ("x.png", png, "image/png")}).status_code == 200
    assert client.post("/classify", files={"image": ("x.png", png, "image/png")}).status_code == 200
forbidden = sorted(m for m in sys.modules if m.split(".")[0] in {"torch", "model", "training", "torchvision"})
print(forbidden)
sys.exit(1 if forbidden else 0)
"""


def test_serving_imports_no_torch_model_or_training(tiny_model_dir: Path) -> None:
    sample = ROOT / "service" / "samples" / "bag.png"
    done = subprocess.run([sys.executable, "-c", PROBE, str(tiny_model_dir), str(sample)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env={"PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stdout + done.stderr


def test_no_source_file_under_service_imports_torch() -> None:
    """Only an engine module whose file name says torch may, and only a function imports that module."""
    forbidden = re.compile(r"^\s*(import|from)\s+(torch|torchvision|model|training)\b", re.MULTILINE)
    top_level_torch_engine = re.compile(r"^(import|from)\s+service\.engine_torch\b", re.MULTILINE)
    torch_modules = []
    for path in (ROOT / "service").rglob("*.py"):
        if "torch" in path.name:
            torch_modules.append(path.name)
            continue
        assert not forbidden.search(path.read_text()), path
        assert not top_level_torch_engine.search(path.read_text()), f"{path} imports the torch engine at import time"
    assert torch_modules == ["engine_torch.py"]


def test_model_dir_package_imports_neither_side() -> None:
    """The model-directory package sits between the exporter and the server: torch-, onnx-, service-free."""
    forbidden = re.compile(r"^\s*(import|from)\s+(torch|torchvision|onnx|onnxruntime|model|training|service)\b",
                           re.MULTILINE)
    sources = list((ROOT / "model_dir").rglob("*.py"))
    assert sources
    for path in sources:
        assert not forbidden.search(path.read_text()), path


SERVICE_LAYERS = {  # docs/architecture.md "Inside service/": a module imports no module of a higher layer
    "app": 3, "middleware": 3, "handlers": 3, "bulk_embed": 3,
    "native_routes": 2, "openai_routes": 2, "oip_routes": 2,
    "server": 1, "tasks": 1,
    "engine": 0, "engine_onnxruntime": 0, "engine_torch": 0, "batcher": 0, "admission": 0,
}


def test_service_modules_import_no_layer_above_them() -> None:
    """Routes never reach into the app, state and tasks never into routes, engines and batcher into neither;
    tasks know nothing of the server, and the engine interface imports none of its implementations
    (TYPE_CHECKING imports, for annotations only, are allowed)."""
    # at the top of a module or inside a function (an import deferred to a call is an import all the same)
    imports = re.compile(r"^[ \t]*(?:from service\.(\w+) import|from service import ([\w, ]+)|import service\.(\w+))",
                         re.MULTILINE)
    type_checking_block = re.compile(r"^if TYPE_CHECKING:\n(?:(?:[ \t]+.*)?\n)*", re.MULTILINE)
    upward = []
    for name, layer in SERVICE_LAYERS.items():
        source = type_checking_block.sub("", (ROOT / "service" / f"{name}.py").read_text())
        for match in imports.finditer(source):
            for imported in ",".join(g for g in match.groups() if g).replace(" ", "").split(","):
                if SERVICE_LAYERS.get(imported, -1) > layer or (name == "tasks" and imported == "server") or (
                        name == "engine" and imported in ("engine_onnxruntime", "engine_torch")):  # the interface: no circle
                    upward.append(f"{name} imports {imported}")
    assert upward == []
