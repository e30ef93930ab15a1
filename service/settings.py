"""Every knob of the server in one pydantic-settings class: `MAE_*` environment variables and `mae-serve` flags."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from service.fetch import Allowlist

BUNDLED_MODEL_DIR = Path(__file__).resolve().parent / "default_model"


def _split_list(value: object) -> object:
    """`a,b` (environment or flag) or a list (code) -> list of non-empty stripped strings."""
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


GPU_DEVICES = ("cuda", "tensorrt")
# A GPU's defaults (Settings.for_device), where the CPU's are sized for a few cores: batches of up to 64 (a ViT-B/16
# batch of 64 keeps a large GPU busy for ~10-30 ms in fp16, where its throughput levels off), every batch full
# (no half batches for idle threads: the GPU runs one batch at a time), room for 16 batches in the queue, and the
# decode pool on most of the cores (decoding, not the GPU, limits images/s then; set by for_device).
GPU_DEFAULTS = {"max_batch_size": 64, "max_queue": 1024, "share_idle_slots": False}

CGROUP_ROOT = Path("/sys/fs/cgroup")


def _cgroup_dirs(controller: str, root: Path, proc_cgroup: Path) -> list[Path]:
    """Where this process's cgroup files for `controller` may be: its own cgroup's folder (from
    /proc/self/cgroup, cgroup v1 controller lines or the v2 line), then the mount's root (a container sees its own
    cgroup there)."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        lines = []
    dirs = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            dirs += [root / name / path.lstrip("/") for name in (controller, "cpu,cpuacct")]
        elif controllers == "":  # cgroup v2
            dirs.append(root / path.lstrip("/"))
    return dirs + [root / controller, root / "cpu,cpuacct", root]


