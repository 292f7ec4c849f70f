"""The Celery application: JSON only, late acks, one task at a time per process, explicit queues."""

from __future__ import annotations

import logging

from celery import Celery, bootsteps
from kombu import Queue

from service.contracts import PRUNE_TASK, broker_conf
from service.settings import Settings, get_settings


class DeviceQueues(bootsteps.StartStopStep):
    """Consumer step of the one-machine worker: also consume the profile queue of every registered device.

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


def make_celery(settings: Settings) -> Celery:
    """The workers' Celery app for `settings` (broker and queues from service.contracts)."""
    app = Celery("latprune", set_as_current=False, include=["workers.tasks"])
    app.conf.update(
        broker_conf(settings),
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue=settings.prune_queue,
        task_queues=[Queue(settings.prune_queue)],
        task_create_missing_queues=True,
        task_routes={PRUNE_TASK: {"queue": settings.prune_queue}},
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )
    if settings.worker_all_device_queues:
        app.steps["consumer"].add(DeviceQueues)
    return app


# `celery -A workers.celery_app worker` finds this; the settings come from LATPRUNE_* variables.
app = make_celery(get_settings())
