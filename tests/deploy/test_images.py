"""The images built and run for real with podman (docker/podman_build.py, what `make image` runs).

CPU image (the default run, about a minute): built from the mmdebstrap base; run hardened (read-only root
filesystem, every capability dropped, no new privileges, uid 10001); ready, healthy by its own HEALTHCHECK, and
answering /embed, /reconstruct and /classify as the bare process does on the same inputs; stopped with SIGTERM
under load, every request that reached the server answered. GPU image (slow: about 1.6 GB of wheels): ORT's CUDA
provider links everything but the driver's libcuda.so.1, CUDA is listed, and MAE_DEVICE=auto without a GPU
serves on the CPU and says why in /info. Skipped, with the reason, where podman cannot run containers.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import build_image
from PIL import Image
from service_helpers import ROOT, SAMPLES, encode, server_process

from benchmarks.containers import (
    Container,
    containers_conf,
    free_port,
    podman,
    podman_problem,
    ulimit_flags,
    wait_ready,
)
from benchmarks.loadgen import REFUSED, RESET, run_load
from benchmarks.scale_out import classify_body
from service.settings import BUNDLED_MODEL_DIR

PROBLEM = podman_problem()
pytestmark = pytest.mark.skipif(PROBLEM is not None, reason=f"no containers here: {PROBLEM}")

IMAGES = [(SAMPLES / f"{name}.png").read_bytes() for name in ("sneaker", "bag", "coat")]


@pytest.fixture(scope="module")
def container(cpu_image: str) -> Iterator[Container]:
    # a 1 MB /tmp: the server needs no disk (uploads stay in memory), so a full one costs nothing
    with Container(cpu_image, "mae-test-cpu", extra=["--tmpfs", "/tmp:rw,size=1m"]) as c:
        c.wait_ready()
        yield c


@pytest.fixture(scope="module")
def bare() -> Iterator[str]:
    with server_process(BUNDLED_MODEL_DIR) as (url, _):
        yield url


def answers(url: str) -> dict[str, dict]:
    """The three routes on the same images and options: what the container and the bare process must agree on."""
    files = [("image", (f"{i}.png", data, "image/png")) for i, data in enumerate(IMAGES)]
    with httpx.Client(base_url=url, timeout=30) as client:
        calls = {"embed": client.post("/embed", files=files),
                 "reconstruct": client.post("/reconstruct", files=files,
                                            data={"mask_ratio": "0.75", "seed": "7", "response_format": "json"}),
                 "classify": client.post("/classify", files=files, data={"top_k": "3"}),
                 "info": client.get("/info")}
    for name, r in calls.items():
        assert r.status_code == 200, (name, r.text)
    return {name: r.json() for name, r in calls.items()}


def pixels(png_b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(png_b64))), dtype=np.int16)


def test_cpu_image_runs_hardened_as_uid_10001_and_reports_healthy(container: Container) -> None:
    config = json.loads(podman("inspect", container.name).stdout)[0]
    assert config["HostConfig"]["ReadonlyRootfs"] is True
    assert config["HostConfig"]["CapDrop"] and not config["HostConfig"]["CapAdd"]
    assert container.exec("id", "-u").stdout.strip() == "10001"
    caps = container.exec("grep", "CapEff", "/proc/1/status").stdout.split()
    assert caps[-1] == "0000000000000000", caps  # the server holds no capability at all
    write = container.exec("touch", "/opt/venv/written")
    assert write.returncode != 0 and "Read-only file system" in write.stderr
    assert podman("healthcheck", "run", container.name, check=False).returncode == 0  # the image's HEALTHCHECK
    assert httpx.get(f"{container.url}/health/ready", timeout=5).json() == {"status": "ready"}
    # the image carries none of this machine's pip configuration (it was mounted for the build only)
    assert container.exec("ls", "/etc/xdg/pip/pip.conf", "/root/.config/pip/pip.conf").returncode != 0


def test_cpu_image_takes_uploads_larger_than_its_tmp(container: Container) -> None:
    """A 3 MB PNG into a container whose /tmp holds 1 MB: a 200 (it was a 500, "No space left on device", while
    Starlette spooled parts over 1 MB to /tmp)."""
    noise = np.random.default_rng(0).integers(0, 256, (1000, 1000, 3), dtype=np.uint8)
    big = encode(Image.fromarray(noise), "PNG")
    assert len(big) > 2 * 1024 * 1024
    r = httpx.post(f"{container.url}/embed", files=[("image", ("big.png", big, "image/png"))], timeout=60)
    assert r.status_code == 200, r.text


def test_cpu_image_answers_as_the_bare_process(container: Container, bare: str) -> None:
    boxed, plain = answers(container.url), answers(bare)
    assert boxed["info"]["model"]["version"] == plain["info"]["model"]["version"]
    assert boxed["info"]["runtime"]["device"] == "cpu"
    for a, b in zip(boxed["embed"]["data"], plain["embed"]["data"], strict=True):
        np.testing.assert_allclose(a["embedding"], b["embedding"], rtol=0, atol=1e-5)
    for a, b in zip(boxed["classify"]["data"], plain["classify"]["data"], strict=True):
        assert [p["label"] for p in a["predictions"]] == [p["label"] for p in b["predictions"]]
        np.testing.assert_allclose([p["score"] for p in a["predictions"]], [p["score"] for p in b["predictions"]],
                                   rtol=0, atol=1e-5)
    assert boxed["reconstruct"]["seed"] == plain["reconstruct"]["seed"] == 7
    for a, b in zip(boxed["reconstruct"]["data"], plain["reconstruct"]["data"], strict=True):
        assert a["mask"] == b["mask"]
        assert abs(a["mse_masked"] - b["mse_masked"]) < 1e-5
        for key in ("original", "masked", "reconstruction", "pasted"):
            # PNG levels: a rounding apart at most
            assert np.abs(pixels(a["images"][key]) - pixels(b["images"][key])).max() <= 1, key


def test_a_cpu_quota_sizes_the_threads_inside_the_container(cpu_image: str) -> None:
    """`--cpus 1` (a Kubernetes cpu limit of 1): the container still sees both cores in its affinity mask, and the
    server sizes its ONNX Runtime threads from the quota: one per call and no second, all-core session for lone
    batches (from the mask alone it would open one with 2 threads)."""
    with Container(cpu_image, "mae-test-quota", extra=["--cpus", "1"]) as c:
        c.wait_ready()
        info = httpx.get(f"{c.url}/info", timeout=10).json()
        assert c.exec("nproc").stdout.strip() == "2"
    assert info["batching"]["ort_threads_per_call"] == 1
    assert info["runtime"]["lone_batch_threads"] == 0


STOPPED = re.compile(r"stopped; requests since start: (\{.*\})")


def test_sigterm_under_load_answers_every_request_the_server_accepted(cpu_image: str) -> None:
    """32 keep-alive clients on /classify; `podman stop` (SIGTERM) 3 s in. The server's own count of the requests
    that reached it (its last log line) equals the client's count of 200s: none was lost, and no client got an
    error status; the only other outcomes are connections refused or closed once the server had stopped
    accepting (requests it never read)."""
    with Container(cpu_image, "mae-test-sigterm") as c:
        c.wait_ready()
        body, content_type = classify_body()
        result: dict = {}
        load = threading.Thread(target=lambda: result.update(run_load(
            c.url, "/classify", body, content_type, 32, 7.0, timeline=True)))
        load.start()
        time.sleep(3.5)
        in_flight = float(re.search(r"^mae_requests_in_flight (\S+)$",
                                    httpx.get(f"{c.url}/metrics", timeout=5).text, re.M).group(1)) - 1
        stop_s = c.stop(grace_s=40)
        load.join()
        assert c.exit_code() in (0, 143), c.logs()[-2000:]  # drained and exited, not killed
        counts = json.loads(STOPPED.findall(c.logs())[-1])
    statuses = result["records"][:, 2].astype(int)
    answered = int((statuses == 200).sum())
    other = sorted(set(statuses.tolist()) - {200, REFUSED, RESET})
    print(f"\nSIGTERM under load: {answered} answered 200, {int((statuses == RESET).sum())} closed unread, "
          f"{int((statuses == REFUSED).sum())} connects refused after the stop; {in_flight:.0f} in flight at "
          f"SIGTERM; podman stop took {stop_s:.1f} s")
    assert not other, f"requests answered with {other}"
    assert in_flight >= 1, "nothing was in flight when SIGTERM came: the test did not test the drain"
    assert counts.get("/classify", {}).get("200", 0) == answered, (counts, answered)
    assert set(counts.get("/classify", {})) == {"200"}, counts
    assert answered > 100


def test_compose_cpu_profile_comes_up_with_podman_compose(cpu_image: str, tmp_path: Path) -> None:
    """docker-compose.yml's `cpu` profile brought up for real by podman-compose (the image built above; its
    settings, entrypoint, mounts and health check as compose gives them)."""
    compose = shutil.which("podman-compose") or str(Path(sys.executable).parent / "podman-compose")
    if not Path(compose).exists():
        pytest.skip("podman-compose not installed (the dev extra has it)")
    conf, models = tmp_path / "containers.conf", tmp_path / "models"
    conf.write_text(containers_conf())
    models.mkdir()
    port = free_port()
    env = {**os.environ, "CONTAINERS_CONF": str(conf), "MAE_PUBLISHED_PORT": str(port),
           "MAE_MODELS_HOST_DIR": str(models)}
    project = ["-p", "maetestcompose", "--profile", "cpu"]
    up = subprocess.run([compose, *project, "up", "-d", "mae-cpu"], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=300)
    try:
        assert up.returncode == 0, up.stdout[-2000:] + up.stderr[-2000:]
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, timeout_s=90)
        files = [("image", ("x.png", IMAGES[2], "image/png"))]
        top = httpx.post(f"{url}/classify", files=files, timeout=30).json()["data"][0]["predictions"][0]
        assert top["label"] == "Coat"
        # compose passes every setting as ${MAE_X:-}; the server started, so the entrypoint dropped the empty ones
        # (an empty MAE_MAX_QUEUE would not parse), and it runs on the CPU as the cpu profile says
        info = httpx.get(f"{url}/info", timeout=10).json()
        assert info["runtime"]["device"] == "cpu" and info["runtime"]["device_reason"] == "MAE_DEVICE=cpu"
    finally:
        subprocess.run([compose, *project, "down"], cwd=ROOT, env=env, capture_output=True, timeout=300)


@pytest.mark.slow
def test_gpu_image_links_cuda_from_wheels_and_falls_back_to_cpu_with_a_reason() -> None:
    image = build_image("gpu")
    site = "/opt/venv/lib/python3.11/site-packages"
    ldd = podman("run", "--rm", *ulimit_flags(), "--entrypoint", "sh", image, "-c",
                 f"LD_LIBRARY_PATH=$(ls -d {site}/nvidia/*/lib | paste -sd:) "
                 f"ldd {site}/onnxruntime/capi/libonnxruntime_providers_cuda.so").stdout
    missing = re.findall(r"^\s*(\S+) => not found", ldd, re.M)
    assert missing == ["libcuda.so.1"], ldd
    assert re.search(r"libcublasLt\.so\.13 => \S+/nvidia/cu13/lib/", ldd), ldd
    providers = podman("run", "--rm", *ulimit_flags(), "--entrypoint", "python", image, "-c",
                       "import onnxruntime as o; print(o.get_available_providers())").stdout
    assert "CUDAExecutionProvider" in providers, providers
    with Container(image, "mae-test-gpu-auto", env={"MAE_DEVICE": "auto"}) as c:
        c.wait_ready()
        runtime = httpx.get(f"{c.url}/info", timeout=10).json()["runtime"]
        assert runtime["device"] == "cpu"
        assert "libcuda.so.1" in runtime["device_reason"], runtime["device_reason"]
        # preload_dlls() loaded the wheels' libraries, no LD_LIBRARY_PATH
        assert any("/nvidia/cu13/lib/libcublas" in p for p in runtime["cuda_libraries"]), runtime["cuda_libraries"]
        assert any("/nvidia/cudnn/lib/libcudnn" in p for p in runtime["cuda_libraries"]), runtime["cuda_libraries"]
        files = [("image", ("x.png", IMAGES[2], "image/png"))]
        assert httpx.post(f"{c.url}/classify", files=files, timeout=30).json()["data"][0]["predictions"][0]["label"] \
            == "Coat"
    # the image's default, MAE_DEVICE=cuda, refuses to start without a GPU and says why
    with Container(image, "mae-test-gpu-cuda") as c:
        deadline = time.monotonic() + 60
        while c.state() == "running" and time.monotonic() < deadline:
            time.sleep(0.5)
        assert c.state() == "exited" and c.exit_code() != 0
        assert "libcuda.so.1" in c.logs() and "MAE_DEVICE=auto" in c.logs(), c.logs()[-2000:]
