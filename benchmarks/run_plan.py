"""A plan of long, resumable runs shared by several worker processes through claim files.

Each job is a (name, thunk) pair; its directory is `out/name`. A worker takes the first pending job that
no live process has claimed (a claim left by a dead process is taken over, and the job resumes), calls
`thunk(run_dir)` and writes what it returns to `run_dir/result.json`, which marks the job done. A thunk
that returns None is not ready yet (it waits on another job) and is tried again later.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

Job = tuple[str, Callable[[Path], object]]


def work(jobs: list[Job], out: Path, label: str = "worker") -> None:
    """Run the plan's jobs until every one has a result.json, sharing them with the other workers."""
    while True:
        pending = [(name, fn) for name, fn in jobs if not (out / name / "result.json").is_file()]
        if not pending:
            return
        started = False
        for name, fn in pending:
            if not claim(out / name):
                continue
            t0 = time.perf_counter()
            try:
                result = fn(out / name)
            finally:
                (out / name / "claim").unlink(missing_ok=True)
            if result is None:
                continue
            (out / name / "result.json").write_text(json.dumps(result, indent=1))
            print(f"[{label}] {name}: {time.perf_counter() - t0:.0f} s", flush=True)
            started = True
            break
        if not started:
            time.sleep(20)


def claim(run: Path) -> bool:
    """Take the run unless a live process holds its claim file."""
    run.mkdir(parents=True, exist_ok=True)
    path = run / "claim"
    if path.is_file():
        try:
            os.kill(int(path.read_text()), 0)
            return False
        except (ProcessLookupError, ValueError):
            path.unlink(missing_ok=True)  # left by a process that died: the run resumes
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    return True


def results(out: Path) -> list[dict]:
    """Every result.json under out (one directory level or two), lists flattened."""
    found: list[dict] = []
    for path in sorted([*out.glob("*/result.json"), *out.glob("*/*/result.json")]):
        data = json.loads(path.read_text())
        found += data if isinstance(data, list) else [data]
    return found
