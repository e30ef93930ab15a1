"""Packaging and deployment, checked statically: pyproject, Dockerfiles, docker-compose.yml, .dockerignore.

The files are parsed and their contracts checked (the GPU image installs the `gpu` extra and never
torch, both run as a non-root user with a HEALTHCHECK on /health/ready, ...), also where no container
can run; tests/deploy/ builds and runs the images with podman where it can. `docker compose config` is run
when a compose CLI is present (it needs no daemon). The slow test installs the package with the
`cpu` extra into a clean virtualenv and checks that the server imports without torch.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import venv
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path

import pytest
from packaging.requirements import Requirement

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE_GPU = ROOT / "docker" / "Dockerfile.gpu"
DOCKERFILE_CPU = ROOT / "docker" / "Dockerfile.cpu"
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"
COMPOSE = ROOT / "docker-compose.yml"

# The settings fixed in DESIGN.md ("Dynamic batching"): every container exposes these.
DESIGN_SETTINGS = {
    "MAE_MODEL_DIR", "MAE_HOST", "MAE_PORT", "MAE_DEVICE", "MAE_PRECISION", "MAE_MAX_BATCH_SIZE",
    "MAE_MAX_BATCH_DELAY_MS", "MAE_MAX_QUEUE", "MAE_REQUEST_TIMEOUT_S", "MAE_MAX_BODY_BYTES",
    "MAE_MAX_IMAGES_PER_REQUEST", "MAE_MAX_IMAGE_PIXELS", "MAE_API_KEYS", "MAE_CORS_ORIGINS",
}


def _service_settings() -> set[str] | None:
    """Every MAE_* name service.settings.Settings reads, or None while it does not import."""
    try:
        from service.settings import Settings
    except Exception:  # the service is optional for these static checks
        return None
    return {"MAE_" + name.upper() for name in Settings.model_fields}


# Known names: the server's own when it imports, else the design's plus a copy of what it added.
MAE_SETTINGS = _service_settings() or DESIGN_SETTINGS | {
    "MAE_WORKERS", "MAE_LOG_LEVEL", "MAE_INTRA_OP_THREADS", "MAE_ORT_SPINNING", "MAE_ENGINE", "MAE_TORCH_COMPILE",
    "MAE_VERIFY_HASHES", "MAE_QUEUE_FULL_STATUS", "MAE_DECODE_THREADS", "MAE_GRACEFUL_SHUTDOWN_S", "MAE_OPENTELEMETRY",
    "MAE_LONE_BATCH_ALL_CORES",
}


def test_service_settings_cover_the_design():
    names = _service_settings()
    if names is None:
        pytest.skip("service.settings does not import")
    assert DESIGN_SETTINGS <= names, f"service.settings lacks {DESIGN_SETTINGS - names}"
CONSOLE_SCRIPTS = {"mae-train", "mae-probe", "mae-finetune", "mae-export", "mae-import", "mae-serve"}
TORCH_PACKAGES = {"torch", "torchvision", "torchaudio", "timm", "pytorch-lightning", "lightning"}


def _canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# --------------------------------------------------------------------------------------------
# pyproject.toml
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _names(requirements: list[str]) -> list[str]:
    return [_canon(Requirement(r).name) for r in requirements]


def test_runtime_extras_hold_exactly_onnxruntime(pyproject):
    extras = pyproject["project"]["optional-dependencies"]
    assert _names(extras["cpu"]) == ["onnxruntime"]
    assert _names(extras["gpu"]) == ["onnxruntime-gpu"]


def test_torch_extra_is_the_torch_engine_and_admits_this_machines_torch(pyproject):
    torch_extra = pyproject["project"]["optional-dependencies"]["torch"]
    assert set(_names(torch_extra)) == {"torch", "onnx", "safetensors"}
    spec = next(Requirement(r) for r in torch_extra if _canon(Requirement(r).name) == "torch").specifier
    assert spec.contains("2.13.0") and not spec.contains("2.14.0")
    assert not set(_names(torch_extra)) & {"onnxruntime", "onnxruntime-gpu"}, "the ONNX Runtime build stays cpu/gpu's"
    assert "'.[cpu,train,torch,dev,bulk]'" in (ROOT / "Makefile").read_text(), "CI tests the torch engine (and mae-embed)"


def test_core_dependencies_have_no_torch(pyproject):
    core = set(_names(pyproject["project"]["dependencies"]))
    assert not core & TORCH_PACKAGES, f"the server install would pull {core & TORCH_PACKAGES}"
    assert not core & {"onnxruntime", "onnxruntime-gpu"}, "the ONNX Runtime build is chosen by the cpu/gpu extra"
    # torch belongs to the training extra only
    assert "torch" in _names(pyproject["project"]["optional-dependencies"]["train"])
    for extra in ("cpu", "gpu"):
        assert not set(_names(pyproject["project"]["optional-dependencies"][extra])) & TORCH_PACKAGES


def test_console_scripts(pyproject):
    scripts = pyproject["project"]["scripts"]
    assert CONSOLE_SCRIPTS <= set(scripts), f"missing: {CONSOLE_SCRIPTS - set(scripts)}"
    assert scripts["mae-serve"].split(":")[0].split(".")[0] == "service"
    for name, target in scripts.items():
        module, _, func = target.partition(":")
        assert module and func, f"{name} = {target!r} is not 'module:function'"
        top = module.split(".")[0]
        assert top in {"model", "training", "service"}, f"{name} points outside the distribution: {target}"


# --------------------------------------------------------------------------------------------
# Dockerfiles: a small parser (line continuations, comments, ARG defaults, stages)
# --------------------------------------------------------------------------------------------

@dataclass
class Instruction:
    keyword: str
    args: str

    def exec_form(self) -> list[str] | None:
        """The JSON (exec) form of CMD/ENTRYPOINT/RUN/HEALTHCHECK CMD, or None for the shell form."""
        text = self.args
        if self.keyword == "HEALTHCHECK":
            text = re.sub(r"^(--\S+\s+)*CMD\s+", "", text)
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            return None
        return value if isinstance(value, list) else None


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)
    global_args: dict[str, str] = field(default_factory=dict)  # ARGs declared before the first FROM

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def env(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for inst in self.all("ENV"):
            tokens = shlex.split(inst.args)
            if len(tokens) == 2 and "=" not in tokens[0]:  # legacy `ENV KEY value`
                out[tokens[0]] = tokens[1]
                continue
            for token in tokens:
                key, _, value = token.partition("=")
                out[key] = value
        return out


def parse_dockerfile(path: Path) -> list[Stage]:
    logical: list[str] = []
    buf = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):  # comment lines inside a continuation are dropped
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        logical.append(buf + line)
        buf = ""
    assert not buf, f"{path}: dangling line continuation"

    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "ARG" and not stages:
            name, _, default = args.partition("=")
            global_args[name] = default.strip('"')
            continue
        if keyword == "FROM":
            tokens = args.split()
            tokens = [t for t in tokens if not t.startswith("--platform")]
            base = re.sub(r"\$\{?(\w+)\}?", lambda m: global_args.get(m.group(1), m.group(0)), tokens[0])
            name = tokens[2] if len(tokens) >= 3 and tokens[1].upper() == "AS" else None
            stages.append(Stage(base, name, global_args=global_args))
            continue
        assert stages, f"{path}: {keyword} before the first FROM"
        stages[-1].instructions.append(Instruction(keyword, args))
    return stages


def stage_args(stage: Stage, **overrides: str) -> dict[str, str]:
    """The stage's ARG defaults (and the global ones), as `--build-arg` `overrides` would change them."""
    args = dict(stage.global_args)
    for inst in stage.all("ARG"):
        name, _, default = inst.args.partition("=")
        args[name] = args.get(name, "") if not default else default.strip('"')
    return {**args, **overrides}


