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
    monkeypatch.setattr("service.settings.cpu_quota", lambda: None)
    assert Settings(inference_threads=2).ort_threads_per_call() == 4
    assert Settings(inference_threads=1).ort_threads_per_call() == 8
    assert Settings(inference_threads=16).ort_threads_per_call() == 1
    assert Settings(inference_threads=2, intra_op_threads=3).ort_threads_per_call() == 3  # explicit wins
    # a batch that runs alone gets every usable core, when that is more than a call gets anyway
    assert Settings(inference_threads=2).lone_batch_threads() == 8
    assert Settings(inference_threads=1).lone_batch_threads() == 0
    assert Settings(inference_threads=2, lone_batch_all_cores=False).lone_batch_threads() == 0


@pytest.mark.parametrize("layout", ["v1 own cgroup", "v1 container root", "v2 own cgroup", "v2 container root"])
def test_a_cgroup_cpu_quota_caps_the_usable_cores(layout: str, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A container limited to 2.5 CPUs on an 8-core host: 2 cores, whichever way the cgroup files are laid out."""
    from service.settings import cpu_quota

    proc = tmp_path / "cgroup"
    version, where = layout.split(" ", 1)
    if version == "v1":
        proc.write_text("4:memory:/pod/c1\n1:cpu,cpuacct:/pod/c1\n0::/\n")
        folder = tmp_path / "cpu,cpuacct" / ("pod/c1" if where == "own cgroup" else "")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "cpu.cfs_quota_us").write_text("250000\n")
        (folder / "cpu.cfs_period_us").write_text("100000\n")
        unlimited = lambda: (folder / "cpu.cfs_quota_us").write_text("-1\n")  # noqa: E731
    else:
        proc.write_text("0::/pod/c1\n")
        folder = tmp_path / ("pod/c1" if where == "own cgroup" else "")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "cpu.max").write_text("250000 100000\n")
        unlimited = lambda: (folder / "cpu.max").write_text("max 100000\n")  # noqa: E731
    assert cpu_quota(tmp_path, proc) == 2
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.setattr("service.settings.cpu_quota", lambda: cpu_quota(tmp_path, proc))
    assert Settings(inference_threads=2).ort_threads_per_call() == 1  # 2 cores shared by 2 inference threads
    assert Settings(inference_threads=2).lone_batch_threads() == 2
    unlimited()
    assert cpu_quota(tmp_path, proc) is None
    assert Settings(inference_threads=2).ort_threads_per_call() == 4
    assert cpu_quota(tmp_path / "nothing-here", tmp_path / "no-proc-file") is None