def cpu_quota(root: Path = CGROUP_ROOT, proc_cgroup: Path = Path("/proc/self/cgroup")) -> int | None:
    """Whole cores this process's cgroup CPU quota allows (at least 1), or None without a quota: cgroup v2
    `cpu.max` ("150000 100000"; "max" for none), v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us` (-1 for none).
    A container under a quota (`--cpus`, a Kubernetes cpu limit) still sees every core of the host in its
    affinity mask; threads sized from that mask would oversubscribe the quota."""
    for folder in _cgroup_dirs("cpu", root, proc_cgroup):
        try:
            if (folder / "cpu.max").is_file():
                quota, period = (folder / "cpu.max").read_text().split()[:2]
            elif (folder / "cpu.cfs_quota_us").is_file():
                quota = (folder / "cpu.cfs_quota_us").read_text().strip()
                period = (folder / "cpu.cfs_period_us").read_text().strip()
            else:
                continue
        except (OSError, ValueError):
            continue
        if quota in ("max", "-1"):
            return None
        return max(1, int(quota) // int(period))
    return None


def usable_cores() -> int:
    """The cores this process may use: its affinity mask (where the OS has one), capped by its cgroup's CPU quota."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cpu_quota()
    return min(cores, quota) if quota else cores


class Settings(BaseSettings):
    """Server settings; each field `x_y` is the environment variable `MAE_X_Y` and the flag `--x-y`."""

    model_config = SettingsConfigDict(env_prefix="MAE_", extra="ignore", frozen=True)

    model_dir: Path = Field(BUNDLED_MODEL_DIR, description="model directory (model.json + ONNX files)")
    host: str = Field("127.0.0.1", description="address to bind (0.0.0.0 in a container)")
    port: int = Field(8000, ge=0, le=65535, description="TCP port")
    workers: int = Field(1, ge=1, description="uvicorn worker processes, each with its own sessions and queues "
                         "(/metrics adds up all of them)")
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    engine: Literal["onnxruntime", "torch"] = Field(
        "onnxruntime", description="what computes the graphs: ONNX Runtime on the ONNX files, or torch (the `torch` "
        "extra) on the same model directory's weights (weights.safetensors, else recovered from the fp32 graphs)")
    device: Literal["auto", "cpu", "cuda", "tensorrt"] = Field(
        "auto", description="auto uses CUDA when the engine really gets it, else the CPU (tensorrt: ONNX Runtime only)")
    precision: Literal["fp32", "fp16", "bf16", "int8"] = Field(
        "fp32", description="onnxruntime: the graph variant to load (fp32, fp16, int8; a graph without it falls back "
        "to fp32); torch: fp32, or bf16 / fp16 (CUDA) autocast")
    torch_compile: bool = Field(
        False, description="torch engine: torch.compile the graphs at warm-up, every graph at each batch bucket (the "
        "powers of two below MAE_MAX_BATCH_SIZE, and it; a batch is padded up to its bucket), the encoder for the "
        "full image and for mask ratio 0.75; other shapes (another mask ratio) run eager, nothing compiles inside a "
        "request. Needs a C compiler (CUDA: $CC, gcc or clang, for Triton) or C++ compiler (CPU: $CXX or g++)")
    intra_op_threads: int = Field(
        0, ge=0, description="engine threads per call (0: the usable cores shared out among the inference threads)")
    ort_spinning: bool = Field(
        False, description="let ORT threads spin between operators (faster alone, steals CPU from HTTP); with one ORT "
        "thread per call, only the lone-batch sessions have threads to spin")
    device_failover: Literal["unready", "cpu"] = Field(
        "unready", description="a GPU that fails under a batch after start-up (a CUDA error; ONNX Runtime's silent "
        "move of a session to the CPU is turned off): unready reports not-ready (/health/ready 503, the batch's "
        "requests 503) so that an orchestrator replaces the process; cpu moves the graphs to the CPU and goes on, "
        "slower (mae_device_failures_total counts either)")
    verify_hashes: bool = Field(True, description="check each ONNX file's sha256 against model.json at startup")
    self_check: Literal["fallback", "refuse", "off"] = Field(
        "fallback", description="at startup, run every loaded graph on the model directory's stored self-check: a "
        "reduced-precision variant below its gate on this machine is replaced by fp32 (fallback) or stops the "
        "server (refuse)")

    max_batch_size: int = Field(32, ge=1, description="images per ONNX Runtime call")
    max_batch_delay_ms: float = Field(
        2.0, ge=0, description="how long a batch that already has company waits to fill; a lone request never waits")
    max_queue: int = Field(256, ge=1, description="images waiting per queue before requests are refused")
    max_waiting: int = Field(
        256, ge=0, description="inference requests beyond MAE_MAX_QUEUE admitted ones wait, bodies unread and "
        "first come first served, up to this many; past it they are refused at once (0: refuse at once, no wait)")
    queue_full_status: Literal[429, 503] = Field(
        503, description="status when the wait list or a queue is full (with Retry-After)")
    request_timeout_s: float = Field(
        30.0, gt=0, description="deadline from arrival to the start of compute (504); a request's X-Request-Timeout "
        "header (seconds to its answer) can only shorten it")
    inference_threads: int = Field(
        2, ge=1, description="batches that run at once, one ONNX Runtime call each: while one runs, the next "
        "one forms and starts on the cores it leaves (1: one call at a time on every core)")
    lone_batch_all_cores: bool = Field(
        True, description="on a CPU, a batch that runs alone (no other batch running, nothing waiting) uses every "
        "usable core, through a second session per graph (a second copy of the "
        "weights in memory): a lone request is as fast as with one inference thread, and batches still run side "
        "by side under load")
    lone_batch_inline_ms: float = Field(
        0.0, ge=0, description="a batch that runs alone, of a size whose batches have taken at most this long on "
        "average, runs on the event loop's thread instead of an inference thread: it saves the hand-over and back "
        "(about 0.1 ms of a lone request's 2 for the bundled model), but while it runs the loop serves nothing, and "
        "an engine call that stalls there stalls the whole server (no liveness answer, no 503, no cancellation) "
        "(0: never)")
    decode_threads: int = Field(2, ge=1, description="threads decoding images and encoding PNGs")
    share_idle_slots: bool = Field(
        True, description="a batch that forms while other inference threads are idle takes only its share of the "
        "waiting images, so that the idle threads start too (a CPU: two half batches side by side finish sooner "
        "than one full batch); off: every batch fills up to MAE_MAX_BATCH_SIZE (a GPU's default)")
    trt_cache_dir: Path = Field(
        Path("~/.cache/mae-service/tensorrt"), description="device tensorrt: where TensorRT's engines and timing "
        "caches are kept (the first start builds them, later ones load them; a volume keeps them across restarts)")

    gallery: str = Field(
        "auto", description="what POST /search searches: a Parquet file from mae-embed, a folder of images (labelled "
        "by subfolder, embedded at startup before the server is ready), none, or auto (the bundled model: its 1000 "
        "bundled Fashion-MNIST test images; another model: none)")
    gallery_max_items: int = Field(
        250_000, ge=1, description="a larger gallery is refused at startup: search is exact (one matmul over the "
        "gallery per batch of queries), its time and memory (items x dim x 4 bytes) grow linearly with it")

    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1, description="request body limit (413)")
    max_drain_bytes: int = Field(
        4 * 1024**3, ge=0, description="before a 413, read and discard up to this many bytes of the unread body, so "
        "that clients which send the whole body before reading (urllib, requests, httpx) get the answer, not a "
        "connection reset; past it (or after 60 s) the connection is closed")
    max_images_per_request: int = Field(32, ge=1, description="images in one request (413)")
    max_image_pixels: int = Field(40_000_000, ge=1, description="width x height of one image, checked before decoding")

    url_allowlist: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="comma-separated hosts whose http(s) image URLs are fetched: "
        "images.example.com, *.example.com (its subdomains), * (any host), or an IP address / CIDR network (the "
        "one way to allow private, loopback or link-local addresses, which a listed name that resolves to one "
        "never allows); empty: URLs are refused (422)")
    url_timeout_s: float = Field(5.0, gt=0, description="an image URL's whole fetch, redirects included, within "
                                 "this and the request's deadline (504 fetch_timeout)")
    url_max_bytes: int = Field(16 * 1024 * 1024, ge=1, description="an image URL's body limit, announced or "
                               "streamed (413)")
    url_max_redirects: int = Field(3, ge=0, description="redirects an image URL may take, each checked against "
                                   "MAE_URL_ALLOWLIST and the address rules again")

    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, repr=False, description="comma-separated Bearer keys; empty: no authentication")
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="comma-separated allowed origins; empty: CORS off")
    opentelemetry: bool = Field(
        False, description="FastAPI's native OpenTelemetry spans, metrics and logs through the globally configured "
        "providers (FastAPI 0.165+); off: only the Prometheus metrics, and no provider check on every request")
    graceful_shutdown_s: float = Field(30.0, ge=0, description="how long SIGTERM waits for accepted requests")
    liveness_batch_timeout_s: float = Field(
        60.0, gt=0, description="/health/live answers 503 while a batch has run longer than this and than 20 times "
        "its queue's average batch: the engine is wedged and the process should be restarted")

    _split = field_validator("api_keys", "cors_origins", "url_allowlist", mode="before")(_split_list)

    @field_validator("url_allowlist")
    @classmethod
    def _allowlist_entries(cls, entries: list[str]) -> list[str]:
        """Each entry is one of the Allowlist forms (a typo stops the server at start, naming the entry)."""
        Allowlist(entries)
        return entries

    def device_defaults(self, device: str) -> dict[str, object]:
        """The defaults `device` changes: on a GPU (cuda, tensorrt) GPU_DEFAULTS and the decode threads, less the
        settings given explicitly (environment, flag or argument); nothing on a CPU."""
        if device not in GPU_DEVICES:
            return {}
        gpu = {**GPU_DEFAULTS, "decode_threads": min(8, max(2, usable_cores() - 1))}
        return {k: v for k, v in gpu.items() if k not in self.model_fields_set}

    def for_device(self, device: str) -> Settings:
        """These settings with `device`'s defaults (device_defaults)."""
        return self.model_copy(update=self.device_defaults(device))

    def ort_threads_per_call(self) -> int:
        """intra_op_threads, or when 0 the cores this process may use divided among the inference threads."""
        if self.intra_op_threads:
            return self.intra_op_threads
        return max(1, usable_cores() // self.inference_threads)

    def lone_batch_threads(self) -> int:
        """ONNX Runtime threads for a batch that runs alone: every usable core, or 0 (no second session) when
        lone_batch_all_cores is off or a call gets that many anyway."""
        cores = usable_cores()
        return cores if self.lone_batch_all_cores and cores > self.ort_threads_per_call() else 0

    @field_validator("queue_full_status", mode="before")
    @classmethod
    def _status_from_text(cls, value: object) -> object:
        return int(value) if isinstance(value, str) and value.strip().isdigit() else value
