"""Containers of the project's images under podman, started the way this kind of machine allows, and nginx in front.

Used by the image tests (tests/deploy/test_images.py) and the scale-out benchmark (benchmarks/scale_out.py):
- `podman_problem()`: why containers cannot run here (no podman, not root, `podman info` failing), or None;
- `Container`: one `podman run -d` of an image, hardened as in production (read-only root filesystem, every
  capability dropped, no new privileges, uid 10001 from the image), published on a loopback port;
- `Nginx`: Debian's nginx with the location block of the repository's docker/nginx.conf (its retry rules,
  body limit, timeouts and headers) over a static list of replicas instead of Docker's DNS.

The quirks of sandboxes like this one (shared/reference/containers.md): crun refuses ("cgroups in hybrid mode
not supported"), so runc with the cgroupfs manager; raising rlimits is refused, so the current ones are passed.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
NGINX_CONF = ROOT / "docker" / "nginx.conf"


def podman_flags() -> list[str]:
    """Global podman flags: runc with cgroupfs (MAE_PODMAN_FLAGS replaces them, e.g. with '' on a normal host)."""
    given = os.environ.get("MAE_PODMAN_FLAGS")
    return given.split() if given is not None else ["--runtime", "runc", "--cgroup-manager", "cgroupfs"]


def ulimit_flags() -> list[str]:
    """The current limits, passed as they are: a sandbox that refuses raising rlimits makes runc fail otherwise."""
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    nproc = min(4096, resource.getrlimit(resource.RLIMIT_NPROC)[0])
    return ["--ulimit", f"nofile={nofile}:{nofile}", "--ulimit", f"nproc={nproc}:{nproc}"]


def containers_conf() -> str:
    """The same choices as a containers.conf (CONTAINERS_CONF), for tools that call podman themselves
    (podman-compose): runc with cgroupfs, the current rlimits as the containers' defaults."""
    ulimits = ulimit_flags()[1::2]
    return (f"[containers]\ndefault_ulimits = {json.dumps(ulimits)}\n"
            '[engine]\nruntime = "runc"\ncgroup_manager = "cgroupfs"\n')


def podman(*args: str, check: bool = True, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(["podman", *podman_flags(), *args], check=check, timeout=timeout, capture_output=True,
                          text=True, **kwargs)


def podman_problem() -> str | None:
    """Why podman cannot build and run the images here, or None when it can."""
    missing = [tool for tool in ("podman", "mmdebstrap", "runc") if shutil.which(tool) is None]
    if missing:
        return f"{', '.join(missing)} not installed (make image-deps installs them, as root with apt)"
    if os.geteuid() != 0:
        return "podman runs rootful here (chroot builds, runc): run as root"
    try:
        podman("info", timeout=60)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        return f"podman info failed: {getattr(e, 'stderr', '') or e}"
    return None


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, timeout_s: float = 90, alive=lambda: True) -> float:
    """Poll url/health/ready until 200; the seconds it took. `alive()` returns True or why the server is gone."""
    start = time.monotonic()
    while True:
        running = alive()
        if running is not True:
            raise RuntimeError(running)
        try:
            if httpx.get(f"{url}/health/ready", timeout=2).status_code == 200:
                return time.monotonic() - start
        except httpx.TransportError:
            pass
        if time.monotonic() - start > timeout_s:
            raise TimeoutError(f"{url} not ready after {timeout_s:.0f} s")
        time.sleep(0.05)


HARDENED = ["--read-only", "--cap-drop", "ALL", "--security-opt", "no-new-privileges"]


