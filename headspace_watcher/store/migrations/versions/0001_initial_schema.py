"""Initial schema: exactly what db.py's metadata.create_all made before migrations.

Databases created by that code are stamped at this revision (db.init_db), not re-created;
constraint names are PostgreSQL's defaults, the names create_all got.

Revision ID: 0001
Revises:
Create Date: 2026-12-01 09:54:53.479652
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "headspace_schema",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column(
            "upgraded_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("id", name="headspace_schema_pkey"),
    )
    op.create_table(
        "projects",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("id", name="projects_pkey"),
        sa.UniqueConstraint("path", name="projects_path_key"),
    )
    op.create_table(
        "sources",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("inode", sa.BigInteger(), nullable=False),
        sa.Column("device", sa.BigInteger(), nullable=False),
        sa.Column("generation", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("committed_offset", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("fingerprint", sa.LargeBinary(), nullable=True),
        sa.Column("lines_committed", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("id", name="sources_pkey"),
        sa.UniqueConstraint("path", name="sources_path_key"),
    )
    op.create_table(
        "watcher_heartbeats",
        sa.Column("watcher_id", sa.Text(), nullable=False),
        sa.Column("host", sa.Text(), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("beat_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("state", sa.Text(), nullable=False),
        sa.Column("health", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.PrimaryKeyConstraint("watcher_id", name="watcher_heartbeats_pkey"),
    )
    op.create_table(
        "agents",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("session_uuid", sa.Text(), nullable=False),
        sa.Column("project_id", sa.BigInteger(), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(["project_id"], ["projects.id"], name="agents_project_id_fkey"),
        sa.PrimaryKeyConstraint("id", name="agents_pkey"),
        sa.UniqueConstraint("session_uuid", name="agents_session_uuid_key"),
    )
    op.create_table(
        "rejected_events",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("source_path", sa.Text(), nullable=True),
        sa.Column("byte_offset", sa.BigInteger(), nullable=True),
        sa.Column("raw_text", sa.Text(), nullable=False),
        sa.Column("raw_length", sa.BigInteger(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("event_type", sa.Text(), nullable=True),
        sa.Column("details", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column("source_id", sa.BigInteger(), nullable=True),
        sa.Column("source_generation", sa.Integer(), nullable=True),
        sa.Column("source_seq", sa.Integer(), nullable=True),
        sa.Column(
            "rejected_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["source_id"], ["sources.id"], name="rejected_events_source_id_fkey"
        ),
        sa.PrimaryKeyConstraint("id", name="rejected_events_pkey"),
    )
    op.create_index("ix_rejected_at", "rejected_events", ["rejected_at"], unique=False)
    op.create_index(
        "ux_rejected_source_position",
        "rejected_events",
        ["source_id", "source_generation", "byte_offset", "source_seq"],
        unique=True,
    )
    op.create_table(
        "events",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("timestamp", sa.DateTime(timezone=True), nullable=False),
        sa.Column("event_type", sa.Text(), nullable=False),
        sa.Column("payload", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("project_id", sa.BigInteger(), nullable=True),
        sa.Column("agent_id", sa.BigInteger(), nullable=True),
        sa.Column("task_id", sa.BigInteger(), nullable=True),
        sa.Column("turn_id", sa.BigInteger(), nullable=True),
        sa.Column("source_id", sa.BigInteger(), nullable=True),
        sa.Column("source_generation", sa.Integer(), nullable=True),
        sa.Column("source_offset", sa.BigInteger(), nullable=True),
        sa.Column("source_seq", sa.Integer(), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(["agent_id"], ["agents.id"], name="events_agent_id_fkey"),
        sa.ForeignKeyConstraint(["project_id"], ["projects.id"], name="events_project_id_fkey"),
        sa.ForeignKeyConstraint(["source_id"], ["sources.id"], name="events_source_id_fkey"),
        sa.PrimaryKeyConstraint("id", name="events_pkey"),
    )
    op.create_index("ix_events_agent_ts", "events", ["agent_id", "timestamp"], unique=False)
    op.create_index("ix_events_project_ts", "events", ["project_id", "timestamp"], unique=False)
    op.create_index("ix_events_type_ts", "events", ["event_type", "timestamp"], unique=False)
    op.create_index(
        "ux_events_source_position",
        "events",
        ["source_id", "source_generation", "source_offset", "source_seq"],
        unique=True,
    )
    op.create_table(
        "sessions",
        sa.Column("session_uuid", sa.Text(), nullable=False),
        sa.Column("project_id", sa.BigInteger(), nullable=True),
        sa.Column("agent_id", sa.BigInteger(), nullable=True),
        sa.Column("state", sa.Text(), nullable=False),
        sa.Column("epoch", sa.Integer(), server_default=sa.text("1"), nullable=False),
        sa.Column("registered_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_activity_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("end_reason", sa.Text(), nullable=True),
        sa.Column("monitored", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("project_path", sa.Text(), nullable=True),
        sa.Column("working_directory", sa.Text(), nullable=True),
        sa.Column("iterm_pane_id", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(["agent_id"], ["agents.id"], name="sessions_agent_id_fkey"),
        sa.ForeignKeyConstraint(["project_id"], ["projects.id"], name="sessions_project_id_fkey"),
        sa.PrimaryKeyConstraint("session_uuid", name="sessions_pkey"),
    )
    op.create_index("ix_sessions_state", "sessions", ["state"], unique=False)


def downgrade() -> None:
    raise NotImplementedError("the baseline is never downgraded: that would drop every table")
