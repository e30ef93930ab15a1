"""Admission: how many inference requests are inside the server at once, and what the others do meanwhile.

At most `limit` inference requests are admitted (their bodies being read, their images decoded,
queued or computed). The next ones wait, first come first served, *before their bodies are read*:
a waiting request costs no CPU, only its connection and the bytes the HTTP server has buffered for
it. Past `max_waiting` waiting requests a new one is refused at once (the caller answers 503 or 429
with Retry-After, still without reading the body); a waiting request whose deadline passes is
answered 504.

Why wait rather than refuse: a client refused at once sends again at once (load generators,
retry loops without backoff), and each refusal costs the HTTP parsing and the response, CPU taken
from the requests being computed; under such a storm a server that refuses early serves a
fraction of its capacity. A bounded wait keeps every core on admitted work and still bounds the
latency (the wait list drains in `(limit + max_waiting) / throughput` seconds), and the deadline
stops a request from being started after its client has given up. First come first served, not
LIFO: LIFO keeps the newest requests fast under a sustained overload but starves the oldest ones,
and with a deadline per request FIFO already drops what would be served too late.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable

from service.batcher import moving_average

MAX_GAP_S = 1.0  # Admission.exit: a pause longer than this between completions is idleness, not service time


class Refused(Exception):
    """The wait list is full; retry after `retry_after_s` seconds."""

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class WaitExpired(Exception):
    """The request's deadline passed while it waited to be admitted."""


class Admission:
    """A limit on admitted requests with a bounded first-come-first-served wait list (see the module)."""

    def __init__(self, limit: int, max_waiting: int, *, max_retry_after_s: float = 30.0,
                 on_waiting: Callable[[int], None] = lambda delta: None):
        """`on_waiting(delta)`: the wait list grew or shrank by `delta` (a gauge)."""
        self.limit, self.max_waiting, self.max_retry_after_s = limit, max_waiting, max_retry_after_s
        self.on_waiting = on_waiting
        self.active = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._gap = 0.0  # moving average of the seconds between two completions: 1 / throughput under load
        self._last_exit = 0.0

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def enter(self, deadline: float) -> None:
        """Admit the request now, or once a slot frees; Refused when the wait list is full, WaitExpired when
        `deadline` (time.monotonic()) passes first. Every successful enter is paired with one exit."""
        if self.active < self.limit and not self._waiters:
            self.active += 1
            return
        if len(self._waiters) >= self.max_waiting:
            raise Refused(f"{self.active} requests are being served and {len(self._waiters)} wait",
                          self.retry_after())
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiters.append(waiter)
        self.on_waiting(1)
        timer = loop.call_later(max(0.0, deadline - time.monotonic()), self._expire, waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self.exit()  # the slot was handed over just as the request was cancelled: pass it on
            raise
        finally:
            timer.cancel()
            if not waiter.done() or waiter.cancelled():
                self._forget(waiter)

    def exit(self) -> None:
        """The admitted request is done: its slot goes to the first waiting request, or is freed."""
        now = time.monotonic()
        if self._last_exit:
            self._gap = moving_average(self._gap, min(now - self._last_exit, MAX_GAP_S), 0.1)
        self._last_exit = now
        while self._waiters:
            waiter = self._waiters.popleft()
            self.on_waiting(-1)
            if not waiter.done():
                waiter.set_result(None)  # the slot passes to it: `active` stays
                return
        self.active -= 1

    def retry_after(self) -> int:
        """Whole seconds until the requests inside and waiting should have been served, at the recent rate of
        completions: at least 1, at most max_retry_after_s."""
        seconds = (self.active + len(self._waiters)) * self._gap
        return max(1, min(math.ceil(seconds), math.ceil(self.max_retry_after_s)))

    def _expire(self, waiter: asyncio.Future[None]) -> None:
        if not waiter.done():
            waiter.set_exception(WaitExpired("the request's deadline passed while it waited to be admitted"))
            self._forget(waiter)

    def _forget(self, waiter: asyncio.Future[None]) -> None:
        try:
            self._waiters.remove(waiter)
        except ValueError:
            return
        self.on_waiting(-1)
