"""The embedded broker: its publish (one INSERT) stores what kombu's consumer reads, and settled messages leave
the table, also under a real worker running many tasks."""

from __future__ import annotations

import base64
import json
import os
import time

import pytest
from sqlalchemy import create_engine, text

from service.contracts import PRUNE_TASK, SQLA_TRANSPORT, make_producer, transport_and_url
from service.migrate import upgrade
from service.settings import Settings
from tests.workers.conftest import start_worker, stop_worker, wait_for
from workers.celery_app import make_celery
from workers.recovery import purge_delivered
from workers.sqla_broker import Transport


def test_transport_choice():
    assert transport_and_url("sqla+sqlite:////x/broker.db") == (SQLA_TRANSPORT, "sqlite:////x/broker.db")
    # kombu would split a driver-qualified database URL again at its "+": those keep kombu's transport.
    assert transport_and_url("sqla+postgresql+psycopg://u@h/db") == (None, "sqla+postgresql+psycopg://u@h/db")
    assert transport_and_url("redis://h:6379/0") == (None, "redis://h:6379/0")


def _rows(settings: Settings) -> tuple[int, int]:
    """(visible, delivered) rows of the broker's message table."""
    engine = create_engine(settings.broker_url.removeprefix("sqla+"))
    try:
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT visible, count(*) FROM kombu_message GROUP BY visible")).all()
    finally:
        engine.dispose()
    counts = {bool(v): n for v, n in rows}
    return counts.get(True, 0), counts.get(False, 0)


def test_published_task_is_consumed_by_kombus_channel(tmp_path):
    settings = Settings(home=tmp_path)
    make_producer(settings).send_task(PRUNE_TASK, args=[3], queue="prune")  # the API's producer
    make_producer(settings).send_task(PRUNE_TASK, args=[4], queue="prune")
    with make_celery(settings).connection_for_read() as conn:  # the worker's side
        channel = conn.default_channel
        assert isinstance(conn.transport, Transport)
        got = [channel._get("prune") for _ in range(2)]  # kombu's consume path
    assert [m["headers"]["task"] for m in got] == [PRUNE_TASK, PRUNE_TASK]
    assert [json.loads(base64.b64decode(m["body"]))[0] for m in got] == [[3], [4]]


def test_settled_messages_leave_the_table(tmp_path):
    settings = Settings(home=tmp_path)
    producer = make_producer(settings)
    for job_id in range(4):
        producer.send_task(PRUNE_TASK, args=[job_id], queue="prune")
    with make_celery(settings).connection_for_read() as conn:
        channel = conn.default_channel
        acked, rejected, requeued, held = (channel.basic_get("prune") for _ in range(4))
        acked.ack()
        rejected.reject()
        requeued.reject(requeue=True)  # back in the queue as a new row
        assert _rows(settings) == (1, 1)  # the requeued copy, and the message still held
        channel.qos.restore_unacked()  # a worker shutting down hands `held` back
        assert _rows(settings) == (2, 0)
        again = channel.basic_get("prune")
        assert json.loads(again.body)[0] == [2]  # the requeued one, delivered once more
        assert _rows(settings) == (1, 1)
        # A worker killed while holding a message leaves its row; a starting worker deletes every delivered row,
        # which costs a live holder nothing: it keeps the message in memory and hands it back from there.
        assert purge_delivered(settings.broker_url) == 1 and _rows(settings) == (1, 0)
    assert _rows(settings) == (2, 0)  # closing the channel handed `again` back


def _run_many_tasks(tmp_path, n: int) -> None:
    settings = Settings(home=tmp_path)
    upgrade(settings.database_url)
    env = {**os.environ, "LATPRUNE_HOME": str(tmp_path), "OMP_NUM_THREADS": "1"}
    worker = start_worker(env, "prune", tmp_path / "worker.log")
    try:
        producer = make_producer(settings)
        started = time.monotonic()
        for i in range(n):  # ids of no job: each task looks its job up, finds none and is acknowledged
            producer.send_task(PRUNE_TASK, args=[10_000_000 + i], queue="prune")
        log = tmp_path / "worker.log"
        wait_for(lambda: log.read_text().count("succeeded in") >= n, 30 + n, f"{n} tasks to run (log in {log})",
                 poll_s=0.5)
        visible, delivered = _rows(settings)
        print(f"{n} tasks in {time.monotonic() - started:.1f} s; broker rows left: {visible} waiting, "
              f"{delivered} delivered")
        assert (visible, delivered) == (0, 0)
    finally:
        stop_worker(worker)


@pytest.mark.slow
def test_table_stays_bounded_under_a_worker(tmp_path):
    _run_many_tasks(tmp_path, 10)


@pytest.mark.slow
def test_table_stays_bounded_after_200_tasks(tmp_path):
    _run_many_tasks(tmp_path, 200)
