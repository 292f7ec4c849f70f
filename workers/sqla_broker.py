"""The embedded broker: kombu's SQLAlchemy transport with a cheaper publish.

kombu's `_put` looks its queue row up through the ORM and adds the message through an ORM session on every
publish, about 3 ms of CPU here, which was most of a job submission's cost. This one remembers queue ids and
inserts with one Core statement in a short transaction of its own. Consuming is kombu's own. The tables are
kombu's, so workers on either implementation share them. Selected by service.contracts.transport_and_url.
"""

from __future__ import annotations

from json import dumps

from kombu.transport import sqlalchemy as kombu_sqla


class Channel(kombu_sqla.Channel):
    """kombu's channel, publishing through a cached queue id and one INSERT."""

    def __init__(self, connection, **kwargs):  # noqa: ANN001
        super().__init__(connection, **kwargs)
        self._queue_ids: dict[str, int] = {}

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


class Transport(kombu_sqla.Transport):
    """kombu's SQLAlchemy transport with `Channel`'s publish."""

    Channel = Channel