def expand(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), text)


def select_case_branches(text: str) -> str:
    """Shell `case WORD in PATTERN) BODY ;; ... esac` (WORD already expanded) -> the first matching BODY."""
    def branch(m: re.Match[str]) -> str:
        word = m.group(1)
        for pattern, body in re.findall(r"\s*([^)]+)\)\s*(.*?);;", m.group(2)):
            if any(fnmatch(word, alt.strip()) for alt in pattern.split("|")):
                return body
        return ""
    return re.sub(r'case\s+"([^"]*)"\s+in\s+(.*?)\besac', branch, text)


def pip_installs(stage: Stage, **build_args: str) -> list[list[str]]:
    """Argument lists of every `pip install` in the stage's RUN instructions, ARGs expanded and `case` on them
    resolved as the shell would."""
    found = []
    args = stage_args(stage, **build_args)
    for run in stage.all("RUN"):
        for command in re.split(r"&&|;|\|\|", select_case_branches(expand(run.args, args))):
            words = command.split()
            for i in range(len(words) - 1):
                if (words[i].endswith("pip") and words[i + 1] == "install") or words[i : i + 3] == ["-m", "pip", "install"]:
                    start = i + 2 if words[i].endswith("pip") else i + 3
                    found.append([w.strip("'\"") for w in words[start:]])
                    break
    return found


