"""The embedded broker loses a task whose worker process is killed; a starting worker publishes it again."""

from __future__ import annotations

import os
import signal

import pytest
from sqlalchemy import text

from service.auth import create_key
from service.contracts import MEASURE_TASK, PROFILE_TASK, PRUNE_TASK, make_producer
from service.db import dispose_engines, session_scope
from service.migrate import upgrade
from service.models import Device, Job, Predictor
from service.settings import Settings
from tests.workers.conftest import Stack, wait_for
from workers.prune_job import AWAITING_PREDICTOR, MEASURING
from workers.recovery import lock_held, lost_tasks, pending_tasks, recover_lost_tasks, task_lock


@pytest.fixture
def settings(tmp_path):
    settings = Settings(home=tmp_path)  # SQLite and the embedded broker in tmp_path
    upgrade(settings.database_url)
    yield settings
    dispose_engines()


def _job(session, tenant_id: int, state: str, **fields) -> int:  # noqa: ANN001
    job = Job(tenant_id=tenant_id, state=state, method="l1", arch="resnet20", dataset="synthetic:4x16",
              budget_kind="flops", budget_value=0.5, epochs=1, params={}, request={}, request_hash="h", **fields)
    session.add(job)
    session.flush()
    return job.id


def test_lost_tasks_are_the_unfinished_ones_with_no_message_and_no_lock(settings):
    with session_scope(settings.database_url) as s:
        _, key = create_key(s, "t")
        device = Device(tenant_id=key.tenant_id, name="d", spec={"name": "d"}, queue="profile.d")
        s.add(device)
        s.flush()
        waiting_in_broker = _job(s, key.tenant_id, "queued")
        never_published = _job(s, key.tenant_id, "queued")
        awaiting = _job(s, key.tenant_id, "queued", stage=AWAITING_PREDICTOR)
        running_here = _job(s, key.tenant_id, "running")
        worker_killed = _job(s, key.tenant_id, "running")
        measuring = _job(s, key.tenant_id, "running", stage=MEASURING, budget_device_id=device.id)
        _job(s, key.tenant_id, "succeeded")
        _job(s, key.tenant_id, "failed")
        profiling = Predictor(device_id=device.id, arch="resnet20", resolution=16, samples_requested=9, state="running")
        ready = Predictor(device_id=device.id, arch="resnet20", resolution=32, samples_requested=9, state="ready")
        s.add_all([profiling, ready])
        s.flush()
        device_id, device_queue, profiling_id = device.id, device.queue, profiling.id
    celery = make_producer(settings)
    celery.send_task(PRUNE_TASK, args=[waiting_in_broker], queue="prune")
    celery.send_task(PRUNE_TASK, args=[worker_killed], queue="prune")
    # A worker took worker_killed's message and died holding it: kombu leaves it invisible for good.
    from sqlalchemy import create_engine

    broker = create_engine(settings.broker_url.removeprefix("sqla+"))
    with broker.begin() as conn:
        conn.execute(text("UPDATE kombu_message SET visible = 0 WHERE id = (SELECT max(id) FROM kombu_message)"))
    broker.dispose()
    assert pending_tasks(settings.broker_url) == {(PRUNE_TASK, waiting_in_broker)}

    with task_lock(settings, f"job-{running_here}") as mine:
        assert mine and lock_held(settings, f"job-{running_here}")
        with task_lock(settings, f"job-{running_here}") as again:
            assert not again  # a duplicate delivery runs nothing
        sent = []
        assert recover_lost_tasks(settings, lambda *task: sent.append(task)) == 5
    assert {(task, tuple(args), queue) for task, args, queue in sent} == {
        (PRUNE_TASK, (never_published,), "prune"), (PRUNE_TASK, (awaiting,), "prune"),
        (PRUNE_TASK, (worker_killed,), "prune"), (MEASURE_TASK, (measuring, device_id), device_queue),
        (PROFILE_TASK, (profiling_id,), device_queue)}
    # Once its process lets go of the lock (or dies), the running job counts as lost too.
    assert not lock_held(settings, f"job-{running_here}")
    assert (PRUNE_TASK, [running_here], "prune", f"job-{running_here}") in lost_tasks(settings)


def test_no_recovery_or_locks_on_redis(tmp_path):
    settings = Settings(home=tmp_path, broker_url="redis://127.0.0.1:6379/15")
    assert recover_lost_tasks(settings, lambda *task: pytest.fail(f"sent {task}")) == 0
    with task_lock(settings, "job-1") as mine, task_lock(settings, "job-1") as again:
        assert mine and again
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_job_of_a_killed_worker_runs_again_when_a_worker_starts(embedded_stack: Stack):
    stack = embedded_stack
    job = stack.submit(epochs=12)
    wait_for(lambda: stack.job(job["id"])["progress"] > 0.2, 120, f"the job to pass its first epochs; worker log:\n"
                                                                  f"{stack.log_tail()}")
    children = stack.worker_children()
    # The whole worker dies (not only its pool process, whose task the worker itself would hand back).
    os.kill(stack.worker.pid, signal.SIGKILL)
    for pid in children:
        os.kill(pid, signal.SIGKILL)
    stack.worker.wait(timeout=30)
    assert stack.job(job["id"])["state"] == "running"
    assert (PRUNE_TASK, job["id"]) not in pending_tasks(stack.settings.broker_url)  # the message is lost

    stack.start_new_worker()
    done = stack.wait_state(job["id"], ("succeeded", "failed", "cancelled"), timeout_s=180)
    assert done["state"] == "succeeded", done["error"]
    assert done["attempts"] == 2
    assert "again on prune" in stack.log_tail()
    subnets = stack.client.get(f"/v1/jobs/{job['id']}/subnets", headers=stack.headers).json()
    assert len(subnets) == 1 and len(subnets[0]["artifacts"]) == 3


@pytest.mark.slow
def test_poison_job_fails_after_three_runs_and_leaves_no_work_dir(embedded_stack: Stack):
    stack = embedded_stack
    job = stack.submit(epochs=60)
    work = stack.settings.artifact_dir / "work" / "jobs" / str(job["id"])
    for attempt in (1, 2, 3):  # each run kills its pool process, as a job that runs out of memory would
        wait_for(lambda a=attempt: (j := stack.job(job["id"]))["attempts"] == a and j["progress"] > 0.01, 120,
                 f"run {attempt} to make progress; worker log:\n{stack.log_tail()}")
        assert work.exists()
        (child,) = stack.worker_children()
        os.kill(child, signal.SIGKILL)
    done = stack.wait_state(job["id"], ("succeeded", "failed", "cancelled"), timeout_s=120)
    assert done["state"] == "failed" and "lost 3 times" in done["error"]
    assert done["attempts"] == 3  # three runs, not four
    assert not work.exists()  # the dead runs' checkpoints are of no use to anyone now
