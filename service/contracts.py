"""What the API and the workers agree on: task names, queue names and how to reach the broker.

The API process sends tasks with this alone: it never imports the workers' Celery app or tasks (they pull in the
engine and torch). Stdlib only at import time.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from service.settings import Settings

PRUNE_TASK = "prune.run"  # (job_id)
PROFILE_TASK = "profile.run"  # (predictor_id), on the device's queue
MEASURE_TASK = "profile.measure"  # (job_id, device_id), on the device's queue

# The embedded broker's transport (kombu's SQLAlchemy transport with a cheaper publish), named so that kombu imports
# it only when a connection is opened.
SQLA_TRANSPORT = "workers.sqla_broker:Transport"
SQLA_PREFIX = "sqla+"


def profile_queue(device_id: int) -> str:
    """The queue a device's own workers consume (profiling and re-measuring run on that hardware).

    Derived from the device's id, not its name: names are unique per tenant only, and two tenants' devices called
    "cpu" must not share a queue (the other tenant's hardware would time the models).
    """
    return f"profile.device-{int(device_id)}"


def transport_and_url(broker_url: str) -> tuple[str | None, str]:
    """(transport, URL for kombu) of a broker URL: `sqla+<database URL>` selects the embedded transport.

    Not when the database URL names a driver (`sqla+postgresql+psycopg://`): kombu would split that URL again at
    its `+`, so those keep kombu's own transport and URL.
    """
    database_url = broker_url.removeprefix(SQLA_PREFIX)
    if broker_url.startswith(SQLA_PREFIX) and "+" not in database_url.split("://", 1)[0]:
        return SQLA_TRANSPORT, database_url
    return None, broker_url


def sqlite_broker_options(broker_url: str) -> dict:
    """Engine options for the embedded broker on SQLite: connections in WAL mode with synchronous=NORMAL (kombu
    opens its own; with SQLite's defaults every published message costs several fsyncs, 10-20 ms here). A power
    loss may drop the last messages; a crashed process loses nothing."""
    import sqlite3

    from sqlalchemy.engine import make_url

    path = make_url(broker_url.removeprefix(SQLA_PREFIX)).database
    if not path or path == ":memory:":
        return {}
    Path(path).parent.mkdir(parents=True, exist_ok=True)

    def connect() -> sqlite3.Connection:
        conn = sqlite3.connect(path, timeout=30, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn

    return {"creator": connect}


def broker_conf(settings: Settings) -> dict[str, Any]:
    """Celery settings shared by every producer and consumer: broker, transport options, JSON only."""
    transport, url = transport_and_url(settings.broker_url)
    # kombu's SQLAlchemy transport hands every transport option to create_engine() and has no visibility timeout
    # (see workers.recovery); Redis redelivers unacknowledged tasks after it.
    if settings.broker_url.startswith("sqla+sqlite"):
        options = sqlite_broker_options(settings.broker_url)
    elif settings.is_embedded_broker:
        options = {}
    else:
        # kombu scans for tasks past their visibility timeout every 10 s but, by default, acts on every 10th scan
        # only: a dead worker's task came back up to 100 s late. One ZRANGE per 10 s is cheap.
        options = {"visibility_timeout": settings.visibility_timeout_s, "unacked_restore_throttle": 1}
    return {"broker_url": url, "broker_transport": transport, "broker_transport_options": options,
            "broker_connection_retry_on_startup": True, "task_serializer": "json", "result_serializer": "json",
            "accept_content": ["json"], "task_ignore_result": True, "result_backend": None,
            "task_send_sent_event": False}


def make_producer(settings: Settings):  # noqa: ANN201 - celery.Celery, imported lazily
    """A Celery app that only sends tasks by name (the API's)."""
    from celery import Celery

    producer = Celery("latprune", set_as_current=False)
    producer.conf.update(broker_conf(settings))
    return producer
