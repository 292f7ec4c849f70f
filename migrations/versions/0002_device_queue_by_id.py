"""device profile queues named by device id

Revision ID: 0002_device_queue
Revises: 0001
Create Date: 2026-12-06 04:40:00

Device names are unique per tenant only, so `profile.<name>` let two tenants' devices of the same name share a
queue (and one tenant's hardware time the other's models). Every device now has `profile.device-<id>`; workers
started with `-Q profile.<name>` must be restarted with the queue shown by GET /v1/devices/{id}.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002_device_queue"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    device = sa.table("device", sa.column("id", sa.Integer), sa.column("queue", sa.String))
    op.execute(device.update().values(queue=sa.literal("profile.device-") + sa.cast(device.c.id, sa.String)))


def downgrade() -> None:
    device = sa.table("device", sa.column("name", sa.String), sa.column("queue", sa.String))
    op.execute(device.update().values(queue=sa.literal("profile.") + device.c.name))
