"""The soak benchmark's memory check can fail: benchmarks/soak.py at a test's size against the server and against
the same app with a handler that keeps 20 KB per request (benchmarks/soak_leaky_app.py). The full run (200k
requests) is the benchmark's; here the check must tell the two apart."""

from __future__ import annotations

from benchmarks import soak

LIMIT_MB = 20.0
LEAK_BYTES = 20_000
REQUESTS, EVERY, WARMUP = 6_000, 1_000, 2_000


def test_the_memory_check_catches_a_leaking_handler_and_passes_the_server() -> None:
    leaky = soak.run(REQUESTS, EVERY, WARMUP, connections=8, leak_bytes=LEAK_BYTES)
    kept_mb = (REQUESTS - WARMUP) * LEAK_BYTES / 2**20  # what the leak keeps after the warm-up: 76 MB
    assert leaky["growth_after_warmup_mb"] > LIMIT_MB, leaky["samples"]
    assert leaky["growth_after_warmup_mb"] > 0.5 * kept_mb, leaky["samples"]
    server = soak.run(REQUESTS, EVERY, WARMUP, connections=8)
    assert server["growth_after_warmup_mb"] <= LIMIT_MB, server["samples"]
    assert server["server_alive_at_end"] and leaky["server_alive_at_end"]
    # every kind of request was sent and answered (or, for the clients that leave, sent)
    kinds = {kind for kind, _ in soak.requests_mix("http://127.0.0.1:1", "m", b"x")}
    assert set(server["statuses"]) == kinds
    assert server["statuses"]["embed multipart"] == {"200": server["statuses"]["embed multipart"].get("200", 0)}
    assert server["statuses"]["bad image"].keys() == {"400"} and server["statuses"]["over the body limit"].keys() == {"413"}