def extras_installed(stage: Stage, **build_args: str) -> set[str]:
    extras: set[str] = set()
    for args in pip_installs(stage, **build_args):
        for arg in args:
            m = re.search(r"\[([A-Za-z0-9_,\- ]+)\]$", arg)
            if m:
                extras |= {e.strip() for e in m.group(1).split(",")}
    return extras


@pytest.fixture(scope="module", params=["gpu", "cpu"])
def image(request):
    path = DOCKERFILE_GPU if request.param == "gpu" else DOCKERFILE_CPU
    assert path.is_file(), f"{path} is missing"
    return request.param, parse_dockerfile(path)


def test_gpu_image_is_debian_python311_with_cuda13_from_wheels_not_a_cuda_base():
    """PyPI's onnxruntime-gpu 1.31 is built for CUDA 13; its CUDA 13 and cuDNN libraries come from PyPI's nvidia-*
    wheels (the server preloads them), so no nvidia/cuda base: only libcuda.so.1 comes from the host. The build
    itself is tests/deploy/test_images.py's (slow)."""
    stages = parse_dockerfile(DOCKERFILE_GPU)
    assert not [s.base for s in stages if "nvidia/cuda" in s.base or "nvcr.io" in s.base]
    assert re.match(r"^python:3\.11(\.\d+)?-slim", stages[-1].base), stages[-1].base
    final = stages[-1]

    def packages(**build_args: str) -> dict[str, str]:
        return {_canon(re.split(r"[\[<>=!~ ]", a, maxsplit=1)[0]): a
                for args in pip_installs(final, **build_args) for a in args if not a.startswith("-")}

    installed = packages()
    assert installed["onnxruntime-gpu"] == "onnxruntime-gpu==1.31.1"
    cuda = {"nvidia-cuda-runtime", "nvidia-cublas", "nvidia-curand", "nvidia-cufft", "nvidia-cuda-nvrtc",
            "nvidia-cudnn-cu13"}
    assert cuda <= set(installed), cuda - set(installed)
    # on a CUDA base image (--build-arg CUDA_WHEELS=) the wheels stay out
    assert not cuda & set(packages(CUDA_WHEELS=""))


def test_cpu_image_base_is_python311_slim():
    stages = parse_dockerfile(DOCKERFILE_CPU)
    assert re.match(r"^python:3\.11(\.\d+)?-slim", stages[-1].base), stages[-1].base


def test_images_install_their_extra_only_and_never_torch(image):
    kind, stages = image
    final = stages[-1]
    assert extras_installed(final) == {kind}, f"{kind} image installs extras {extras_installed(final)}"
    for stage in stages:
        assert "train" not in extras_installed(stage)
        for args in pip_installs(stage):
            for arg in args:
                name = re.split(r"[\[<>=!~ ]", arg, maxsplit=1)[0]
                assert _canon(name) not in TORCH_PACKAGES, f"{kind} image installs {arg}"
                if kind == "gpu":
                    assert _canon(name) != "onnxruntime", "the GPU image must not install the CPU onnxruntime"
    # The build also refuses an image in which torch turned up anyway.
    assert any("pip show torch" in r.args and "exit 1" in r.args for r in final.all("RUN"))


