"""ASGI middleware around every request: its id, the body limit (and the drain before a 413), timing headers,
request metrics; for inference requests also admission (see `service.admission`), the X-Request-Timeout
deadline, and cancellation when the client disconnects."""

from __future__ import annotations

import asyncio
import itertools
import math
import re
import secrets
import time

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.admission import Admission, Refused, WaitExpired
from service.batcher import BatchTiming
from service.errors import (
    DeadlineExceeded,
    InvalidHeader,
    Overloaded,
    PayloadTooLarge,
    ServiceError,
    error_response_for,
)
from service.metrics import Metrics
from service.settings import Settings

_REQUEST_ID = re.compile(r"^[\w.:@/+=-]{1,200}$")
DRAIN_TIMEOUT_S = 60.0  # BodyState.drain: how long an over-limit body is read and discarded before a 413
# the routes that compute (POST): admitted, given deadlines, cancelled when their client leaves
_INFERENCE = re.compile(r"^/(?:embed|reconstruct|classify|search|v1/embeddings|v2/models/[^/]+(?:/versions/[^/]+)?/infer)$")
CLIENT_CLOSED = 499  # the status recorded (never sent) for a request whose client left before its answer


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


class Disconnect:
    """Cancels the request's task when its client disconnects after the body was read and before the response
    started, so that its images leave the queue uncomputed. The watch is one task waiting on `receive`
    (whose next message, once the body is complete, can only be `http.disconnect`); a later `receive`
    by the app gets the same message. (A client that left before its body was read ends the request at
    that read.)"""

    def __init__(self, receive: Receive):
        self.receive = receive
        self.task = asyncio.current_task()
        self.watcher: asyncio.Task[Message] | None = None
        self.responded = self.happened = False

    def start(self) -> None:
        self.watcher = asyncio.get_running_loop().create_task(self.receive())
        self.watcher.add_done_callback(self._done)

    def _done(self, watcher: asyncio.Task[Message]) -> None:
        if self.responded or watcher.cancelled() or watcher.exception() is not None:
            return
        if watcher.result()["type"] == "http.disconnect" and self.task is not None:
            self.happened = True
            self.task.cancel()

    def stop(self) -> None:
        if self.watcher is not None and not self.watcher.done():
            self.watcher.cancel()


def client_deadline(headers: dict[bytes, bytes], t0: float, cap_s: float) -> float:
    """When the client wants its answer by (time.monotonic()): t0 plus its X-Request-Timeout in seconds, at
    most `cap_s`; infinity without the header. InvalidHeader when it is not a positive number."""
    given = headers.get(b"x-request-timeout")
    if given is None:
        return math.inf
    try:
        seconds = float(given)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds <= 0:
        raise InvalidHeader(f"X-Request-Timeout must be a positive number of seconds, got {given.decode('latin-1')!r}")
    return t0 + min(seconds, cap_s)


class RequestContext:
    """ASGI middleware: request id, body limit, timing headers, request metrics."""

    def __init__(self, app: ASGIApp, *, metrics: Metrics, settings: Settings):
        self.app, self.metrics, self.settings = app, metrics, settings
        self.admission = Admission(settings.max_queue, settings.max_waiting,
                                   max_retry_after_s=settings.request_timeout_s,
                                   on_waiting=metrics.admission_waiting.inc)
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
                await self._refuse(PayloadTooLarge(f"request body of {int(length)} bytes is over the limit of {limit} "
                                                   "bytes"), scope, receive, send_with_headers)
            elif scope["method"] == "POST" and _INFERENCE.match(scope["path"]):
                if await self._inference(scope, receive_limited, send_with_headers, receive, headers, body):
                    status = CLIENT_CLOSED
            else:
                await self.app(scope, receive_limited, send_with_headers)
        finally:
            metrics.in_flight.dec()
            route = scope.get("route")
            label = getattr(route, "path", "unmatched")
            metrics.request_done(label, status, time.monotonic() - t0)

    async def _refuse(self, error: ServiceError, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer `error` here, before the app (and the body) is touched; counted like the app's refusals."""
        self.metrics.rejected(error.type)
        response = error_response_for(scope["path"], error.status, error.type, error.message, error.headers)
        await response(scope, receive, send)

    async def _inference(self, scope: Scope, receive_limited: Receive, send: Send, receive: Receive,
                         headers: dict[bytes, bytes], body: BodyState) -> bool:
        """An inference request: its deadlines, admission (or a refusal, the body unread), then the app with a
        watch for the client's disconnect. True when the client left before its answer and the request was
        cancelled."""
        state, s = scope["state"], self.settings
        try:
            state.update(deadline=state["t0"] + s.request_timeout_s,
                         finish_by=client_deadline(headers, state["t0"], s.request_timeout_s))
            await self.admission.enter(min(state["deadline"], state["finish_by"]))
        except InvalidHeader as e:
            await self._refuse(e, scope, receive, send)
            return False
        except Refused as e:
            await self._refuse(Overloaded(f"{e}; retry later", status=s.queue_full_status,
                                          retry_after_s=e.retry_after_s), scope, receive, send)
            return False
        except WaitExpired as e:
            await self._refuse(DeadlineExceeded(f"{e} (request timeout {s.request_timeout_s} s)"), scope, receive, send)
            return False
        disconnect = Disconnect(receive)

        async def receive_watched() -> Message:
            if disconnect.watcher is not None:
                return await asyncio.shield(disconnect.watcher)
            message = await receive_limited()
            if message["type"] == "http.disconnect":  # the client left before its body was read (while it waited)
                disconnect.happened = True
                raise asyncio.CancelledError
            if body.complete:
                disconnect.start()
            return message

        async def send_watched(message: Message) -> None:
            disconnect.responded = True
            await send(message)

        try:
            await self.app(scope, receive_watched, send_watched)
        except asyncio.CancelledError:
            if not disconnect.happened:
                raise
            if disconnect.task is not None and disconnect.task.cancelling():
                disconnect.task.uncancel()
            return True
        finally:
            disconnect.stop()
            self.admission.exit()
        return False
