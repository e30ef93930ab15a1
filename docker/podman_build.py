"""Build the images with podman from a Debian base made by mmdebstrap, no registry: `make image`, `make image-gpu`.

    python3 docker/podman_build.py cpu|gpu [--tag mae-serve:cpu] [--base localhost/mae-base:bookworm] [--rebuild-base]
                                   [-- more podman build arguments, e.g. --build-arg EXTRAS=gpu,torch]

1. The base: `mmdebstrap --variant=minbase` of Debian 12 with Python 3.11, venv and pip (about 250 MB, 20 s),
   imported once as BASE (skipped when podman already has it; --rebuild-base makes it again).
2. `podman build --isolation=chroot --format docker` of docker/Dockerfile.<variant> with PYTHON_IMAGE=BASE:
   chroot isolation, since the OCI runtime path needs cgroups that sandboxes like this one do not give; the
   docker format, since the OCI one drops HEALTHCHECK.
3. This machine's pip configuration (the files `pip config debug` finds, and the certificate bundle, constraint
   files and local indexes they name) is mounted read-only for the build, never copied: pip inside the build
   reaches the same package index the host does, and the image carries none of it.
4. The untagged images a rebuild leaves behind are pruned (`podman image prune`).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASE_IMAGE = "localhost/mae-base:bookworm"
BASE_SUITE = "bookworm"  # Debian 12: Python 3.11, which the project and onnxruntime-gpu 1.31.1 (cp311) support
BASE_PACKAGES = "python3,python3-venv,python3-pip,python-is-python3,ca-certificates"
TAGS = {"cpu": "mae-serve:cpu", "gpu": "mae-serve:gpu"}


def log(message: str) -> None:
    print(f"podman_build: {message}", file=sys.stderr, flush=True)


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    log("$ " + shlex.join(cmd))
    return subprocess.run(cmd, check=True, **kwargs)


def image_exists(name: str) -> bool:
    return subprocess.run(["podman", "image", "exists", name]).returncode == 0


def build_base(name: str, suite: str) -> None:
    """mmdebstrap a minimal Debian with Python into a tarball and import it as `name`."""
    with tempfile.TemporaryDirectory(prefix="mae-base-") as tmp:
        tarball = Path(tmp) / "base.tar"
        run(["mmdebstrap", "--variant=minbase", f"--include={BASE_PACKAGES}", suite, str(tarball)])
        run(["podman", "import", "--change", "CMD [\"python3\"]", str(tarball), name], stdout=subprocess.DEVNULL)


def pip_paths() -> list[Path]:
    """This machine's pip configuration files and the local files they point at (cert, constraints, indexes)."""
    debug = subprocess.run([sys.executable, "-m", "pip", "config", "debug"], capture_output=True, text=True).stdout
    files = [Path(m) for m in re.findall(r"^\s+(/\S+), exists: True$", debug, flags=re.M)]
    listing = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    values = [v for line in listing.splitlines() for v in line.partition("=")[2].strip("'\" ").split()]
    values += [v for key, value in os.environ.items() if key.startswith("PIP_") for v in value.split()]
    named = [Path(v.removeprefix("file://")) for v in values if v.startswith(("/", "file:///"))]
    # a local simple index links to its files beside it (../files): mount the folder that holds both
    named = [p.parent if p.name == "simple" else p for p in named]
    paths = {p for p in files + named if p.exists()}
    # a folder already mounted through a parent needs no mount of its own
    return sorted(p for p in paths if not any(q != p and q in p.parents for q in paths))


def build(variant: str, tag: str, base: str, extra: list[str]) -> None:
    mounts = [arg for p in pip_paths() for arg in ("-v", f"{p}:{p}:ro")]
    cmd = ["podman", "build", "--isolation=chroot", "--format", "docker", *mounts,
           "--build-arg", f"PYTHON_IMAGE={base}", "-f", str(ROOT / "docker" / f"Dockerfile.{variant}"), "-t", tag,
           *extra, str(ROOT)]
    start = time.monotonic()
    run(cmd)
    size = subprocess.run(["podman", "image", "inspect", "--format", "{{.Size}}", tag], capture_output=True,
                          text=True, check=True).stdout.strip()
    log(f"built {tag} in {time.monotonic() - start:.0f} s: {int(size) / 1e6:.0f} MB")
    # each rebuild leaves the previous image and its stages untagged (the GPU one ~3 GB): drop them
    subprocess.run(["podman", "image", "prune", "--force"], stdout=subprocess.DEVNULL, check=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variant", choices=sorted(TAGS))
    parser.add_argument("--tag", help="image name (default: mae-serve:<variant>)")
    parser.add_argument("--base", default=os.environ.get("MAE_BASE_IMAGE", BASE_IMAGE), help="base image name")
    parser.add_argument("--suite", default=BASE_SUITE, help="Debian suite of the base")
    parser.add_argument("--rebuild-base", action="store_true", help="make the base again even if podman has it")
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:cut])
    args.podman_args = argv[cut + 1:]  # more `podman build` arguments, after --
    try:
        if args.rebuild_base or not image_exists(args.base):
            build_base(args.base, args.suite)
        build(args.variant, args.tag or TAGS[args.variant], args.base, args.podman_args)
    except FileNotFoundError as e:
        sys.exit(f"podman_build: {e.filename} is not installed (make image-deps installs podman, mmdebstrap, runc)")
    except subprocess.CalledProcessError as e:
        sys.exit(f"podman_build: {shlex.join(e.cmd)} exited with {e.returncode}")


if __name__ == "__main__":
    main()
