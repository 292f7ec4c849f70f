"""Progress and cancellation between the engine's callbacks and the database, throttled."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

from sqlalchemy import update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from service.models import Job, JobEvent
from workers.dbretry import is_outage

log = logging.getLogger(__name__)


def _finite(value: object) -> float | None:
    if value is None:
        return None
    number = float(value)  # type: ignore[arg-type]
    return number if math.isfinite(number) else None


class JobProgress:
    """The engine's `progress` callback for one job: updates the job row and appends events.

    Writes at most one row per `interval_s`, except that the first event of a stage or an epoch and the last
    step of a stage are always written, so the stored history shows every stage, epoch and final loss.
    """

    def __init__(self, sessions: sessionmaker[Session], job_id: int, interval_s: float,
                 clock: Callable[[], float] = time.monotonic):
        self.sessions, self.job_id, self.interval_s, self.clock = sessions, job_id, interval_s, clock
        self.last_write = -math.inf
        self.last_stage: str | None = None
        self.last_epoch: int | None = None

    def __call__(self, event: dict) -> None:
        stage, epoch = event.get("stage"), event.get("epoch")
        fraction = min(max(float(event.get("fraction") or 0.0), 0.0), 1.0)
        now = self.clock()
        stage_done = event.get("steps") is not None and event.get("step") == event.get("steps")
        milestone = stage != self.last_stage or epoch != self.last_epoch or stage_done or fraction >= 1.0
        if not milestone and now - self.last_write < self.interval_s:
            return
        self.last_write, self.last_stage, self.last_epoch = now, stage, epoch
        data = {"stage": stage, "fraction": fraction, "epoch": event.get("epoch"), "epochs": event.get("epochs"),
                "step": event.get("step"), "steps": event.get("steps"), "loss": _finite(event.get("loss")),
                "cost": _finite(event.get("cost"))}
        values: dict = {"progress": fraction, "stage": stage}
        for key in ("epoch", "loss", "cost"):
            if data[key] is not None:
                values[key] = data[key]
        try:
            with self.sessions.begin() as session:
                session.execute(update(Job).where(Job.id == self.job_id).values(**values))
                session.add(JobEvent(job_id=self.job_id, kind="progress", data=data))
        except DBAPIError as exc:
            if not is_outage(exc):
                raise
            # Progress is advisory: the run goes on through a database restart and the next event catches up.
            log.warning("progress of job %s not stored: database unreachable", self.job_id)


class CancelFlag:
    """The engine's `should_cancel` callback: reads the job's cancel flag at most once per `interval_s`."""

    def __init__(self, sessions: sessionmaker[Session], job_id: int, interval_s: float,
                 clock: Callable[[], float] = time.monotonic):
        self.sessions, self.job_id, self.interval_s, self.clock = sessions, job_id, interval_s, clock
        self.last_read = -math.inf
        self.cancelled = False

    def __call__(self) -> bool:
        if self.cancelled:
            return True
        now = self.clock()
        if now - self.last_read >= self.interval_s:
            self.last_read = now
            try:
                with self.sessions() as session:
                    job = session.get(Job, self.job_id)
                    self.cancelled = bool(job is None or job.cancel_requested)
            except DBAPIError as exc:
                if not is_outage(exc):
                    raise
                log.warning("cancel flag of job %s not read: database unreachable", self.job_id)
        return self.cancelled
