"""`mae-serve` flags and `MAE_*` environment variables map onto the same Settings fields."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.__main__ import build_parser
from service.settings import Settings

DESIGN_NAMES = ["model_dir", "host", "port", "device", "precision", "max_batch_size", "max_batch_delay_ms",
                "max_queue", "request_timeout_s", "max_body_bytes", "max_images_per_request", "max_image_pixels",
                "api_keys", "cors_origins"]


def test_every_design_setting_is_an_env_variable_and_a_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    flags = {a.dest for a in build_parser()._actions}
    assert set(DESIGN_NAMES) <= flags
    monkeypatch.setenv("MAE_MAX_BATCH_SIZE", "7")
    monkeypatch.setenv("MAE_API_KEYS", "s3cret-1, s3cret-2,")
    monkeypatch.setenv("MAE_QUEUE_FULL_STATUS", "429")
    monkeypatch.setenv("MAE_MODEL_DIR", "/models/x")
    s = Settings()
    assert (s.max_batch_size, s.api_keys, s.queue_full_status, s.model_dir) == (7, ["s3cret-1", "s3cret-2"], 429, Path("/models/x"))
    assert s.port == 8000 and s.cors_origins == [] and "s3cret" not in repr(s)  # keys stay out of logs
    args = build_parser().parse_args(["--max-batch-size", "3", "--no-verify-hashes", "--cors-origins", "https://x"])
    given = {k: v for k, v in vars(args).items() if v is not None}
    s = Settings(**given)  # flags win over the environment
    assert (s.max_batch_size, s.verify_hashes, s.cors_origins) == (3, False, ["https://x"])


def test_ort_threads_per_call_share_out_the_usable_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)))
    assert Settings(inference_threads=2).ort_threads_per_call() == 4
    assert Settings(inference_threads=1).ort_threads_per_call() == 8
    assert Settings(inference_threads=16).ort_threads_per_call() == 1
    assert Settings(inference_threads=2, intra_op_threads=3).ort_threads_per_call() == 3  # explicit wins
    # a batch that runs alone gets every usable core, when that is more than a call gets anyway
    assert Settings(inference_threads=2).lone_batch_threads() == 8
    assert Settings(inference_threads=1).lone_batch_threads() == 0
    assert Settings(inference_threads=2, lone_batch_all_cores=False).lone_batch_threads() == 0
