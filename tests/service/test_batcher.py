"""The batcher alone (no HTTP, no model): lone requests run at once, company is waited for, limits hold."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from service.batcher import Batcher, BatchQueue, BatchTiming, DeadlineExpired, QueueClosed, QueueFull


def run(coro):
    return asyncio.run(coro)


def make_queue(calls: list[list[int]], gate: threading.Event | None = None, alone_flags: list[bool] | None = None,
               **kwargs) -> tuple[Batcher, BatchQueue]:
    """A batcher with one queue whose batch function doubles its inputs and records each call (and
    whether it ran alone); with a `gate`, every batch waits until the gate is set."""
    options = {"max_batch_size": 8, "max_delay_s": 0.5, "max_queue": 16, **kwargs}

    def double(payloads: list[int], *, alone: bool) -> list[int]:
        calls.append(list(payloads))
        if alone_flags is not None:
            alone_flags.append(alone)
        if gate is not None:
            gate.wait(5)
        return [2 * p for p in payloads]

    batcher = Batcher(ThreadPoolExecutor(options.get("concurrency", 1)), **options)
    return batcher, batcher.queue("q", double)


def test_a_lone_request_does_not_wait_for_the_window() -> None:
    calls: list[list[int]] = []

    async def scenario() -> float:
        batcher, queue = make_queue(calls)
        start = time.monotonic()
        with queue.reserve(1) as r:
            assert await r.submit([21], time.monotonic() + 5, BatchTiming()) == [42]
        elapsed = time.monotonic() - start
        await batcher.close()
        return elapsed

    assert run(scenario()) < 0.25  # the window is 0.5 s
    assert calls == [[21]]


def test_items_still_being_prepared_join_the_batch() -> None:
    calls: list[list[int]] = []

    async def scenario() -> None:
        batcher, queue = make_queue(calls)

        async def request(value: int, prepare_s: float) -> list[int]:
            with queue.reserve(1) as r:
                await asyncio.sleep(prepare_s)  # decoding
                return await r.submit([value], time.monotonic() + 5, BatchTiming())

        results = await asyncio.gather(*(request(v, 0.01 * v) for v in range(5)))
        assert results == [[0], [2], [4], [6], [8]]
        await batcher.close()

    run(scenario())
    assert calls == [[0, 1, 2, 3, 4]]


def test_bounded_queue_and_closing() -> None:
    async def scenario() -> None:
        batcher, queue = make_queue([], max_queue=3)
        held = queue.reserve(3)
        with pytest.raises(QueueFull) as full:
            queue.reserve(1)
        assert full.value.retry_after_s >= 1
        held.release()
        queue.reserve(1).release()
        await batcher.close()
        with pytest.raises(QueueClosed):
            queue.reserve(1)

    run(scenario())


@pytest.mark.parametrize("concurrency", [1, 2])
def test_concurrent_batches_run_at_the_same_time_up_to_the_limit(concurrency: int) -> None:
    """With `concurrency` slots, that many batches run at once; the next one forms while they run."""
    running, most = [0], [0]
    lock = threading.Lock()
    both_started = threading.Barrier(2)

    def slow(payloads: list[int], *, alone: bool) -> list[int]:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        try:
            both_started.wait(timeout=0.5)  # two batches at once meet here; one alone times out
        except threading.BrokenBarrierError:
            pass
        with lock:
            running[0] -= 1
        return payloads

    async def scenario() -> list[list[int]]:
        batcher = Batcher(ThreadPoolExecutor(2), max_batch_size=1, max_delay_s=0.0, max_queue=16,
                          concurrency=concurrency)
        queue = batcher.queue("q", slow)

        async def request(value: int) -> list[int]:
            with queue.reserve(1) as r:
                return await r.submit([value], time.monotonic() + 10, BatchTiming())

        results = await asyncio.gather(*(request(v) for v in range(4)))
        await batcher.close()
        return results

    assert run(scenario()) == [[0], [1], [2], [3]]
    assert most[0] == concurrency


def test_waiting_items_are_shared_out_among_idle_slots() -> None:
    """Eight items queued while two slots are idle run as two batches of four, not one of eight."""
    calls: list[list[int]] = []

    async def scenario() -> None:
        batcher, queue = make_queue(calls, max_batch_size=8, max_delay_s=0.0, concurrency=2)
        reservations = [queue.reserve(1) for _ in range(8)]
        # All eight are queued in one step of the event loop, before the worker looks at the queue.
        tasks = [asyncio.ensure_future(r.submit([i], time.monotonic() + 5, BatchTiming()))
                 for i, r in enumerate(reservations)]
        assert [x for t in await asyncio.gather(*tasks) for x in t] == [2 * i for i in range(8)]
        await batcher.close()

    run(scenario())
    assert sorted(map(len, calls)) == [4, 4], calls


def test_deadlines_fail_waiting_requests_at_once_and_spare_running_ones() -> None:
    """One slot, a slow batch running: a request whose deadline passes while it waits fails at its
    deadline (not when the slot frees) and is never computed; a request already running is answered."""
    calls: list[list[int]] = []
    release = threading.Event()

    async def scenario() -> None:
        batcher, queue = make_queue(calls, gate=release, max_delay_s=0)

        async def request(values: list[int], timeout_s: float) -> list[int]:
            with queue.reserve(len(values)) as r:
                return await r.submit(values, time.monotonic() + timeout_s, BatchTiming())

        running = asyncio.ensure_future(request([1], 0.05))  # takes the slot, outlives its deadline
        await asyncio.sleep(0.02)
        start = time.monotonic()
        with pytest.raises(DeadlineExpired):
            await request([2, 3], 0.1)
        assert time.monotonic() - start < 1.0  # the slot stays busy until release
        release.set()
        assert await running == [2]
        assert await request([4], 5) == [8]
        await batcher.close()

    run(scenario())
    assert calls == [[1], [4]]


def test_a_cancelled_request_is_not_computed() -> None:
    calls: list[list[int]] = []
    release = threading.Event()

    async def scenario() -> None:
        batcher, queue = make_queue(calls, gate=release, max_delay_s=0)

        async def request(value: int) -> list[int]:
            with queue.reserve(1) as r:
                return await r.submit([value], time.monotonic() + 5, BatchTiming())

        first = asyncio.ensure_future(request(1))
        await asyncio.sleep(0.02)
        gone = asyncio.ensure_future(request(2))  # waits behind the running batch, then its client leaves
        await asyncio.sleep(0.02)
        gone.cancel()
        kept = asyncio.ensure_future(request(3))
        await asyncio.sleep(0.02)
        release.set()
        assert await first == [2] and await kept == [6]
        await batcher.close()

    run(scenario())
    assert calls == [[1], [3]]


def test_a_batch_is_told_when_it_runs_alone() -> None:
    """`alone` (the runtime may then use every core): no other batch running and nothing waiting."""
    calls: list[list[int]] = []
    flags: list[bool] = []
    release = threading.Event()

    async def scenario() -> None:
        batcher, queue = make_queue(calls, gate=release, alone_flags=flags, max_delay_s=0, concurrency=2)

        async def request(value: int) -> list[int]:
            with queue.reserve(1) as r:
                return await r.submit([value], time.monotonic() + 5, BatchTiming())

        first = asyncio.ensure_future(request(1))  # alone
        await asyncio.sleep(0.05)
        second = asyncio.ensure_future(request(2))  # the first still runs
        await asyncio.sleep(0.05)
        release.set()
        assert await first == [2] and await second == [4]
        assert await request(3) == [6]  # alone again
        await batcher.close()

    run(scenario())
    assert calls == [[1], [2], [3]] and flags == [True, False, True]


@pytest.mark.parametrize("inline_max_s", [0.0, 1.0])
def test_short_lone_batches_run_on_the_loop_thread(inline_max_s: float) -> None:
    """A lone batch of a size that has been short on average runs on the event loop's thread (no hand-over);
    the first one (no average yet), those that have company, and every one with inline_max_s=0 go to the pool."""
    threads: list[bool] = []

    def record(payloads: list[int], *, alone: bool) -> list[int]:
        threads.append(threading.current_thread() is threading.main_thread())
        time.sleep(0.01)
        return payloads

    async def scenario() -> None:
        batcher = Batcher(ThreadPoolExecutor(2), max_batch_size=8, max_delay_s=0, max_queue=16, concurrency=2,
                          inline_max_s=inline_max_s)
        queue = batcher.queue("q", record)

        async def request(value: int) -> list[int]:
            with queue.reserve(1) as r:
                return await r.submit([value], time.monotonic() + 5, BatchTiming())

        assert await request(1) == [1]  # alone, no average yet
        assert await request(2) == [2]  # alone, short on average
        assert await asyncio.gather(request(3), request(4)) == [[3], [4]]  # two at once: neither alone
        await batcher.close()

    run(scenario())
    assert threads == ([False, True, False, False] if inline_max_s else [False] * 4)
