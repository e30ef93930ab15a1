"""Work nobody waits for is not computed. Over real sockets (uvicorn in a thread of this process, so that the
engine can be held): requests whose clients disconnect behind a slow batch leave the queue uncomputed, in
every protocol; requests that disconnect while they wait to be admitted are never computed either; and
X-Request-Timeout drops work that cannot finish in time."""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from service_helpers import live_server, metric, sample_png

from service.app import create_app
from service.server import Server
from service.settings import Settings
from service.tasks import EmbedTask

B64 = base64.b64encode(sample_png()).decode()
# one image to embed, in each protocol: (path, JSON body)
PROTOCOLS = {
    "native": ("/embed", {"image": B64}),
    "openai": ("/v1/embeddings", {"model": "mae-test", "input": B64}),
    "oip": ("/v2/models/mae-test-embed/infer",
            {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [B64]}]}),
}


def raw_request(path: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> bytes:
    data = json.dumps(body).encode()
    head = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    return (f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n"
            f"{head}\r\n").encode() + data


def sent(url: str, request: bytes) -> socket.socket:
    """A connection that has sent the whole request (and will not read the answer)."""
    host, port = url.removeprefix("http://").split(":")
    conn = socket.create_connection((host, int(port)), timeout=10)
    conn.sendall(request)
    return conn


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


class Held:
    """The encoder of a live server, instrumented: the images of every call it computes, and (while `hold` is
    clear) every call blocks before computing, as a slow or stuck batch would."""

    def __init__(self, server: Server):
        self.server, self.computed, self.hold = server, [], threading.Event()
        self.hold.set()
        encode = server.engine.encode

        def encode_held(pixels: Any, ids_keep: Any, *, alone: bool = False) -> Any:
            self.computed.append(len(pixels))
            self.hold.wait(30)
            return encode(pixels, ids_keep, alone=alone)

        server.engine.encode = encode_held

    @property
    def pending(self) -> int:
        return len(self.server.batcher.queues[EmbedTask.key].pending)


@contextmanager
def live(model_dir: Path, **overrides: Any) -> Iterator[tuple[str, Held]]:
    """One inference thread: the held batch blocks every other."""
    app = create_app(Settings(model_dir=model_dir, inference_threads=1, **overrides))
    with live_server(app) as (url, _):
        held = Held(app.state.server)
        assert httpx.post(f"{url}/embed", json={"image": B64}, timeout=30).status_code == 200
        yield url, held
        held.hold.set()


def start_blocking_batch(url: str, held: Held) -> threading.Thread:
    """A request whose batch blocks in the engine until `held.hold` is set; returns its thread (status in .result)."""
    held.hold.clear()
    calls = len(held.computed)
    thread = threading.Thread(target=lambda: setattr(thread, "result", httpx.post(
        f"{url}/embed", json={"image": B64}, timeout=30).status_code))
    thread.start()
    wait_for(lambda: len(held.computed) == calls + 1, "the blocking batch to start")
    return thread


@pytest.mark.parametrize("protocol", list(PROTOCOLS))
def test_requests_abandoned_behind_a_slow_batch_are_not_computed(tiny_model_dir: Path, protocol: str) -> None:
    path, body = PROTOCOLS[protocol]
    n = 6
    with live(tiny_model_dir) as (url, held):
        blocking = start_blocking_batch(url, held)
        computed = list(held.computed)
        conns = [sent(url, raw_request(path, body)) for _ in range(n)]
        wait_for(lambda: held.pending == n, f"{n} queued requests")
        for conn in conns:
            conn.close()  # the clients give up
        cancelled = lambda: metric(httpx.get(f"{url}/metrics").text, "mae_cancelled_images_total", queue="encoder")
        wait_for(lambda: cancelled() == n, f"{n} cancelled images")
        assert held.pending == 0  # out of the queue at once, not when a batch would have reached them
        held.hold.set()
        blocking.join(30)
        assert blocking.result == 200
        assert httpx.post(f"{url}/embed", json={"image": B64}, timeout=30).status_code == 200  # still serving
        assert held.computed == [*computed, 1], "an abandoned request was computed"
        text = httpx.get(f"{url}/metrics").text
        route = {"native": "/embed", "openai": "/v1/embeddings", "oip": "/v2/models/{name}/infer"}[protocol]
        assert metric(text, "mae_requests_total", route=route, status="499") == n


def test_requests_that_leave_while_waiting_for_admission_are_not_computed(tiny_model_dir: Path) -> None:
    """One request admitted (MAE_MAX_QUEUE=1) and blocked in the engine; the next ones wait at the gate, bodies
    unread, and their clients leave. Admitted one by one later, they find the client gone and end at once."""
    n = 4
    with live(tiny_model_dir, max_queue=1) as (url, held):
        blocking = start_blocking_batch(url, held)
        computed = list(held.computed)
        conns = [sent(url, raw_request("/embed", {"image": B64})) for _ in range(n)]
        waiting = lambda: metric(httpx.get(f"{url}/metrics").text, "mae_admission_waiting")
        wait_for(lambda: waiting() == n, f"{n} requests waiting for admission")
        assert held.pending == 0  # not queued: they wait before their bodies are read
        for conn in conns:
            conn.close()
        held.hold.set()
        blocking.join(30)
        assert blocking.result == 200
        wait_for(lambda: waiting() == 0, "the wait list to empty")
        assert httpx.post(f"{url}/embed", json={"image": B64}, timeout=30).status_code == 200
        assert held.computed == [*computed, 1], "a request whose client left was computed"
        text = httpx.get(f"{url}/metrics").text
        assert metric(text, "mae_requests_total", route="/embed", status="500") == 0


def test_a_request_past_its_deadline_while_waiting_for_admission_is_answered_504(tiny_model_dir: Path) -> None:
    with live(tiny_model_dir, max_queue=1) as (url, held):
        blocking = start_blocking_batch(url, held)
        started = time.monotonic()
        r = httpx.post(f"{url}/embed", json={"image": B64}, headers={"X-Request-Timeout": "0.3"}, timeout=30)
        assert r.status_code == 504 and r.json()["error"]["type"] == "deadline_exceeded", r.text
        assert "waited to be admitted" in r.json()["error"]["message"]
        assert time.monotonic() - started < 5
        held.hold.set()
        blocking.join(30)
        assert blocking.result == 200


def test_x_request_timeout_drops_work_that_cannot_finish_in_time(tiny_model_dir: Path) -> None:
    """Batches of one take 0.3 s here: a request that must be answered within 0.1 s is dropped before compute
    (504), one with 5 s is served; the header can only shorten the server's own timeout."""
    with live(tiny_model_dir) as (url, held):
        encode = held.server.engine.encode

        def slow(pixels: Any, ids_keep: Any, *, alone: bool = False) -> Any:
            time.sleep(0.3)
            return encode(pixels, ids_keep, alone=alone)

        held.server.engine.encode = slow
        for _ in range(2):  # what a batch of one takes, learnt from real batches
            assert httpx.post(f"{url}/embed", json={"image": B64}, timeout=30).status_code == 200
        computed = len(held.computed)
        for path, body in PROTOCOLS.values():
            r = httpx.post(f"{url}{path}", json=body, headers={"X-Request-Timeout": "0.1"}, timeout=30)
            assert r.status_code == 504, (path, r.text)
        assert len(held.computed) == computed, "work that could not finish in time was computed"
        r = httpx.post(f"{url}/embed", json={"image": B64}, headers={"X-Request-Timeout": "5"}, timeout=30)
        assert r.status_code == 200
        assert metric(httpx.get(f"{url}/metrics").text, "mae_dropped_images_total", queue="encoder") == 3


def test_a_bad_x_request_timeout_is_a_400_in_each_protocols_shape(tiny_model_dir: Path) -> None:
    with live(tiny_model_dir) as (url, _):
        for value in ["soon", "0", "-1", "nan", "inf", ""]:
            for name, (path, body) in PROTOCOLS.items():
                r = httpx.post(f"{url}{path}", json=body, headers={"X-Request-Timeout": value}, timeout=30)
                assert r.status_code == 400, (value, name, r.text)
                error = r.json()["error"]
                message = error if name == "oip" else error["message"]
                assert "X-Request-Timeout" in message, r.text
                if name != "oip":
                    assert error["type"] == "invalid_header"
