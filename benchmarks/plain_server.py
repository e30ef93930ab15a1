"""For scale in `benchmarks/serve.py --plain`: the bare /embed endpoint one writes by hand with FastAPI.

One `async` route that reads the upload, decodes it and makes one ONNX Runtime call inline, on the event
loop, on a session with the default thread settings (every core, spinning), and returns the pooled
embedding as a list of floats through FastAPI's default JSON response. No batching, no queue, no limits,
no thread hand-over: for a lone request, the least a Python server can do. Preprocessing is the service's
own (`service.imaging`), so both do the same decode work.

    MAE_MODEL_DIR=service/default_model .venv/bin/python -m uvicorn benchmarks.plain_server:app --port 8001
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
from fastapi import FastAPI, File, UploadFile

from model_dir.schema import load_model_dir
from service.imaging import load_model_image

model_dir = load_model_dir(Path(os.environ["MAE_MODEL_DIR"]))
spec = model_dir.spec
session = ort.InferenceSession(str(model_dir.path("encoder")), providers=["CPUExecutionProvider"])
ids_keep = np.arange(spec.architecture.num_patches, dtype=np.int64)[None]
app = FastAPI()


@app.get("/health/ready")
def ready() -> dict[str, bool]:
    return {"ready": True}


@app.post("/embed")
async def embed(image: UploadFile = File(...)) -> dict[str, list[float]]:
    pixels = load_model_image(await image.read(), spec.preprocessing, 40_000_000).pixels[None]
    latent = session.run(None, {"pixels": pixels, "ids_keep": ids_keep})[0][0]
    return {"embedding": np.concatenate([latent[0], latent[1:].mean(0)]).tolist()}
