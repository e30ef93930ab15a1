"""Prometheus metrics (prefix `mae_`), one registry per app so that several apps can live in one process.

With several worker processes (`mae-serve --workers N`) the values live in files under
`PROMETHEUS_MULTIPROC_DIR` (mae-serve sets it up) and `/metrics` adds up every worker's, whichever
worker answers the scrape. A worker's live gauges (requests in flight, queue depth) go with it: it
removes them when it stops, and a starting worker removes those of workers that died without stopping
(uvicorn replaces a crashed worker), so the sums never count a dead process.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from service.batcher import BatchObserver

MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics(BatchObserver):
    """Request, queue, batch and inference metrics; also the batcher's observer."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("mae_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.request_seconds = Histogram("mae_request_duration_seconds", "HTTP request duration", ["route"],
                                         buckets=_LATENCY_BUCKETS, registry=r)
        self.multiprocess = bool(os.environ.get(MULTIPROC_DIR_ENV))
        if self.multiprocess:
            _forget_dead_workers(Path(os.environ[MULTIPROC_DIR_ENV]))
        self.in_flight = Gauge("mae_requests_in_flight", "HTTP requests being handled", registry=r,
                               multiprocess_mode="livesum")
        self.images = Counter("mae_images", "images processed by route", ["route"], registry=r)
        self.rejections = Counter("mae_rejections", "requests refused, by reason (the error type)", ["reason"],
                                  registry=r)
        self.url_fetches = Counter("mae_url_fetches", "image URLs fetched (MAE_URL_ALLOWLIST), by outcome: ok or "
                                   "the error type", ["outcome"], registry=r)
        self.dropped = Counter("mae_dropped_images", "images dropped before compute: their deadline passed, or "
                               "would have before their batch ended", ["queue"], registry=r)
        self.cancelled_images = Counter("mae_cancelled_images", "images taken out of a queue before compute: "
                                        "their client disconnected", ["queue"], registry=r)
        self.admission_waiting = Gauge("mae_admission_waiting", "inference requests waiting to be admitted (their "
                                       "bodies not yet read)", registry=r, multiprocess_mode="livesum")
        self.queue_seconds = Histogram("mae_queue_duration_seconds", "time an image waited for its batch",
                                       ["queue"], buckets=_LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("mae_batch_size", "images per batch", ["queue"], buckets=_BATCH_BUCKETS,
                                    registry=r)
        self.queue_depth = Gauge("mae_queue_depth", "images waiting for a batch", ["queue"], registry=r,
                                 multiprocess_mode="livesum")
        self.ort_runs = Counter("mae_ort_runs", "ONNX Runtime session runs by graph", ["graph"], registry=r)
        self.inference_seconds = Histogram("mae_inference_duration_seconds", "ONNX Runtime run duration by graph",
                                           ["graph"], buckets=_LATENCY_BUCKETS, registry=r)
        self.output_bytes = Counter("mae_engine_output_bytes", "bytes of the engine's outputs returned to the host "
                                    "(copied from the device where it runs on one), by graph", ["graph"], registry=r)
        self.device_failures = Counter("mae_device_failures", "device errors under a call after start-up (the "
                                       "engine then reports not-ready, or moved to the CPU), by the device that "
                                       "failed", ["device"], registry=r)
        self.info = Gauge("mae_model_info", "the loaded model (value 1)", ["name", "version", "device", "precision"],
                          registry=r, multiprocess_mode="max")
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}

    def child(self, metric: Any, *labels: str) -> Any:
        """`metric.labels(*labels)`, looked up once per label set: prometheus_client's `labels` validates the
        values and takes a lock on every call (a few µs each: every request counts two, every batch several)."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def request_done(self, route: str, status: int, seconds: float) -> None:
        self.child(self.requests, route, str(status)).inc()
        self.child(self.request_seconds, route).observe(seconds)

    def rejected(self, reason: str) -> None:
        self.child(self.rejections, reason).inc()

    # BatchObserver
    def batch(self, queue: str, size: int, queue_seconds: list[float]) -> None:
        self.child(self.batch_size, queue).observe(size)
        waited = self.child(self.queue_seconds, queue)
        for seconds in queue_seconds:
            waited.observe(seconds)

    def depth(self, queue: str, delta: int) -> None:
        self.child(self.queue_depth, queue).inc(delta)

    def expired(self, queue: str, count: int) -> None:
        self.child(self.dropped, queue).inc(count)

    def cancelled(self, queue: str, count: int) -> None:
        self.child(self.cancelled_images, queue).inc(count)

    # engine observer
    def ort_run(self, graph: str, batch: int, seconds: float, output_bytes: int = 0) -> None:
        self.child(self.ort_runs, graph).inc()
        self.child(self.inference_seconds, graph).observe(seconds)
        self.child(self.output_bytes, graph).inc(output_bytes)

    def request_counts(self) -> dict[str, dict[str, int]]:
        """This process's requests so far, {route: {status: count}} (the shutdown log line)."""
        counts: dict[str, dict[str, int]] = {}
        for family in self.requests.collect():
            for sample in family.samples:
                if sample.name == "mae_requests_total":
                    route, status = sample.labels["route"], sample.labels["status"]
                    counts.setdefault(route, {})[status] = int(sample.value)
        return counts

    def close(self) -> None:
        """At shutdown: with several workers, this process's live gauges leave the sums."""
        if self.multiprocess:
            mark_process_dead(os.getpid())

    def exposition(self) -> bytes:
        if self.multiprocess:  # every worker's values, read from their files
            registry = CollectorRegistry()
            MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)


def _forget_dead_workers(directory: Path) -> None:
    """Remove the live-gauge files of processes that no longer exist (`gauge_live*_<pid>.db`)."""
    for path in directory.glob("gauge_live*_*.db"):
        pid = path.stem.rsplit("_", 1)[1]
        if pid.isdigit() and not _alive(int(pid)):
            mark_process_dead(int(pid), str(directory))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        pass
    return True
