"""Dynamic batching: bounded queues whose workers gather items into batches and run them off the event loop.

Knows nothing about HTTP or models: a queue holds opaque payloads and calls a synchronous
`run_batch(payloads) -> results` in an executor. A caller first *reserves* room (refused at once
when the queue is full), prepares its payloads, then submits them. A batch that already has
company waits up to `max_delay_s` for items whose callers hold a reservation (they are being
prepared right now); a lone item, with nobody else on the way, runs at once. Up to `concurrency`
batches (over all queues of a Batcher) run at the same time, each in its own executor thread:
while one runs, the next one forms from the items that arrive meanwhile, and items waiting when
several slots are free are shared out among them rather than piled into one batch.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Hashable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol


class RunBatch(Protocol):
    """payloads -> one result each; `alone`: no other batch running or waiting (the engine may take every core)."""

    def __call__(self, payloads: list[Any], *, alone: bool) -> Sequence[Any]: ...



class QueueFull(Exception):
    """No room for the request; retry after `retry_after_s` seconds."""

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DeadlineExpired(Exception):
    """The item's deadline passed before its batch ran, or its batch could not have finished by the time the
    client gave; it was not computed."""


class QueueClosed(Exception):
    """The queue is draining for shutdown and takes no new work."""


class BatchObserver:
    """Hooks for metrics; the default does nothing."""

    def batch(self, queue: str, size: int, queue_seconds: list[float]) -> None:
        """A batch of `size` items starts; each waited the given seconds in the queue."""

    def depth(self, queue: str, delta: int) -> None:
        """Items waiting in `queue` changed by `delta`."""

    def expired(self, queue: str, count: int) -> None:
        """`count` items were dropped before compute because their deadline passed (or would have)."""

    def cancelled(self, queue: str, count: int) -> None:
        """`count` items were removed before compute because their request was cancelled (its client left)."""


@dataclass
class BatchTiming:
    """Per request: the longest queue wait and the compute time of the batches its items ran in."""

    queue_s: float = 0.0
    compute_s: float = 0.0
    batch_sizes: list[int] = field(default_factory=list)


@dataclass(eq=False)
class _Item:
    payload: Any
    deadline: float  # time.monotonic(): compute must have started by then
    future: asyncio.Future[Any]
    finish_by: float = math.inf  # the client's own deadline: a batch that cannot end by then is not started
    enqueued: float = 0.0
    running: bool = False
    queue_s: float = 0.0
    compute_s: float = 0.0
    batch_size: int = 0


class Slots:
    """How many batches may run at once, shared by a Batcher's queues; knows how many are free."""

    def __init__(self, count: int):
        self._semaphore = asyncio.Semaphore(count)
        self.count = self.free = count

    async def acquire(self) -> None:
        await self._semaphore.acquire()
        self.free -= 1

    def release(self) -> None:
        self.free += 1
        self._semaphore.release()


