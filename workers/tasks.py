"""Celery tasks: an id in, the database and the artifact store out. The work lives in prune_job/profile_job."""

from __future__ import annotations

from celery.signals import worker_process_init

from service.db import dispose_engines
from service.settings import get_settings
from workers.celery_app import MEASURE_TASK, PROFILE_TASK, PRUNE_TASK, app


@worker_process_init.connect
def _fresh_connections(**_: object) -> None:
    # Pooled connections must not cross a fork.
    dispose_engines()


def _dispatch(task: str, args: list, queue: str) -> None:
    app.send_task(task, args=args, queue=queue)


@app.task(name=PRUNE_TASK)
def prune_run(job_id: int) -> str:
    """Run one pruning job (resumes from its checkpoints when redelivered)."""
    from workers.prune_job import run_job

    return run_job(get_settings(), int(job_id), _dispatch)


@app.task(name=PROFILE_TASK)
def profile_run(predictor_id: int) -> str:
    """Profile a device for one architecture and fit its LPNet (on the device's queue)."""
    from workers.profile_job import run_profile

    return run_profile(get_settings(), int(predictor_id), _dispatch)


@app.task(name=MEASURE_TASK)
def profile_measure(job_id: int, device_id: int) -> str:
    """Re-measure a finished job's subnets on the device (on the device's queue)."""
    from workers.profile_job import run_measure

    return run_measure(get_settings(), int(job_id), int(device_id))
