"""The app factory: `create_app(settings)` wires the server state, middleware, API-key check, error handlers
and the three route modules (native, OpenAI-style, Open Inference Protocol v2) into one FastAPI app.

Raises ModelDirError or RuntimeConfigError at once when the model cannot be served (see `Server`).
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

from fastapi import FastAPI
from fastapi import __version__ as fastapi_version
from fastapi.middleware.cors import CORSMiddleware
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline

from service import __version__, native_routes, oip_routes, openai_routes
from service.handlers import auth_dependencies, install_error_handlers
from service.middleware import RequestContext
from service.responses import JSONResponse
from service.server import Server
from service.settings import Settings

log = logging.getLogger("service")

_FASTAPI_HAS_TELEMETRY = "telemetry" in inspect.signature(FastAPI.__init__).parameters


def create_app(settings: Settings | None = None) -> FastAPI:
    """The app for one process; raises ModelDirError or RuntimeConfigError when the model cannot be served."""
    settings = settings or Settings()
    server = Server(settings)
    # FastAPIOffline: FastAPI whose /docs and /redoc load their scripts from this server, not a CDN
    app = FastAPIOffline(title="MAE service", version=__version__, lifespan=server.lifespan,
                         default_response_class=JSONResponse, **_telemetry(settings),
                         description="Embeddings, reconstructions and labels from a Masked Autoencoder (ONNX Runtime).")
    app.state.server = server
    install_error_handlers(app, server.metrics)
    app.add_middleware(RequestContext, metrics=server.metrics, settings=settings)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type", "X-Request-ID",
                                          "Inference-Header-Content-Length"],
                           expose_headers=["X-Request-ID", "X-Queue-Time-Ms", "X-Inference-Time-Ms",
                                           "X-Total-Time-Ms", "X-Seed", "Retry-After",
                                           "Inference-Header-Content-Length"])
    auth = auth_dependencies(settings.api_keys)
    app.include_router(native_routes.router, dependencies=auth)
    app.include_router(native_routes.open_router)
    app.include_router(openai_routes.router, dependencies=auth)
    app.include_router(oip_routes.health_router)
    app.include_router(oip_routes.router, dependencies=auth)
    app.mount("/static", StaticFiles(directory=native_routes.STATIC_DIR), name="static")
    if native_routes.SAMPLES_DIR.is_dir():
        app.mount("/samples", StaticFiles(directory=native_routes.SAMPLES_DIR), name="samples")
    return app


def _telemetry(settings: Settings) -> dict[str, Any]:
    """FastAPI's own OpenTelemetry (0.165+) is on by default, with a provider check on every request: off unless asked."""
    if not _FASTAPI_HAS_TELEMETRY:
        if settings.opentelemetry:
            log.warning("opentelemetry is on, but FastAPI %s has no native OpenTelemetry (0.165+): no spans", fastapi_version)
        return {}
    if settings.opentelemetry:
        return {}
    return {"telemetry": {"tracing": False, "metrics": False, "logs": False}}
