"""The Celery application: JSON only, late acks, one task at a time per process, explicit queues."""

from __future__ import annotations

import logging
from pathlib import Path

from celery import Celery, bootsteps
from kombu import Queue

from service.settings import Settings, get_settings
from workers.sqla_broker import transport_and_url

PRUNE_TASK = "prune.run"
PROFILE_TASK = "profile.run"
MEASURE_TASK = "profile.measure"


def profile_queue(device_name: str) -> str:
    """The queue a device's own workers consume (profiling and re-measuring run on that hardware)."""
    return f"profile.{device_name}"


class DeviceQueues(bootsteps.StartStopStep):
    """Consumer step of the one-machine worker: also consume profile.<device> of every registered device.

    Devices registered after the worker started are picked up within `SYNC_S` seconds.
    """

    requires = {"celery.worker.consumer.tasks:Tasks"}
    SYNC_S = 3.0

    def __init__(self, parent, **kwargs):  # noqa: ANN001
        super().__init__(parent, **kwargs)
        self.known: set[str] = set()
        self.timer_ref = None

    def start(self, consumer) -> None:  # noqa: ANN001
        self.sync(consumer)
        self.timer_ref = consumer.timer.call_repeatedly(self.SYNC_S, self.sync, (consumer,), priority=10)

    def stop(self, consumer) -> None:  # noqa: ANN001
        if self.timer_ref is not None:
            self.timer_ref.cancel()

    def sync(self, consumer) -> None:  # noqa: ANN001
        from sqlalchemy import select

        from service.db import session_factory
        from service.models import Device

        try:
            with session_factory(get_settings().database_url)() as session:
                queues = set(session.scalars(select(Device.queue).distinct()))
        except Exception:  # noqa: BLE001 - the database may not be migrated yet; try again later
            logging.getLogger(__name__).warning("cannot list device queues yet", exc_info=True)
            return
        for queue in sorted(queues - self.known):
            # The timer may run on its own thread; the broker channel must only be used from the consumer loop.
            consumer.call_soon(consumer.add_task_queue, queue)
            self.known.add(queue)


def sqlite_broker_options(broker_url: str) -> dict:
    """Transport options for kombu's SQLAlchemy transport on SQLite: connections in WAL mode with
    synchronous=NORMAL (kombu opens its own; with SQLite's defaults every published message costs several
    fsyncs, 10-20 ms here). A power loss may drop the last messages; a crashed process loses nothing."""
    import sqlite3

    from sqlalchemy.engine import make_url

    path = make_url(broker_url.removeprefix("sqla+")).database
    if not path or path == ":memory:":
        return {}
    Path(path).parent.mkdir(parents=True, exist_ok=True)

    def connect() -> sqlite3.Connection:
        conn = sqlite3.connect(path, timeout=30, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn

    return {"creator": connect}


def make_celery(settings: Settings) -> Celery:
    """A Celery app for `settings` (broker URL, queue names, visibility timeout)."""
    transport, broker_url = transport_and_url(settings.broker_url)
    app = Celery("latprune", broker=broker_url, set_as_current=False, include=["workers.tasks"])
    # kombu's SQLAlchemy transport hands every transport option to create_engine() and has no visibility
    # timeout (unacked messages are restored when the worker shuts down); Redis redelivers after it.
    if settings.broker_url.startswith("sqla+sqlite"):
        transport_options = sqlite_broker_options(settings.broker_url)
    elif settings.is_embedded_broker:
        transport_options = {}
    else:
        transport_options = {"visibility_timeout": settings.visibility_timeout_s}
    app.conf.update(
        broker_transport=transport,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        result_backend=None,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        task_default_queue=settings.prune_queue,
        task_queues=[Queue(settings.prune_queue)],
        task_create_missing_queues=True,
        task_routes={PRUNE_TASK: {"queue": settings.prune_queue}},
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        task_send_sent_event=False,
    )
    if settings.worker_all_device_queues:
        app.steps["consumer"].add(DeviceQueues)
    return app


# `celery -A workers.celery_app worker` finds this; the settings come from LATPRUNE_* variables.
app = make_celery(get_settings())
