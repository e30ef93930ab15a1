"""The error envelope `{"error": {"type", "message"}}`: one exception class per client-visible failure."""

from __future__ import annotations

from service.responses import JSONResponse


class ServiceError(Exception):
    """A failure answered with `status` and the JSON error envelope (and optional headers)."""

    status: int = 500
    type: str = "internal_error"

    def __init__(self, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class InvalidBody(ServiceError):
    status, type = 400, "invalid_body"


class InvalidHeader(ServiceError):
    status, type = 400, "invalid_header"


class InvalidImage(ServiceError):
    status, type = 400, "invalid_image"


class Unauthorized(ServiceError):
    status, type = 401, "unauthorized"


class NotFound(ServiceError):
    status, type = 404, "not_found"


class NotAvailable(ServiceError):
    status, type = 404, "not_available"


class PayloadTooLarge(ServiceError):
    status, type = 413, "payload_too_large"


class UnsupportedMediaType(ServiceError):
    status, type = 415, "unsupported_media_type"


class InvalidOption(ServiceError):
    status, type = 422, "invalid_option"


class FetchFailed(ServiceError):
    """An image URL that was allowed could not be fetched: the remote's status, connection or protocol."""

    status, type = 422, "fetch_failed"


class Overloaded(ServiceError):
    type = "overloaded"

    def __init__(self, message: str, *, status: int, retry_after_s: int):
        super().__init__(message, {"Retry-After": str(retry_after_s)})
        self.status = status


class NotReady(ServiceError):
    status, type = 503, "not_ready"


class Wedged(ServiceError):
    status, type = 503, "wedged"


class DeadlineExceeded(ServiceError):
    status, type = 504, "deadline_exceeded"


class FetchTimeout(ServiceError):
    """An image URL did not answer in full within MAE_URL_TIMEOUT_S or the request's deadline."""

    status, type = 504, "fetch_timeout"


def error_response(status: int, type_: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"type": type_, "message": message}}, status_code=status, headers=headers)


OIP_PREFIX = "/v2"  # the Open Inference Protocol's routes: their errors take that protocol's shape


def oip_error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """The Open Inference Protocol's error: `{"error": "..."}`."""
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def error_response_for(path: str, status: int, type_: str, message: str,
                       headers: dict[str, str] | None = None) -> JSONResponse:
    """An error in the shape of the protocol `path` belongs to: OIP's under /v2, else the envelope."""
    if path == OIP_PREFIX or path.startswith(OIP_PREFIX + "/"):
        return oip_error_response(status, message, headers)
    return error_response(status, type_, message, headers)
