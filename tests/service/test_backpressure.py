"""Overload and deadlines, in process with concurrent requests: a full queue answers at once, late work is dropped."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
from service_helpers import metric, sample_png

from service.app import create_app
from service.settings import Settings
from service.tasks import EmbedTask


@asynccontextmanager
async def async_client(model_dir: Path, **overrides: Any) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(Settings(model_dir=model_dir, **overrides))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as client:
            while (await client.get("/health/ready")).status_code != 200:
                await asyncio.sleep(0.01)
            yield client


def embed(client: httpx.AsyncClient, data: bytes) -> Any:
    return client.post("/embed", files=[("image", ("x.png", data, "image/png"))])


def test_past_the_wait_list_requests_are_refused_at_once_and_accepted_requests_succeed(tiny_model_dir: Path) -> None:
    """2 admitted (MAE_MAX_QUEUE) and 4 waiting: of 24 at once, at least 6 are served and the others refused."""

    async def scenario(status: int) -> None:
        async with async_client(tiny_model_dir, max_queue=2, max_waiting=4, max_batch_size=2, max_batch_delay_ms=50,
                                queue_full_status=status) as client:
            responses = await asyncio.gather(*(embed(client, sample_png()) for _ in range(24)))
            codes = [r.status_code for r in responses]
            refused = [r for r in responses if r.status_code == status]
            assert refused and codes.count(200) >= 6 and codes.count(200) + len(refused) == 24, codes
            for r in refused:
                assert r.json()["error"]["type"] == "overloaded"
                assert int(r.headers["retry-after"]) >= 1
            text = (await client.get("/metrics")).text
            assert metric(text, "mae_rejections_total", reason="overloaded") == len(refused)
            assert (await embed(client, sample_png())).status_code == 200  # recovers once the burst is over

    asyncio.run(scenario(503))
    asyncio.run(scenario(429))


def test_requests_past_the_limit_wait_their_turn_instead_of_being_refused(tiny_model_dir: Path) -> None:
    async def scenario() -> None:
        async with async_client(tiny_model_dir, max_queue=2, max_batch_size=2) as client:
            responses = await asyncio.gather(*(embed(client, sample_png()) for _ in range(24)))
            assert [r.status_code for r in responses] == [200] * 24
            assert metric((await client.get("/metrics")).text, "mae_admission_waiting") == 0

    asyncio.run(scenario())


def test_request_whose_deadline_passes_in_the_queue_is_dropped_before_compute(tiny_model_dir: Path) -> None:
    """B waits in a forming batch for a caller still preparing its image; B's deadline passes there: 504, never run.

    The other caller is a held reservation (what a request decoding a large image holds), so the
    test does not depend on how fast this machine decodes. One inference thread: with an idle second
    one, B would not wait for company but run at once (the batcher shares work out among idle slots).
    """

    async def scenario() -> None:
        async with async_client(tiny_model_dir, request_timeout_s=0.2, max_batch_delay_ms=5000,
                                inference_threads=1) as client:
            assert (await embed(client, sample_png())).status_code == 200  # a lone request never waits
            runs_before = metric((await client.get("/metrics")).text, "mae_ort_runs_total", graph="encoder")
            queue = client._transport.app.state.server.batcher.queues[EmbedTask.key]
            with queue.reserve(1):
                b = await embed(client, sample_png())
            assert b.status_code == 504 and b.json()["error"]["type"] == "deadline_exceeded", b.text
            text = (await client.get("/metrics")).text
            assert metric(text, "mae_dropped_images_total", queue="encoder") >= 1
            assert metric(text, "mae_ort_runs_total", graph="encoder") == runs_before  # nothing was computed
            assert metric(text, "mae_rejections_total", reason="deadline_exceeded") == 1
            assert (await embed(client, sample_png())).status_code == 200

    asyncio.run(scenario())
