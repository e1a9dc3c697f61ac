"""Events of in-process producers get an idempotency key; streams keep their raw name.

``events.idempotency_key``: an event without a stream position had no duplicate protection
at all (NULL columns escape the position index); the key's unique index makes a second write
with the same key a no-op (the producer API). ``sources.path_bytes``: a file name that is not
UTF-8 is stored escaped in ``path`` (PostgreSQL text cannot hold it) and exactly here.
Additive and nullable: rows written before keep NULL.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01 10:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("events", sa.Column("idempotency_key", sa.Text(), nullable=True))
    op.create_index("ux_events_idempotency_key", "events", ["idempotency_key"], unique=True)
    op.add_column("sources", sa.Column("path_bytes", sa.LargeBinary(), nullable=True))


def downgrade() -> None:
    op.drop_column("sources", "path_bytes")
    op.drop_index("ux_events_idempotency_key", table_name="events")
    op.drop_column("events", "idempotency_key")