def test_gpu_torch_variant_adds_torch_for_cuda13_and_keeps_onnxruntime_gpu():
    """`--build-arg EXTRAS=gpu,torch`: torch from PyTorch's CUDA 13.0 index, then the gpu and torch extras."""
    final = parse_dockerfile(DOCKERFILE_GPU)[-1]
    assert extras_installed(final, EXTRAS="gpu,torch") == {"gpu", "torch"}
    args = stage_args(final)
    assert args["TORCH_INDEX_URL"].endswith("/cu130")
    assert Requirement("x" + args["TORCH_SPEC"][len("torch"):]).specifier.contains("2.13.0")
    run = " ".join(r.args for r in final.all("RUN"))
    assert '--index-url "${TORCH_INDEX_URL}" "${TORCH_SPEC}"' in run
    assert "*,torch,*)" in run, "torch is installed (and the no-torch refusal skipped) only when EXTRAS names it"


def test_images_are_multi_stage_wheel_builds(image):
    _, stages = image
    assert len(stages) >= 2
    assert any("pip wheel" in r.args for r in stages[0].all("RUN"))
    copies = [c.args for c in stages[-1].all("COPY")]
    assert any(c.startswith(f"--from={stages[0].name}") for c in copies), copies
    # Build tools stay in the wheel stage: the runtime stage never copies the source tree.
    assert not any(re.match(r"^\.\s", c) for c in copies)


def test_images_run_as_non_root(image):
    _, stages = image
    users = stages[-1].all("USER")
    assert users, "no USER in the runtime stage"
    user = users[-1].args.split(":")[0]
    assert user not in {"root", "0"}


def test_images_healthcheck_on_ready(image):
    _, stages = image
    checks = stages[-1].all("HEALTHCHECK")
    assert len(checks) == 1 and "NONE" not in checks[0].args
    command = checks[0].exec_form()
    assert command is not None, "HEALTHCHECK should use the exec form"
    assert "/health/ready" in " ".join(command)
    assert command[0] == "python", "no curl in the images: the health probe uses Python's urllib"
    assert re.search(r"--start-period=\d+s", checks[0].args)


def test_images_expose_8000_and_listen_on_all_interfaces(image):
    kind, stages = image
    final = stages[-1]
    assert any("8000" in e.args.split() or "8000/tcp" in e.args.split() for e in final.all("EXPOSE"))
    env = final.env()
    assert env["MAE_HOST"] == "0.0.0.0"
    assert env["MAE_PORT"] == "8000"
    assert env["MAE_DEVICE"] == ("cuda" if kind == "gpu" else "cpu")
    assert env["MAE_PRECISION"] == "fp32"
    unknown = {k for k in env if k.startswith("MAE_")} - MAE_SETTINGS
    assert not unknown, f"unknown settings in the image: {unknown}"


def test_images_start_through_the_exec_form_entrypoint(image):
    _, stages = image
    final = stages[-1]
    entrypoints = final.all("ENTRYPOINT")
    assert entrypoints and entrypoints[-1].exec_form(), "ENTRYPOINT must use the exec form so signals reach the server"
    assert any("docker/entrypoint.sh" in c.args for c in final.all("COPY"))


# --------------------------------------------------------------------------------------------
# docker/entrypoint.sh: run it with a stand-in mae-serve
# --------------------------------------------------------------------------------------------