class BatchQueue:
    """One queue (one graph and input shape) with one worker task."""

    def __init__(self, name: str, run_batch: RunBatch, executor: Executor, *, max_batch_size: int, max_delay_s: float,
                 max_queue: int, observer: BatchObserver | None = None, slots: Slots | None = None,
                 inline_max_s: float = 0.0, share_idle_slots: bool = True):
        self.name, self.run_batch, self.executor = name, run_batch, executor
        self.share_idle_slots = share_idle_slots  # see _worker
        self.max_batch_size, self.max_delay_s, self.max_queue = max_batch_size, max_delay_s, max_queue
        self.inline_max_s = inline_max_s  # see _inline
        self.observer = observer or BatchObserver()
        self.slots = slots or Slots(1)
        self.pending: deque[_Item] = deque()
        self.reserved = 0  # items promised by callers that are still preparing them
        self.closed = False
        self._wakeup = asyncio.Event()
        self._batch_seconds = 0.0  # moving average, for Retry-After and the liveness check
        self._seconds_by_size: dict[int, float] = {}  # moving average by batch size: will a batch end in time?
        self._running: set[asyncio.Task[None]] = set()
        self._started: dict[int, float] = {}  # the running batches' start times (monotonic), by id
        self._task = asyncio.get_running_loop().create_task(self._worker(), name=f"batcher:{name}")

    # -- callers ---------------------------------------------------------------------------------------

    def reserve(self, count: int) -> Reservation:
        """Room for `count` items, or QueueFull at once (nothing is prepared for a refused request)."""
        if self.closed:
            raise QueueClosed(f"the {self.name} queue is shutting down")
        waiting = self.reserved + len(self.pending)
        if waiting and waiting + count > self.max_queue:  # an empty queue takes any request
            raise QueueFull(f"the {self.name} queue is full ({self.max_queue} images waiting)", self.retry_after())
        self.reserved += count
        return Reservation(self, count)

    def retry_after(self) -> int:
        """Whole seconds until the current backlog should have run, at least 1."""
        batches = (self.reserved + len(self.pending)) / self.max_batch_size
        return max(1, math.ceil(batches * self._batch_seconds))

    async def _submit(self, payloads: Sequence[Any], deadline: float, timing: BatchTiming,
                      finish_by: float = math.inf) -> list[Any]:
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        if min(deadline, finish_by) <= now:
            raise DeadlineExpired("the request's deadline passed before it was queued")
        items = [_Item(payload=p, deadline=deadline, future=loop.create_future(), enqueued=now, finish_by=finish_by)
                 for p in payloads]
        self.pending.extend(items)
        self.observer.depth(self.name, len(items))
        self._wakeup.set()
        # one deadline timer per request (wait_for over a shielded gather cost three times as much)
        timer = loop.call_later(min(deadline, finish_by) - now, self._expire, items)
        try:
            results = [await items[0].future] if len(items) == 1 else await asyncio.gather(*(i.future for i in items))
        except asyncio.CancelledError:  # the request was cancelled (its client left): what has not started never will
            self.observer.cancelled(self.name, len(self._drop(items, None)))
            raise
        finally:
            timer.cancel()
        timing.queue_s = max(timing.queue_s, max(i.queue_s for i in items))
        timing.compute_s = max(timing.compute_s, max(i.compute_s for i in items))
        timing.batch_sizes.extend(sorted({i.batch_size for i in items}))
        return results

    def _expire(self, items: list[_Item]) -> None:
        """A request's deadline: the items not yet running are dropped, and fail it at once; when every
        item already runs, the answer is on its way and the request waits for it."""
        dropped = self._drop(items, DeadlineExpired("the request's deadline passed while it waited in the queue"))
        if dropped:
            self.observer.expired(self.name, len(dropped))

    def _drop(self, items: list[_Item], error: Exception | None) -> list[_Item]:
        """Take the items that are not running out of the queue, failing them with `error` (None: they were
        cancelled); a failed or cancelled future also keeps an item out of a batch that is still forming."""
        dropped = [i for i in items if not i.running and (not i.future.done() or (error is None and i.future.cancelled()))]
        for item in dropped:
            if error is None:
                item.future.cancel()
            elif not item.future.done():
                item.future.set_exception(error)
            if item in self.pending:
                self.pending.remove(item)
                self.observer.depth(self.name, -1)
        return dropped

    # -- worker ----------------------------------------------------------------------------------------

    def _take(self, batch: list[_Item], now: float, limit: int) -> None:
        while self.pending and len(batch) < limit:
            item = self.pending.popleft()
            self.observer.depth(self.name, -1)
            if item.future.done():  # its request was cancelled: nothing to compute
                continue
            if item.deadline <= now:
                self.observer.expired(self.name, 1)
                item.future.set_exception(DeadlineExpired("the request's deadline passed before its batch ran"))
            else:
                batch.append(item)

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self.pending:
                if self.closed and not self.reserved:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
            await self.slots.acquire()  # items keep arriving while every slot is busy: the batch grows
            limit = self.max_batch_size
            if self.share_idle_slots and self.slots.free:  # share the waiting items (and those on their way) out
                # among the idle slots: on a CPU two half batches side by side finish sooner than one full batch
                # next to an idle slot (a GPU computes one batch at a time, and a full one best)
                waiting = len(self.pending) + self.reserved
                limit = min(limit, max(1, math.ceil(waiting / (self.slots.free + 1))))
            batch: list[_Item] = []
            self._take(batch, time.monotonic(), limit)
            if batch and self.max_delay_s > 0:
                window_end = batch[0].enqueued + self.max_delay_s
                # Wait only for items that are known to be on their way; never for a lone request.
                while len(batch) < limit and self.reserved and time.monotonic() < window_end:
                    self._wakeup.clear()
                    try:
                        await asyncio.wait_for(self._wakeup.wait(), timeout=window_end - time.monotonic())
                    except TimeoutError:
                        break
                    self._take(batch, time.monotonic(), limit)
            batch = self._in_time(batch)
            if not batch:
                self.slots.release()
                continue
            task = loop.create_task(self._run(batch), name=f"batch:{self.name}")
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    def _in_time(self, batch: list[_Item]) -> list[_Item]:
        """The formed batch less its items that expired or were cancelled while it formed, and less those whose
        client deadline falls before the batch could end (by the average of batches this size): computing them
        would take the cores from requests that can still be answered."""
        batch = [i for i in batch if not i.future.done()]
        ends = time.monotonic() + self._seconds_by_size.get(len(batch), self._batch_seconds)
        late = [i for i in batch if i.finish_by < ends]
        if not late:
            return batch
        for item in late:
            item.future.set_exception(DeadlineExpired("its batch could not have finished by the request's deadline"))
        self.observer.expired(self.name, len(late))
        return [i for i in batch if not i.future.done()]

    async def _run(self, batch: list[_Item]) -> None:
        """One batch in the executor; its results (or its error) go to its items' futures. Frees the slot."""
        start = time.monotonic()
        self._started[id(batch)] = start
        try:
            for item in batch:
                item.running = True
                item.queue_s = start - item.enqueued
                item.batch_size = len(batch)
            self.observer.batch(self.name, len(batch), [i.queue_s for i in batch])
            # alone: the only batch running (of every queue sharing the slots) and nothing waiting here
            alone = self.slots.free == self.slots.count - 1 and not self.pending and not self.reserved
            try:
                if alone and self._inline(len(batch)):
                    results = self.run_batch([i.payload for i in batch], alone=True)
                else:
                    results = await asyncio.get_running_loop().run_in_executor(
                        self.executor, partial(self.run_batch, [i.payload for i in batch], alone=alone))
            except Exception as e:  # a failed batch fails its requests, not the worker
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(e)
                return
            elapsed = time.monotonic() - start
            self._batch_seconds = moving_average(self._batch_seconds, elapsed)
            self._seconds_by_size[len(batch)] = moving_average(self._seconds_by_size.get(len(batch), 0.0), elapsed)
            for item, result in zip(batch, results, strict=True):
                item.compute_s = elapsed
                if not item.future.done():
                    item.future.set_result(result)
        finally:
            del self._started[id(batch)]
            self.slots.release()

    def _inline(self, size: int) -> bool:
        """Whether a lone batch of `size` runs on the event loop's thread rather than in the executor: when batches
        that size have taken at most `inline_max_s` on average. The hand-over to a pool thread and back cost a
        lone request of the bundled model about 0.1 ms (of 2); the loop waits meanwhile, which the bound keeps
        short, and nothing else was waiting (a lone batch), so nothing waits behind it but what arrives."""
        return 0.0 < self._seconds_by_size.get(size, 0.0) <= self.inline_max_s

    def overrunning(self, now: float, min_s: float, factor: float) -> str | None:
        """The oldest running batch, when it has run longer than `min_s` and than `factor` times this queue's
        average batch: what it looks like when the engine is wedged; or a worker that died while the queue was
        open (nothing would ever run again). None otherwise."""
        if self._task.done() and not self.closed:
            error = None if self._task.cancelled() else self._task.exception()
            return f"the {self.name} queue's worker has stopped ({error!r})"
        if not self._started:
            return None
        age, limit = now - min(self._started.values()), max(min_s, factor * self._batch_seconds)
        if age <= limit:
            return None
        return (f"a batch of the {self.name} queue has run for {age:.1f} s (limit {limit:.1f} s: {factor:g} times "
                f"its average batch of {self._batch_seconds:.3f} s, at least {min_s:g} s)")

    async def close(self) -> None:
        """Take no new reservations, finish everything accepted, then stop the worker."""
        self.closed = True
        self._wakeup.set()
        await asyncio.wait([self._task])  # a worker that died (the liveness check reports it) does not stop the rest
        await asyncio.gather(*self._running)


