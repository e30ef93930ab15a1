"""ASGI middleware around every request: its id, the body limit (and the drain before a 413), timing headers,
request metrics."""

from __future__ import annotations

import asyncio
import itertools
import re
import secrets
import time

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.batcher import BatchTiming
from service.errors import PayloadTooLarge, error_response_for
from service.metrics import Metrics
from service.settings import Settings

_REQUEST_ID = re.compile(r"^[\w.:@/+=-]{1,200}$")
DRAIN_TIMEOUT_S = 60.0  # BodyState.drain: how long an over-limit body is read and discarded before a 413


class BodyState:
    """How much of one request's body the app has read, and the discarding of the rest before a 413.

    Clients such as urllib, requests and httpx write the whole body before they read the response;
    a server that answers 413 and closes with unread data in the socket makes the kernel send a reset,
    and those clients see "connection reset" instead of the envelope. So before a 413 the rest of the
    body is read and thrown away, chunk by chunk (memory does not grow with it), up to a bound in
    bytes and time; past the bound the connection is closed as before. A client that sent
    `Expect: 100-continue` and was never asked to continue (nothing was read) has sent no body.
    """

    def __init__(self, expects_continue: bool):
        self.expects_continue = expects_continue
        self.received = 0
        self.reads = 0
        self.complete = False

    async def receive(self, receive: Receive) -> Message:
        self.reads += 1
        message = await receive()
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            self.complete = not message.get("more_body", False)
        else:  # http.disconnect
            self.complete = True
        return message

    async def drain(self, receive: Receive, max_bytes: int) -> bool:
        """Discard the unread body; False when it could not be read to its end within the bounds."""
        if self.complete or (self.expects_continue and self.reads == 0):
            return True
        start, stop = self.received, time.monotonic() + DRAIN_TIMEOUT_S
        try:
            while not self.complete:
                if self.received - start > max_bytes:
                    return False
                remaining = stop - time.monotonic()
                if remaining <= 0:
                    return False
                await asyncio.wait_for(self.receive(receive), remaining)
        except TimeoutError:
            return False
        return True


class RequestContext:
    """ASGI middleware: request id, body limit, timing headers, request metrics."""

    def __init__(self, app: ASGIApp, *, metrics: Metrics, settings: Settings):
        self.app, self.metrics, self.settings = app, metrics, settings
        # generated ids: a random per-process prefix and a counter, 32 hex digits like a uuid4, unique
        # across workers and restarts without a urandom call per request
        self._id_prefix, self._id_counter = secrets.token_hex(8), itertools.count()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.monotonic()
        headers = dict(scope["headers"])
        given_id = headers.get(b"x-request-id", b"").decode("latin-1")
        request_id = given_id if _REQUEST_ID.match(given_id) else f"{self._id_prefix}{next(self._id_counter):016x}"
        state = scope.setdefault("state", {})
        state.update(t0=t0, timing=None)
        status = 500
        metrics = self.metrics
        limit = self.settings.max_body_bytes

        body = BodyState(headers.get(b"expect", b"").lower() == b"100-continue")

        async def send_with_headers(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                h = MutableHeaders(scope=message)
                if status == 413 and not await body.drain(receive, self.settings.max_drain_bytes):
                    h["Connection"] = "close"
                h["X-Request-ID"] = request_id
                h["X-Total-Time-Ms"] = f"{(time.monotonic() - t0) * 1000:.3f}"
                timing: BatchTiming | None = state.get("timing")
                if timing is not None and timing.batch_sizes:
                    h["X-Queue-Time-Ms"] = f"{timing.queue_s * 1000:.3f}"
                    h["X-Inference-Time-Ms"] = f"{timing.compute_s * 1000:.3f}"
            await send(message)

        async def receive_limited() -> Message:
            message = await body.receive(receive)
            if message["type"] == "http.request" and body.received > limit:
                raise PayloadTooLarge(f"request body over the limit of {limit} bytes")
            return message

        metrics.in_flight.inc()
        try:
            length = headers.get(b"content-length", b"")
            if length.isdigit() and int(length) > limit:
                metrics.rejections.labels(PayloadTooLarge.type).inc()
                response = error_response_for(scope["path"], 413, PayloadTooLarge.type,
                                              f"request body of {int(length)} bytes is over the limit of {limit} bytes")
                await response(scope, receive, send_with_headers)
            else:
                await self.app(scope, receive_limited, send_with_headers)
        finally:
            metrics.in_flight.dec()
            route = scope.get("route")
            label = getattr(route, "path", "unmatched")
            metrics.requests.labels(label, str(status)).inc()
            metrics.request_seconds.labels(label).observe(time.monotonic() - t0)
