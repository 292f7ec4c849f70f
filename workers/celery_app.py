"""The Celery application: JSON only, late acks, one task at a time per process, explicit queues."""

from __future__ import annotations

from celery import Celery
from kombu import Queue

from service.settings import Settings, get_settings

PRUNE_TASK = "prune.run"
PROFILE_TASK = "profile.run"
MEASURE_TASK = "profile.measure"


def profile_queue(device_name: str) -> str:
    """The queue a device's own workers consume (profiling and re-measuring run on that hardware)."""
    return f"profile.{device_name}"


def make_celery(settings: Settings) -> Celery:
    """A Celery app for `settings` (broker URL, queue names, visibility timeout)."""
    app = Celery("latprune", broker=settings.broker_url, set_as_current=False, include=["workers.tasks"])
    # kombu's SQLAlchemy transport hands every transport option to create_engine() and has no visibility
    # timeout (unacked messages are restored when the worker shuts down); Redis redelivers after it.
    transport_options = {} if settings.is_embedded_broker else {"visibility_timeout": settings.visibility_timeout_s}
    app.conf.update(
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
    return app


# `celery -A workers.celery_app worker` finds this; the settings come from LATPRUNE_* variables.
app = make_celery(get_settings())