def moving_average(average: float, sample: float, weight: float = 0.2) -> float:
    """An exponential moving average, `sample` taken with `weight` (an average of 0: no sample yet)."""
    return sample if not average else (1 - weight) * average + weight * sample


class Reservation:
    """Room held in a queue for a request's items while the caller prepares them."""

    def __init__(self, queue: BatchQueue, count: int):
        self.queue, self.count, self.open = queue, count, True

    def release(self) -> None:
        if self.open:
            self.open = False
            self.queue.reserved -= self.count
            self.queue._wakeup.set()  # a batch waiting for these items should stop waiting

    async def submit(self, payloads: Sequence[Any], deadline: float, timing: BatchTiming,
                     finish_by: float = math.inf) -> list[Any]:
        """Queue the prepared payloads and wait for their results (DeadlineExpired when too late): compute must
        start by `deadline` and, by the queue's average batch, be able to end by `finish_by`. Cancelling the
        caller takes its items that have not started out of the queue."""
        if len(payloads) != self.count:
            raise ValueError(f"reserved {self.count} items, submitted {len(payloads)}")
        self.release()  # and enqueue in the same step of the event loop: the worker sees both at once
        return await self.queue._submit(payloads, deadline, timing, finish_by)

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class Batcher:
    """The queues of one server, created on first use by key (any hashable value: the server's is a
    `tasks.QueueKey`, graphs and K); `label` names a queue in the observer's metrics."""

    def __init__(self, executor: Executor, *, max_batch_size: int, max_delay_s: float, max_queue: int,
                 observer: BatchObserver | None = None, concurrency: int = 1, inline_max_s: float = 0.0,
                 share_idle_slots: bool = True):
        self.executor, self.inline_max_s, self.share_idle_slots = executor, inline_max_s, share_idle_slots
        self.max_batch_size, self.max_delay_s, self.max_queue = max_batch_size, max_delay_s, max_queue
        self.observer = observer
        self.slots = Slots(concurrency)  # the executor should have at least this many threads
        self.queues: dict[Hashable, BatchQueue] = {}
        self.closed = False

    def queue(self, key: Hashable, run_batch: RunBatch, *, label: str | None = None) -> BatchQueue:
        if key not in self.queues:
            if self.closed:
                raise QueueClosed("the server is shutting down")
            self.queues[key] = BatchQueue(label or str(key), run_batch, self.executor,
                                          max_batch_size=self.max_batch_size, max_delay_s=self.max_delay_s,
                                          max_queue=self.max_queue, observer=self.observer, slots=self.slots,
                                          inline_max_s=self.inline_max_s, share_idle_slots=self.share_idle_slots)
        return self.queues[key]

    def wedged(self, min_s: float, factor: float) -> str | None:
        """Why inference looks wedged (a batch far past its expected time, see BatchQueue.overrunning), or None."""
        now = time.monotonic()
        return next((why for q in list(self.queues.values()) if (why := q.overrunning(now, min_s, factor))), None)

    async def close(self) -> None:
        self.closed = True
        await asyncio.gather(*(q.close() for q in self.queues.values()))
