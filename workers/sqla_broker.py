"""The embedded broker: kombu's SQLAlchemy transport with a cheaper publish and a bounded message table.

kombu's `_put` looks its queue row up through the ORM and adds the message through an ORM session on every
publish, about 3 ms of CPU here, which was most of a job submission's cost. This one remembers queue ids and
inserts with one Core statement in a short transaction of its own.

kombu marks a delivered message invisible and never deletes it: acknowledged, rejected and requeued messages (a
requeue inserts a copy) all stay, so the table grows with every task. This channel remembers the row of each
message it delivers and deletes it once the message is acknowledged, rejected or put back. The tables are kombu's,
so workers on either implementation share them. Selected by service.contracts.transport_and_url.
"""

from __future__ import annotations

from json import dumps, loads
from queue import Empty

from kombu.transport import sqlalchemy as kombu_sqla
from kombu.utils.encoding import bytes_to_str
from sqlalchemy import text


class Channel(kombu_sqla.Channel):
    """kombu's channel, publishing through a cached queue id and one INSERT, deleting messages once settled."""

    def __init__(self, connection, **kwargs):  # noqa: ANN001
        super().__init__(connection, **kwargs)
        self._queue_ids: dict[str, int] = {}
        self._rows: dict[str, int] = {}  # delivery tag -> kombu_message.id of messages delivered, not yet settled

    def _queue_id(self, queue: str) -> int:
        queue_id = self._queue_ids.get(queue)
        if queue_id is None:
            queue_id = self._queue_ids[queue] = self._get_or_create(queue).id
            self.session.commit()  # end the lookup's transaction: it would hold a WAL snapshot open
        return queue_id

    def _put(self, queue, payload, **kwargs) -> None:  # noqa: ANN001
        queue_id = self._queue_id(queue)
        engine, _ = self._open()
        with engine.begin() as conn:
            conn.execute(self.message_cls.__table__.insert(), {"payload": dumps(payload), "queue_id": queue_id})

    def _get(self, queue):  # noqa: ANN001, ANN202
        """kombu's `_get` (oldest visible message, marked invisible), also remembering the message's row."""
        queue_id = self._queue_id(queue)
        if self.session.bind.name == "sqlite":
            self.session.execute(text("BEGIN IMMEDIATE TRANSACTION"))
        try:
            msg = (self.session.query(self.message_cls).with_for_update()
                   .filter(self.message_cls.queue_id == queue_id, self.message_cls.visible != False)  # noqa: E712
                   .order_by(self.message_cls.sent_at, self.message_cls.id).limit(1).first())
            if not msg:
                raise Empty()
            msg.visible = False
            payload = loads(bytes_to_str(msg.payload))
            tag = (payload.get("properties") or {}).get("delivery_tag")
            if tag is not None:
                self._rows[tag] = msg.id
            return payload
        finally:
            self.session.commit()

    def basic_ack(self, delivery_tag, multiple=False) -> None:  # noqa: ANN001
        super().basic_ack(delivery_tag, multiple=multiple)
        self._delete_row(delivery_tag)

    def basic_reject(self, delivery_tag, requeue=False) -> None:  # noqa: ANN001
        super().basic_reject(delivery_tag, requeue=requeue)  # a requeue has inserted a copy (_restore)
        self._delete_row(delivery_tag)

    def _restore(self, message) -> None:  # noqa: ANN001
        super()._restore(message)  # the copy first: a crash in between leaves an extra invisible row, not a loss
        self._delete_row(message.delivery_tag)

    def _delete_row(self, delivery_tag: str) -> None:
        row = self._rows.pop(delivery_tag, None)
        if row is None:
            return
        engine, _ = self._open()
        table = self.message_cls.__table__
        with engine.begin() as conn:
            conn.execute(table.delete().where(table.c.id == row))


class Transport(kombu_sqla.Transport):
    """kombu's SQLAlchemy transport with `Channel`'s publish and clean-up."""

    Channel = Channel
    # How long an idle consumer waits before it looks for messages again; kombu's 1 s is also the gap between two
    # tasks of a worker (it polls again only after the ack), which dominated short tasks. A poll is one indexed
    # SELECT on the broker database.
    polling_interval = 0.2
