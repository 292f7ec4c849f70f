"""Riding out a database restart: what a task writes at the end of a long run is retried until the database
answers again, and progress writes missed meanwhile are skipped.

Without this a PostgreSQL restart under a running job failed the job's last write, the task ended with the
exception, the broker forgot the message and the job stayed `running` for good.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

log = logging.getLogger(__name__)
T = TypeVar("T")
# How long a task waits for the database before it gives up and hands its task back to the broker.
WAIT_S = 300.0


def is_outage(exc: BaseException) -> bool:
    """Whether `exc` says the database could not be reached (as opposed to a bad statement or a constraint)."""
    if isinstance(exc, OperationalError | InterfaceError):
        return True
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)


def retry_db(what: str, fn: Callable[[], T], wait_s: float = WAIT_S, sleep: Callable[[float], None] = time.sleep,
             clock: Callable[[], float] = time.monotonic) -> T:
    """`fn()`, run again (each time in a new transaction: `fn` opens its own) while the database is unreachable,
    for up to `wait_s` seconds; then the last error is raised."""
    deadline, delay = clock() + wait_s, 0.5
    while True:
        try:
            return fn()
        except DBAPIError as exc:
            if not is_outage(exc) or clock() + delay > deadline:
                raise
            log.warning("database unreachable while %s (%s); trying again in %.1f s", what,
                        str(exc.orig or exc).splitlines()[0], delay)
            sleep(delay)
            delay = min(delay * 2, 10.0)
