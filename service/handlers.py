"""What stands around every route: the API-key check and the exception handlers, which give every error
its protocol's shape (`errors.error_response_for`) and count the client errors by type."""

from __future__ import annotations

import hmac
import logging
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.errors import ServiceError, Unauthorized, error_response_for
from service.inputs import describe_validation_errors
from service.metrics import Metrics
from service.responses import JSONResponse

log = logging.getLogger("service")


def auth_dependencies(keys: list[str]) -> list[Any]:
    """The route dependencies that check `Authorization: Bearer <key>`; none when no keys are configured
    (an open server neither pays for the check nor advertises a security scheme)."""
    if not keys:
        return []
    bearer = HTTPBearer(auto_error=False, description="one of MAE_API_KEYS")
    encoded = [k.encode() for k in keys]

    async def check(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        given = credentials.credentials.encode() if credentials else b""
        if not any(hmac.compare_digest(given, key) for key in encoded):
            raise Unauthorized("missing or wrong API key: send 'Authorization: Bearer <key>'",
                               {"WWW-Authenticate": "Bearer"})

    return [Depends(check)]


def install_error_handlers(app: FastAPI, metrics: Metrics) -> None:
    """Every error leaves in its protocol's shape; client errors are counted by type, a 500 is logged."""

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> JSONResponse:
        metrics.rejected(exc.type)
        return error_response_for(request.url.path, exc.status, exc.type, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        metrics.rejected("invalid_option")
        return error_response_for(request.url.path, 422, "invalid_option", describe_validation_errors(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response_for(request.url.path, exc.status_code, kind, str(exc.detail), dict(exc.headers or {}))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s", request.url.path)
        return error_response_for(request.url.path, 500, "internal_error", "internal server error (a bug): see the server log")
