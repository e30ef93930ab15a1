"""`mae-serve`: flags (one per Settings field, over `MAE_*` environment variables) -> uvicorn running the app."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import tempfile
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import uvicorn
from pydantic import ValidationError

from model_dir.schema import ModelDirError, load_model_dir
from service import __version__
from service.engine import RuntimeConfigError
from service.metrics import MULTIPROC_DIR_ENV
from service.settings import Settings


def _flag_type(annotation: Any) -> Any:
    origin_args = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Literal:
        return type(origin_args[0])
    if typing.get_origin(annotation) is typing.Annotated:  # comma-separated lists
        return str
    return annotation if annotation in (int, float, str, Path) else str


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mae-serve", description="Serve a Masked Autoencoder model directory over HTTP. "
        "Every flag can also be set as an environment variable: --max-batch-size is MAE_MAX_BATCH_SIZE.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        help_text = f"{field.description or ''} [MAE_{name.upper()}]".strip()
        choices = typing.get_args(field.annotation) if typing.get_origin(field.annotation) is typing.Literal else None
        if field.annotation is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            parser.add_argument(flag, type=_flag_type(field.annotation), choices=choices, default=None,
                                help=help_text)
    return parser


def _env_value(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


@contextlib.contextmanager
def _multiprocess_metrics_dir() -> Iterator[None]:
    """PROMETHEUS_MULTIPROC_DIR for the workers: the operator's (emptied of a previous run's files) or a
    temporary one removed at exit; set before any worker imports prometheus_client."""
    given = os.environ.get(MULTIPROC_DIR_ENV)
    if given:
        Path(given).mkdir(parents=True, exist_ok=True)
        for stale in Path(given).glob("*.db"):
            stale.unlink()
        yield
        return
    with tempfile.TemporaryDirectory(prefix="mae-metrics-") as tmp:
        os.environ[MULTIPROC_DIR_ENV] = tmp
        try:
            yield
        finally:
            del os.environ[MULTIPROC_DIR_ENV]


def cli(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    given = {k: v for k, v in vars(args).items() if v is not None}
    try:
        settings = Settings(**given)
    except ValidationError as e:
        sys.exit(f"mae-serve: error: {e}")
    logging.basicConfig(level=settings.log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
    # python-multipart warns on every malformed form body: a client's 400 (counted in mae_rejections_total),
    # not a server problem, and a client could fill the log with them
    logging.getLogger("python_multipart").setLevel(logging.ERROR)
    common = dict(host=settings.host, port=settings.port, log_level=settings.log_level,
                  timeout_graceful_shutdown=settings.graceful_shutdown_s)
    try:
        if settings.workers == 1:
            from service.app import create_app
            uvicorn.run(create_app(settings), **common)
        else:
            # Each worker process builds its own app (sessions, queues, metrics) from the environment.
            load_model_dir(settings.model_dir, verify_hashes=False)
            for name in Settings.model_fields:
                os.environ[f"MAE_{name.upper()}"] = _env_value(getattr(settings, name))
            with _multiprocess_metrics_dir():
                uvicorn.run("service.app:create_app", factory=True, workers=settings.workers, **common)
    except (ModelDirError, RuntimeConfigError) as e:
        sys.exit(f"mae-serve: error: {e}")


if __name__ == "__main__":
    cli()
