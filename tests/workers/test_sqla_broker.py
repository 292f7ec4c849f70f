"""The embedded broker's publish (one INSERT) stores what kombu's own consumer reads."""

from __future__ import annotations

import base64
import json

from service.contracts import PRUNE_TASK, SQLA_TRANSPORT, transport_and_url
from service.settings import Settings
from workers.celery_app import make_celery
from workers.sqla_broker import Transport


def test_transport_choice():
    assert transport_and_url("sqla+sqlite:////x/broker.db") == (SQLA_TRANSPORT, "sqlite:////x/broker.db")
    # kombu would split a driver-qualified database URL again at its "+": those keep kombu's transport.
    assert transport_and_url("sqla+postgresql+psycopg://u@h/db") == (None, "sqla+postgresql+psycopg://u@h/db")
    assert transport_and_url("redis://h:6379/0") == (None, "redis://h:6379/0")


def test_published_task_is_consumed_by_kombus_channel(tmp_path):
    celery = make_celery(Settings(home=tmp_path))
    celery.send_task(PRUNE_TASK, args=[3], queue="prune")
    celery.send_task(PRUNE_TASK, args=[4], queue="prune")
    with celery.connection_for_read() as conn:
        channel = conn.default_channel
        assert isinstance(conn.transport, Transport)
        got = [channel._get("prune") for _ in range(2)]  # kombu's own consume path (the worker's)
    assert [m["headers"]["task"] for m in got] == [PRUNE_TASK, PRUNE_TASK]
    assert [json.loads(base64.b64decode(m["body"]))[0] for m in got] == [[3], [4]]
