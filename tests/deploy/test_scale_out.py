"""Three replicas of the CPU image behind nginx with docker/nginx.conf's rules, under load, through faults.

The fault phases of benchmarks/scale_out.py at a test's size (16 connections): a rolling restart (each replica
SIGTERMed, started again, ready, in turn) loses no request; a SIGKILLed replica costs at most the requests it
held at that moment (nginx retries those on another replica, so usually none); a stalled one delays requests
and loses none. The figures at concurrency 64 are the benchmark's (docs/deployment.md).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import ExitStack

import pytest

from benchmarks import scale_out
from benchmarks.containers import Container, Nginx, podman_problem

PROBLEM = podman_problem() or (None if shutil.which("nginx") or shutil.which("/usr/sbin/nginx") else
                               "nginx not installed (make image-deps installs it)")
pytestmark = pytest.mark.skipif(PROBLEM is not None, reason=f"no replicas here: {PROBLEM}")

CONCURRENCY, SECONDS = 16, 35.0


@pytest.fixture(scope="module")
def cluster(cpu_image: str) -> Iterator[tuple[list[Container], Nginx]]:
    with ExitStack() as stack:
        replicas = [stack.enter_context(Container(cpu_image, f"mae-test-replica-{i}")) for i in range(3)]
        for replica in replicas:
            replica.wait_ready()
        lb = stack.enter_context(Nginx([f"127.0.0.1:{r.port}" for r in replicas]))
        yield replicas, lb


def test_rolling_restart_behind_nginx_fails_no_request(cluster: tuple[list[Container], Nginx]) -> None:
    replicas, lb = cluster
    fault = scale_out.rolling(replicas, lead_s=2.0, grace_s=40)
    result, timeline = scale_out.under_load(lb.url, CONCURRENCY, SECONDS, fault)
    phase = scale_out.report(result, timeline, "rolling", "rolled", steps=fault.steps)
    print(f"\nrolling restart: {phase['requests']} sent, {phase['ok']} answered 200, {phase['errors']} failed; "
          f"p99 {phase['fault_window']['p99_ms']:.0f} ms during it; steps {phase['steps']}")
    assert [s["exit_code"] for s in phase["steps"]] == [0, 0, 0], "a replica did not drain and exit cleanly"
    assert phase["fault_window"]["ok"] > 100, "no load went through during the restarts"
    assert phase["errors"] == 0 and phase["refused_connects"] == 0, phase


def test_sigkill_of_a_replica_fails_at_most_the_requests_inside_it(cluster: tuple[list[Container], Nginx]) -> None:
    replicas, lb = cluster
    fault = scale_out.kill_one(replicas, lead_s=2.0)
    result, timeline = scale_out.under_load(lb.url, CONCURRENCY, SECONDS, fault)
    phase = scale_out.report(result, timeline, "kill", "ready", in_flight_at_kill=fault.in_flight_at_kill)
    print(f"\nSIGKILL: {phase['requests']} sent, {phase['ok']} answered 200, {phase['errors']} failed; "
          f"{phase['in_flight_at_kill']} were in the killed replica; it was back in {fault.ready_s:.1f} s")
    assert phase["fault_window"]["ok"] > 0
    assert phase["errors"] <= phase["in_flight_at_kill"], phase


def test_a_stalled_replica_delays_requests_but_loses_none(cluster: tuple[list[Container], Nginx]) -> None:
    """SIGSTOP one replica for 5 s (it still accepts connections, answers nothing): the requests nginx gave it
    wait until it resumes (shorter than proxy_read_timeout, so nginx does not give up on them), none fails."""
    replicas, lb = cluster
    fault = scale_out.stall_one(replicas, lead_s=2.0, stall_s=5.0)
    result, timeline = scale_out.under_load(lb.url, CONCURRENCY, 15.0, fault)
    phase = scale_out.report(result, timeline, "stall", "resumed", in_flight_at_stall=fault.in_flight_at_stall)
    print(f"\nstall: {phase['requests']} sent, {phase['ok']} answered 200, {phase['errors']} failed; slowest "
          f"{phase['max_ms']:.0f} ms, p99 in the stall {phase['fault_window']['p99_ms']:.0f} ms")
    assert phase["max_ms"] > 4000, "no request waited for the stalled replica: the stall did not happen"
    assert phase["errors"] == 0, phase