@pytest.fixture
def fake_server(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "mae-serve"
    fake.write_text(
        "#!/bin/sh\n"
        'echo "pid=$$"\n'
        'echo "args=$*"\n'
        "env | grep '^MAE_' | sort\n"
    )
    fake.chmod(0o755)
    return bindir


def _run_entrypoint(fake_server, tmp_path, env, *args):
    base = {"PATH": f"{fake_server}:{os.environ['PATH']}", "MAE_MODELS_MOUNT": str(tmp_path / "models")}
    proc = subprocess.Popen(["sh", str(ENTRYPOINT), *args], env={**base, **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    lines = out.splitlines()
    return proc.pid, lines, err


@pytest.mark.skipif(shutil.which("sh") is None, reason="no POSIX sh")
def test_entrypoint_execs_server_drops_empty_settings(fake_server, tmp_path):
    pid, lines, err = _run_entrypoint(fake_server, tmp_path, {"MAE_MAX_QUEUE": "", "MAE_PORT": "9000"},
                                      "--max-batch-size", "8")
    # exec all the way: the server process is the one the container runtime signals
    assert f"pid={pid}" in lines
    assert "args=--max-batch-size 8" in lines
    assert "MAE_PORT=9000" in lines
    assert not any(line.startswith("MAE_MAX_QUEUE") for line in lines)
    assert not any(line.startswith("MAE_MODEL_DIR") for line in lines)  # bundled default
    assert "bundled default" in err


@pytest.mark.skipif(shutil.which("sh") is None, reason="no POSIX sh")
def test_entrypoint_serves_mounted_model_dir(fake_server, tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    (models / "model.json").write_text("{}")
    _, lines, _ = _run_entrypoint(fake_server, tmp_path, {"MAE_MODEL_DIR": ""})
    assert f"MAE_MODEL_DIR={models}" in lines
    # an explicit MAE_MODEL_DIR wins over the mount
    _, lines, _ = _run_entrypoint(fake_server, tmp_path, {"MAE_MODEL_DIR": "/elsewhere"})
    assert "MAE_MODEL_DIR=/elsewhere" in lines


@pytest.mark.skipif(shutil.which("sh") is None, reason="no POSIX sh")
def test_entrypoint_runs_other_commands(fake_server, tmp_path):
    _, lines, _ = _run_entrypoint(fake_server, tmp_path, {}, "echo", "hello")
    assert lines == ["hello"]


# --------------------------------------------------------------------------------------------
# .dockerignore
# --------------------------------------------------------------------------------------------

def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; `!` re-includes; a pattern matches a path or its parents."""
    excluded = False
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern[1:] if negate else pattern
        pat = pat.strip("/")
        matched = any(
            fnmatch(p, pat) or (pat.startswith("**/") and (fnmatch(p, pat[3:]) or fnmatch(p, pat)))
            for p in prefixes
        )
        if matched:
            excluded = not negate
    return excluded


def test_dockerignore():
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
    for path in [".venv", ".venv/bin/python", ".git", ".git/HEAD", "runs/pretrain/checkpoint-last.pth",
                 "tests/test_packaging.py", "service/__pycache__/app.cpython-311.pyc", ".pytest_cache",
                 "model.egg-info/PKG-INFO", "models/my/model.json"]:
        assert dockerignored(path, patterns), f"{path} would be sent to the Docker daemon"
    for path in ["pyproject.toml", "README.md", "service/__init__.py", "service/default_model/model.json",
                 "model/mae.py", "model_dir/schema.py", "training/export.py", "docker/entrypoint.sh"]:
        assert not dockerignored(path, patterns), f"{path} is needed by the image build but ignored"


# --------------------------------------------------------------------------------------------
# docker-compose.yml
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def compose() -> dict:
    yaml = pytest.importorskip("yaml", reason="PyYAML is needed to read docker-compose.yml")
    return yaml.safe_load(COMPOSE.read_text())


def _env(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def _gpu_devices(service: dict) -> list[dict]:
    return service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])


def test_compose_gpu_service_is_the_default(compose):
    mae = compose["services"]["mae"]
    assert not mae.get("profiles"), "`docker compose up` alone must start the GPU service"
    assert mae["build"]["dockerfile"] == "docker/Dockerfile.gpu"
    devices = _gpu_devices(mae)
    assert len(devices) == 1
    assert devices[0]["driver"] == "nvidia"
    assert devices[0]["capabilities"] == ["gpu"]
    assert devices[0].get("count") in (1, "all") or devices[0].get("device_ids")
    assert _env(mae)["MAE_DEVICE"].startswith("${MAE_DEVICE:-")


def test_compose_cpu_variant(compose):
    cpu = compose["services"]["mae-cpu"]
    assert cpu["profiles"] == ["cpu"]
    assert cpu["build"]["dockerfile"] == "docker/Dockerfile.cpu"
    assert not _gpu_devices(cpu)
    assert _env(cpu)["MAE_DEVICE"] == "cpu"
    assert "mae" in cpu["networks"]["default"]["aliases"], "proxy and Prometheus reach either variant as `mae`"


def test_compose_gpu_torch_profile(compose):
    svc = compose["services"]["mae-torch"]
    assert svc["profiles"] == ["gpu-torch"]
    assert svc["build"]["dockerfile"] == "docker/Dockerfile.gpu"
    assert set(svc["build"]["args"]["EXTRAS"].split(",")) == {"gpu", "torch"}
    assert svc["image"] != compose["services"]["mae"]["image"], "the torch image must not replace the ONNX-only one"
    assert _env(svc)["MAE_ENGINE"] == "${MAE_ENGINE:-torch}"
    assert len(_gpu_devices(svc)) == 1 and _gpu_devices(svc)[0]["capabilities"] == ["gpu"]
    assert "mae" in svc["networks"]["default"]["aliases"]


@pytest.mark.parametrize("name", ["mae", "mae-cpu", "mae-torch"])
def test_compose_server_services(compose, name):
    svc = compose["services"][name]
    assert (ROOT / svc["build"]["context"] / svc["build"]["dockerfile"]).is_file()
    check = svc["healthcheck"]
    assert "/health/ready" in " ".join(check["test"])
    assert check["test"][0] == "CMD"
    assert "start_period" in check
    assert svc["ports"] == ["${MAE_PUBLISHED_PORT:-8000}:8000"]
    grace = re.fullmatch(r"(\d+)s", svc["stop_grace_period"])
    assert grace and int(grace.group(1)) >= 10
    assert svc.get("init") is True
    # custom model directories: a read-only bind at /models, and MAE_MODEL_DIR passed through
    assert any(v.rsplit(":", 2)[1:] == ["/models", "ro"] for v in svc["volumes"]), svc["volumes"]
    env = _env(svc)
    assert "MAE_MODEL_DIR" in env
    unknown = set(env) - MAE_SETTINGS
    assert not unknown, f"{name}: unknown settings {unknown}"
    assert env["MAE_HOST"] == "0.0.0.0" and env["MAE_PORT"] == "8000"
    # every tunable setting is configurable from the shell / .env with ${VAR:-default}
    for key, value in env.items():
        if key not in {"MAE_HOST", "MAE_PORT"} and not (name == "mae-cpu" and key == "MAE_DEVICE"):
            assert value.startswith("${" + key + ":-") and value.endswith("}"), f"{key}: {value}"
    assert DESIGN_SETTINGS <= set(env), f"not configurable: {DESIGN_SETTINGS - set(env)}"
    # the server drains for MAE_GRACEFUL_SHUTDOWN_S (30 s by default) before Docker's SIGKILL
    assert int(grace.group(1)) > 30


def test_compose_prometheus_profile(compose):
    yaml = pytest.importorskip("yaml")
    prom = compose["services"]["prometheus"]
    assert prom["profiles"] == ["prometheus"]
    assert "depends_on" not in prom, "depending on `mae` would start the GPU service next to mae-cpu"
    config_mount = next(v for v in prom["volumes"] if v.endswith(":/etc/prometheus/prometheus.yml:ro"))
    config_path = ROOT / config_mount.split(":")[0]
    config = yaml.safe_load(config_path.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    job = jobs["mae"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [f"{n}:{sd['port']}" for sd in job.get("dns_sd_configs", []) for n in sd["names"]]
    targets += [t for sc in job.get("static_configs", []) for t in sc["targets"]]
    assert "mae:8000" in targets


def test_compose_lb_profile(compose):
    lb = compose["services"]["lb"]
    assert lb["profiles"] == ["lb"]
    assert "depends_on" not in lb
    conf_mount = next(v for v in lb["volumes"] if ":/etc/nginx/nginx.conf" in v)
    conf = (ROOT / conf_mount.split(":")[0]).read_text()
    assert "proxy_pass" in conf and "mae:8000" in conf
    assert "resolver 127.0.0.11" in conf, "re-resolve `mae` so that scaled replicas are all used"
    assert "client_max_body_size" in conf


def test_compose_bind_mounts_exist(compose):
    for name, svc in compose["services"].items():
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name}: {source} missing"


def _compose_cli() -> list[str] | None:
    for cmd in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(cmd[0]) is None:
            continue
        try:
            ok = subprocess.run([*cmd, "version"], capture_output=True, timeout=30).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            ok = False
        if ok:
            return cmd
    return None


@pytest.mark.parametrize("profiles", [[], ["cpu", "gpu-torch", "prometheus", "lb"]])
def test_compose_config_validates(profiles, tmp_path):
    cli = _compose_cli()
    if cli is None:
        pytest.skip("no docker compose / docker-compose CLI")
    args = [*cli, "-f", str(COMPOSE)]
    for profile in profiles:
        args += ["--profile", profile]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MAE_", "COMPOSE_"))}
    proc = subprocess.run([*args, "config", "--services"], capture_output=True, text=True, timeout=60,
                          cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    services = set(proc.stdout.split())
    # (compose v1 lists every service whatever the profiles; v2 only the active ones)
    assert "mae" in services
    if profiles:
        assert {"mae-cpu", "mae-torch", "prometheus", "lb"} <= services
    proc = subprocess.run([*args, "config", "-q"], capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr


# --------------------------------------------------------------------------------------------
# slow: a clean virtualenv with the `cpu` extra
# --------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_clean_venv_cpu_install_has_no_torch(tmp_path):
    # Install from a copy of the sources (what the Docker context holds), so that the build
    # writes nothing into the checkout.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for package in ("model", "model_dir", "training", "service"):
        shutil.copytree(ROOT / package, src / package, ignore=ignore)

    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True, clear=True).create(env_dir)
    python = env_dir / ("Scripts" if os.name == "nt" else "bin") / "python"
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME"}}

    def run(*args, **kw):
        proc = subprocess.run([str(python), *args], capture_output=True, text=True, env=env,
                              cwd=tmp_path, **kw)
        assert proc.returncode == 0, f"{args}: {proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        return proc.stdout

    run("-m", "pip", "install", "-q", "--disable-pip-version-check", f"{src}[cpu]", timeout=1100)
    installed = {_canon(p["name"]) for p in json.loads(run("-m", "pip", "list", "--format=json"))}
    assert not installed & TORCH_PACKAGES, f"the cpu install pulled {installed & TORCH_PACKAGES}"
    assert "onnxruntime" in installed and "onnxruntime-gpu" not in installed
    assert "mae-service" in installed

    # The server imports without torch, and without importing the training side at all.
    out = run("-c", "import json, sys, service.__main__, model_dir.schema, model_dir.self_check, "
                    "model_dir.reconstruction; "
                    "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))", timeout=120)
    loaded = set(json.loads(out.strip().splitlines()[-1]))
    assert not loaded & {"torch", "model", "training"}, loaded & {"torch", "model", "training"}

    # Asked for the torch engine without the `torch` extra, the server says what to install (no traceback).
    done = subprocess.run([str(python), "-c", "from service.server import open_engine; "
                           "from model_dir.schema import load_model_dir; from service.settings import Settings; "
                           "s = Settings(engine='torch'); open_engine(load_model_dir(s.model_dir), s)"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert done.returncode != 0 and "needs the torch extra" in done.stderr, done.stderr[-3000:]

    # The console script is there and answers without loading a model.
    serve = env_dir / ("Scripts" if os.name == "nt" else "bin") / "mae-serve"
    proc = subprocess.run([str(serve), "--help"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_clean_venv_client_needs_httpx_and_numpy_only(tmp_path):
    """The `client` extra's packages alone in a clean virtualenv; service/client.py (and the package's
    __init__) imports and encodes a PNG there, without PIL, the server's stack, torch or onnxruntime."""
    extra = pyproject_extra("client")
    assert sorted(_names(extra)) == ["httpx", "numpy"]
    src = tmp_path / "src" / "service"
    src.mkdir(parents=True)
    for name in ("__init__.py", "client.py"):
        shutil.copy2(ROOT / "service" / name, src / name)
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True, clear=True).create(env_dir)
    python = env_dir / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME"}}
    proc = subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *extra],
                          capture_output=True, text=True, env=env, timeout=500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    code = ("import sys; from service.client import Client, AsyncClient, png_from_array; import numpy as np; "
            "assert png_from_array(np.zeros((2, 2), np.uint8))[:4] == b'\\x89PNG'; "
            "print(sorted({m.split('.')[0] for m in sys.modules}))")
    proc = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=120,
                          env={**env, "PYTHONPATH": str(src.parent)}, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = set(json.loads(proc.stdout.strip().replace("'", '"')))
    assert not loaded & {"torch", "onnxruntime", "PIL", "fastapi", "model", "training"}, loaded


def pyproject_extra(name: str) -> list[str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"][name]