class Container:
    """One detached container of `image`, its port 8000 published on 127.0.0.1:`port`."""

    def __init__(self, image: str, name: str, *, port: int | None = None, env: dict[str, str] | None = None,
                 extra: list[str] | None = None):
        self.image, self.name, self.port = image, name, port or free_port()
        self.env, self.extra = env or {}, extra or []
        self.url = f"http://127.0.0.1:{self.port}"

    def run(self) -> Container:
        podman("rm", "--force", "--ignore", self.name)
        env = [a for k, v in self.env.items() for a in ("-e", f"{k}={v}")]
        podman("run", "-d", "--name", self.name, *ulimit_flags(), *HARDENED, "-p", f"127.0.0.1:{self.port}:8000",
               *env, *self.extra, self.image)
        return self

    def state(self) -> str:
        done = podman("inspect", "--format", "{{.State.Status}}", self.name, check=False)
        return done.stdout.strip() or "gone"

    def alive(self) -> bool | str:
        """True unless the container has exited (podman reports a container being started as `stopped` or
        `configured` for a moment)."""
        state = self.state()
        return True if state not in ("exited", "dead", "gone") else f"container {self.name} is {state}:\n{self.logs()[-3000:]}"

    def wait_ready(self, timeout_s: float = 90) -> float:
        return wait_ready(self.url, timeout_s, self.alive)

    def start(self) -> None:
        """Start the stopped container again (what a restart policy or an orchestrator does)."""
        podman("start", self.name)

    def stop(self, grace_s: int = 40) -> float:
        """`podman stop`: SIGTERM, then SIGKILL after `grace_s`; the seconds until the container had exited."""
        start = time.monotonic()
        podman("stop", "--time", str(grace_s), self.name, timeout=grace_s + 30)
        return time.monotonic() - start

    def kill(self, sig: signal.Signals = signal.SIGKILL) -> None:
        podman("kill", "--signal", sig.name, self.name)

    def exit_code(self) -> int:
        return int(podman("inspect", "--format", "{{.State.ExitCode}}", self.name).stdout.strip())

    def exec(self, *cmd: str) -> subprocess.CompletedProcess:
        return podman("exec", self.name, *cmd, check=False)

    def logs(self) -> str:
        done = podman("logs", self.name, check=False)
        return done.stdout + done.stderr

    def remove(self) -> None:
        podman("rm", "--force", "--ignore", "--time", "0", self.name, check=False)

    def __enter__(self) -> Container:
        return self.run()

    def __exit__(self, *exc: object) -> None:
        self.remove()


def nginx_conf(upstreams: list[str], port: int, prefix: Path, read_timeout_s: int | None = None) -> str:
    """docker/nginx.conf with `upstreams` (host:port) in place of the `mae` name that Docker's DNS resolves.

    Everything else is the repository's file: the upstream's failure parameters, the retry rules (another
    replica on a connect error, a timeout, a 502 or a 503, POSTs included), the body limit, the timeouts and the
    request-id header (`read_timeout_s` replaces proxy_read_timeout). nginx's own temp and pid files go under
    `prefix`, so that it runs beside a system nginx.
    """
    text = NGINX_CONF.read_text()
    text, n1 = re.subn(r"^\s*resolver [^;]*;\n", "", text, flags=re.M)
    text, n2 = re.subn(r"^(\s*)server mae:8000 resolve([^;]*);\n",
                       lambda m: "".join(f"{m.group(1)}server {u}{m.group(2)};\n" for u in upstreams), text, flags=re.M)
    text, n3 = re.subn(r"listen 8080;", f"listen 127.0.0.1:{port};", text)
    text, n4 = re.subn(r"access_log /dev/stdout;", "access_log off;", text)
    text, n5 = re.subn(r"error_log /dev/stderr warn;", f"error_log {prefix}/error.log warn;", text)
    text, n6 = re.subn(r"proxy_read_timeout \d+s;", f"proxy_read_timeout {read_timeout_s}s;" if read_timeout_s
                       else r"\g<0>", text)
    if (n1, n2, n3, n4, n5, n6) != (1, 2, 1, 1, 1, 1):
        raise ValueError(f"{NGINX_CONF} changed shape: update benchmarks/containers.nginx_conf")
    paths = "".join(f"    {d}_temp_path {prefix}/{d};\n" for d in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return f"pid {prefix}/nginx.pid;\n" + text.replace("http {\n", "http {\n" + paths, 1)


class Nginx:
    """Debian's nginx in the foreground on 127.0.0.1:`port`, balancing over `upstreams`."""

    def __init__(self, upstreams: list[str], port: int | None = None, read_timeout_s: int | None = None):
        self.upstreams, self.port, self.read_timeout_s = upstreams, port or free_port(), read_timeout_s
        self.url = f"http://127.0.0.1:{self.port}"
        self.prefix = Path(tempfile.mkdtemp(prefix="mae-nginx-"))
        self.prefix.chmod(0o755)  # nginx's workers (nobody, under a root master) create their temp files here
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Nginx:
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        conf = self.prefix / "nginx.conf"
        conf.write_text(nginx_conf(self.upstreams, self.port, self.prefix, self.read_timeout_s))
        subprocess.run([nginx, "-t", "-q", "-c", str(conf), "-p", str(self.prefix)], check=True, capture_output=True)
        self.proc = subprocess.Popen([nginx, "-c", str(conf), "-p", str(self.prefix), "-g", "daemon off;"])
        deadline = time.monotonic() + 10
        while True:
            try:
                if httpx.get(f"{self.url}/nginx-health", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"nginx did not start: {self.error_log()}")
            time.sleep(0.05)

    def error_log(self) -> str:
        log = self.prefix / "error.log"
        return log.read_text() if log.exists() else ""

    def __exit__(self, *exc: object) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)  # graceful: finish what is in flight
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        shutil.rmtree(self.prefix, ignore_errors=True)
