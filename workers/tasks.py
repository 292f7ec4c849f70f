"""Celery tasks: an id in, the database and the artifact store out. The work lives in prune_job/profile_job."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from celery.exceptions import Reject
from celery.signals import worker_process_init, worker_ready

from service.contracts import MEASURE_TASK, PROFILE_TASK, PRUNE_TASK
from service.db import dispose_engines
from service.settings import get_settings
from workers.celery_app import app

log = logging.getLogger(__name__)
# What a task answers when another live process already runs its job (a duplicate; see workers.recovery).
DUPLICATE = "running elsewhere"


@worker_process_init.connect
def _fresh_connections(**_: object) -> None:
    # Pooled connections must not cross a fork.
    dispose_engines()


@worker_ready.connect
def _recover_lost_tasks(**_: object) -> None:
    from workers.recovery import recover_lost_tasks

    try:
        recover_lost_tasks(get_settings(), _dispatch)
    except Exception:  # noqa: BLE001 - the worker serves what it can; the next start tries again
        log.exception("could not look for tasks lost with a killed worker")


def _dispatch(task: str, args: list, queue: str) -> None:
    app.send_task(task, args=args, queue=queue)


@contextmanager
def requeue_on_database_outage(what: str) -> Iterator[None]:
    """A task that could not reach the database for longer than workers.dbretry waits goes back to the broker
    instead of ending (acknowledged) with its job left unfinished."""
    from sqlalchemy.exc import DBAPIError

    from workers.dbretry import is_outage

    try:
        yield
    except DBAPIError as exc:
        if not is_outage(exc):
            raise
        log.error("database unreachable during %s; handing the task back to the broker", what)
        raise Reject(exc, requeue=True) from exc


@app.task(name=PRUNE_TASK)
def prune_run(job_id: int) -> str:
    """Run one pruning job (resumes from its checkpoints when redelivered)."""
    from workers.prune_job import run_job
    from workers.recovery import task_lock

    settings = get_settings()
    with requeue_on_database_outage(f"job {job_id}"), task_lock(settings, f"job-{int(job_id)}") as mine:
        return run_job(settings, int(job_id), _dispatch) if mine else DUPLICATE


@app.task(name=PROFILE_TASK)
def profile_run(predictor_id: int) -> str:
    """Profile a device for one architecture and fit its LPNet (on the device's queue)."""
    from workers.profile_job import run_profile
    from workers.recovery import task_lock

    settings = get_settings()
    with requeue_on_database_outage(f"profiling {predictor_id}"), \
            task_lock(settings, f"predictor-{int(predictor_id)}") as mine:
        return run_profile(settings, int(predictor_id), _dispatch) if mine else DUPLICATE


@app.task(name=MEASURE_TASK)
def profile_measure(job_id: int, device_id: int) -> str:
    """Re-measure a finished job's subnets on the device (on the device's queue)."""
    from workers.profile_job import run_measure
    from workers.recovery import task_lock

    settings = get_settings()
    with requeue_on_database_outage(f"measuring job {job_id}"), task_lock(settings, f"measure-{int(job_id)}") as mine:
        return run_measure(settings, int(job_id), int(device_id)) if mine else DUPLICATE
