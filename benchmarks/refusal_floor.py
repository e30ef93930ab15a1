"""For benchmarks/overload.py: what uvicorn alone costs per refusal. A bare ASGI app, served by uvicorn as
mae-serve is (httptools, uvloop), that answers every POST with the service's 503 envelope and headers
without reading the body: the floor under the service's refusal cost (its middleware, the app stack).
GET /health/ready and GET /metrics answer as the service's do, for the benchmark's Server helper."""

from __future__ import annotations

from typing import Any

_BODY = (b'{"error":{"type":"overloaded","message":"256 requests are being served and 256 wait; retry later"}}')
_HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(_BODY)).encode()),
            (b"retry-after", b"1"), (b"x-request-id", b"0123456789abcdef0123456789abcdef"),
            (b"x-total-time-ms", b"0.010")]


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    if scope["method"] == "GET":
        body = b"mae_requests_in_flight 0\n" if scope["path"] == "/metrics" else b'{"ready":true}'
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
        return
    await send({"type": "http.response.start", "status": 503, "headers": _HEADERS})
    await send({"type": "http.response.body", "body": _BODY})


def create_app() -> Any:
    return app
