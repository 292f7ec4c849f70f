"""Tasks the embedded broker lost, published again when a worker starts.

kombu's SQLAlchemy transport marks a message invisible when a worker takes it and remembers it only in that
worker's memory. The worker hands it back when it stops cleanly or when one of its pool processes dies (reject
and requeue), but if the worker process itself is killed (SIGKILL, out of memory, `latprune up` killing a worker
that would not stop) the message stays invisible for good, and its job would stay queued or running. Redis has no
such hole: unacknowledged messages come back after the visibility timeout.

So on the embedded broker every task runs under a per-job (or per-predictor) file lock, which the kernel releases
when its process dies, and a starting worker publishes again every unfinished job, re-measurement and profiling
run whose task is not live: no visible message for it in the broker and no process holding its lock. A task that
finds its lock taken (a duplicate) returns at once; a job started again counts an attempt as a redelivered one
does, so the "lost max_attempts times -> failed" rule bounds the restarts. One machine only: the locks are local
files, as the embedded broker's database is.
"""

from __future__ import annotations

import base64
import fcntl
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Engine, create_engine, select, text
from sqlalchemy.exc import OperationalError

from service.contracts import MEASURE_TASK, PROFILE_TASK, PRUNE_TASK, sqlite_broker_options
from service.db import session_factory
from service.deps import Dispatcher
from service.models import Device, Job, Predictor
from service.settings import Settings
from workers.prune_job import MEASURING

log = logging.getLogger(__name__)


def lock_path(settings: Settings, name: str) -> Path:
    """The lock file of one task's subject ("job-7", "measure-7", "predictor-3")."""
    return settings.home / "run" / f"{name}.lock"


@contextmanager
def task_lock(settings: Settings, name: str) -> Iterator[bool]:
    """Hold `name`'s lock while the block runs; yields False (holding nothing) if another live process has it.

    Only on the embedded broker (elsewhere it always yields True): see the module docstring.
    """
    if not settings.is_embedded_broker:
        yield True
        return
    path = lock_path(settings, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)  # releases the lock


def lock_held(settings: Settings, name: str) -> bool:
    """True if a live process holds `name`'s lock."""
    path = lock_path(settings, name)
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _broker_engine(broker_url: str) -> Engine:
    options = sqlite_broker_options(broker_url) if broker_url.startswith("sqla+sqlite") else {}
    return create_engine(broker_url.removeprefix("sqla+"), **options)


def purge_delivered(broker_url: str) -> int:
    """Delete the embedded broker's delivered messages (invisible rows); returns how many.

    A delivered message is never delivered again by kombu, so its row only matters to the worker holding it, which
    keeps the message itself in memory. The rows of a killed worker's messages would stay for good.
    """
    engine = _broker_engine(broker_url)
    try:
        with engine.begin() as conn:
            return conn.execute(text("DELETE FROM kombu_message WHERE NOT visible")).rowcount
    except OperationalError:  # no tables yet: kombu creates them on first use
        return 0
    finally:
        engine.dispose()


def pending_tasks(broker_url: str) -> set[tuple[str, int]]:
    """(task name, first argument) of every message still waiting in the embedded broker's queues."""
    engine = _broker_engine(broker_url)
    try:
        with engine.connect() as conn:
            payloads = conn.execute(text("SELECT payload FROM kombu_message WHERE visible")).scalars().all()
    except OperationalError:  # no tables yet: kombu creates them on first use
        return set()
    finally:
        engine.dispose()
    pending = set()
    for payload in payloads:
        try:
            message = json.loads(payload)
            body = message["body"]
            if (message.get("properties") or {}).get("body_encoding") == "base64":
                body = base64.b64decode(body)
            args = json.loads(body)[0]
            pending.add((message["headers"]["task"], int(args[0])))
        except (KeyError, IndexError, TypeError, ValueError):
            continue  # not one of our tasks
    return pending


def lost_tasks(settings: Settings) -> list[tuple[str, list, str, str]]:
    """(task, args, queue, lock name) of every unfinished job, re-measurement and profiling run whose task is not
    live."""
    pending = pending_tasks(settings.broker_url)
    candidates: list[tuple[str, list, str, str]] = []
    with session_factory(settings.database_url)() as session:
        for job in session.scalars(select(Job).where(Job.state.in_(("queued", "running")))):
            if job.state == "running" and job.stage == MEASURING:
                device = session.get(Device, job.budget_device_id) if job.budget_device_id else None
                if device is not None:
                    candidates.append((MEASURE_TASK, [job.id, device.id], device.queue, f"measure-{job.id}"))
            else:
                # Also jobs awaiting a predictor: started again, they wait again without using an attempt, or run
                # if the profile finished but its wake-up was lost.
                candidates.append((PRUNE_TASK, [job.id], settings.prune_queue, f"job-{job.id}"))
        rows = session.execute(select(Predictor.id, Device.queue).join(Device, Device.id == Predictor.device_id)
                               .where(Predictor.state.in_(("queued", "running")))).all()
        candidates += [(PROFILE_TASK, [pid], queue, f"predictor-{pid}") for pid, queue in rows]
    return [c for c in candidates if (c[0], c[1][0]) not in pending and not lock_held(settings, c[3])]


def recover_lost_tasks(settings: Settings, dispatch: Dispatcher) -> int:
    """Publish every lost task again (embedded broker only); returns how many."""
    if not settings.is_embedded_broker:
        return 0
    lost = lost_tasks(settings)
    for task, args, queue, _ in lost:
        log.warning("publishing %s%s again on %s: its task was lost with a killed worker", task, args, queue)
        dispatch(task, args, queue)
    purged = purge_delivered(settings.broker_url)
    if purged:
        log.info("deleted %d delivered messages left in the broker by stopped workers", purged)
    return len(lost)
