"""A database outage under a running job: final writes are retried until the database answers, progress writes
and cancel-flag reads are skipped meanwhile, and other database errors are not hidden."""

from __future__ import annotations

import pytest
from sqlalchemy.exc import IntegrityError, OperationalError

from workers.dbretry import retry_db
from workers.progress import CancelFlag, JobProgress


def _down() -> OperationalError:
    return OperationalError("SELECT 1", {}, ConnectionRefusedError("connection refused"))


def test_retries_until_the_database_answers():
    calls, slept = [], []

    def write() -> str:
        calls.append(1)
        if len(calls) < 4:
            raise _down()
        return "done"

    assert retry_db("finishing job 1", write, sleep=slept.append, clock=lambda: sum(slept)) == "done"
    assert slept == [0.5, 1.0, 2.0]


def test_gives_up_after_the_wait_and_never_retries_other_errors():
    slept: list[float] = []

    def down() -> None:
        raise _down()

    with pytest.raises(OperationalError):
        retry_db("x", down, wait_s=20, sleep=slept.append, clock=lambda: sum(slept))
    assert 10 < sum(slept) <= 20
    calls = []

    def duplicate() -> None:
        calls.append(1)
        raise IntegrityError("INSERT", {}, ValueError("duplicate key"))

    with pytest.raises(IntegrityError):
        retry_db("x", duplicate, sleep=lambda s: pytest.fail("retried a constraint error"))
    assert len(calls) == 1


class _Unreachable:
    """A sessionmaker whose database is down."""

    def __call__(self):  # noqa: ANN204
        raise _down()

    def begin(self):  # noqa: ANN201
        raise _down()


def test_progress_and_cancel_flag_ride_out_an_outage():
    progress = JobProgress(_Unreachable(), 1, 0.0)
    progress({"stage": "dense", "fraction": 0.5, "epoch": 1})  # skipped, no exception
    flag = CancelFlag(_Unreachable(), 1, 0.0)
    assert flag() is False
