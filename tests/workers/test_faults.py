"""Faults on the production stack (PostgreSQL + Redis, private servers this module may restart): the broker or the
database restarted under a running job, and the worker killed while the broker is down. Every job ends succeeded
or failed with a reason; none is lost, none runs twice."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator

import pytest

from tests.workers.conftest import Stack, make_stack, wait_for
from tests.workers.private_servers import PrivatePostgres, PrivateRedis
from tests.workers.test_worker_e2e import _events

TERMINAL = ("succeeded", "failed", "cancelled")
# Redis hands an unacknowledged task back after this long; the production default (12 h) would outlast the test.
VISIBILITY_S = 10


@pytest.fixture(scope="module")
def servers(tmp_path_factory) -> Iterator[tuple[PrivateRedis, PrivatePostgres]]:
    base = tmp_path_factory.mktemp("servers")
    redis_server, postgres = PrivateRedis(base / "redis"), PrivatePostgres()
    redis_server.start()
    postgres.start()
    try:
        yield redis_server, postgres
    finally:
        redis_server.stop()
        postgres.close()


@pytest.fixture(scope="module")
def stack(servers, tmp_path_factory) -> Iterator[Stack]:
    from service.engine_info import known_archs

    known_archs()  # the API's first job submission would wait for this (a subprocess importing torch)
    redis_server, postgres = servers
    yield from make_stack(tmp_path_factory.mktemp("faults"), postgres.url, redis_server.url, "prune",
                          {"LATPRUNE_VISIBILITY_TIMEOUT_S": str(VISIBILITY_S)})


def _running_starts(stack: Stack, job_id: int) -> list[int]:
    """The attempt numbers of the job's starts, from its events."""
    return [data.get("attempt") for kind, data in _events(stack, job_id)
            if kind == "state" and data.get("state") == "running" and "attempt" in data]


def _check_once(stack: Stack, job_id: int, attempts: int = 1, timeout_s: float = 150) -> None:
    done = stack.wait_state(job_id, TERMINAL, timeout_s=timeout_s)
    assert done["state"] == "succeeded", done["error"]
    assert done["attempts"] == attempts and _running_starts(stack, job_id) == list(range(1, attempts + 1))
    subnets = stack.client.get(f"/v1/jobs/{job_id}/subnets", headers=stack.headers).json()
    assert len(subnets) == 1 and len(subnets[0]["artifacts"]) == 3


def _progressing(stack: Stack, job_id: int, fraction: float = 0.1) -> None:
    wait_for(lambda: stack.job(job_id)["progress"] > fraction, 120,
             f"job {job_id} to make progress; worker log:\n{stack.log_tail()}")


@pytest.mark.slow
def test_redis_restart_under_a_running_job(stack, servers):
    redis_server, _ = servers
    job = stack.submit(epochs=8)
    _progressing(stack, job["id"])
    redis_server.restart(down_s=2)
    _check_once(stack, job["id"])
    later = stack.submit()  # the worker consumes again
    _check_once(stack, later["id"])


@pytest.mark.slow
def test_postgres_restart_under_a_running_job(stack, servers):
    _, postgres = servers
    job = stack.submit(epochs=8)
    _progressing(stack, job["id"])
    postgres.restart(down_s=3)
    _check_once(stack, job["id"])


@pytest.mark.slow
def test_worker_killed_while_the_broker_is_down(stack, servers):
    redis_server, _ = servers
    job = stack.submit(epochs=8)
    _progressing(stack, job["id"])
    redis_server.stop()
    for pid in (stack.worker.pid, *stack.worker_children()):
        os.kill(pid, signal.SIGKILL)
    stack.worker.wait(timeout=30)
    redis_server.start()
    stack.start_new_worker()
    # Redis hands the dead worker's task back once it is VISIBILITY_S old, within kombu's 10 s scan.
    _check_once(stack, job["id"], attempts=2, timeout_s=VISIBILITY_S + 60)
