"""For benchmarks/soak.py --leak-bytes and its test: the service's app with a handler that leaks on purpose.

One more ASGI middleware keeps `SOAK_LEAK_BYTES` bytes per request in a list that is never emptied, as a
cache without a bound or a list of every request's context would; everything else is the service as it is.
The soak's memory check must fail on it: a check that cannot fail checks nothing.

    SOAK_LEAK_BYTES=20000 .venv/bin/python -m uvicorn --factory benchmarks.soak_leaky_app:create_app
"""

from __future__ import annotations

import os

from starlette.types import ASGIApp, Receive, Scope, Send

from service.app import create_app as create_service_app

KEPT: list[bytearray] = []


class Leak:
    def __init__(self, app: ASGIApp, size: int):
        self.app, self.size = app, size

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            KEPT.append(bytearray(os.urandom(self.size)))  # random bytes: pages that are really touched
        await self.app(scope, receive, send)


def create_app() -> ASGIApp:
    return Leak(create_service_app(), int(os.environ["SOAK_LEAK_BYTES"]))
