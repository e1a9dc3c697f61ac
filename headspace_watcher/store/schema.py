"""The database schema (SQLAlchemy Core tables): what every statement of the store uses.

Migrations (``store.migrate``) bring a database to this shape; the tables here are the
single description of it that the code and the drift test compare against.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    ForeignKey,
    Identity,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    Table,
    Text,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB

metadata = MetaData()

projects = Table(
    "projects",
    metadata,
    Column("id", BigInteger, Identity(), primary_key=True),
    Column("path", Text, nullable=False, unique=True),
    Column("name", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

agents = Table(
    "agents",
    metadata,
    Column("id", BigInteger, Identity(), primary_key=True),
    Column("session_uuid", Text, nullable=False, unique=True),
    Column("project_id", BigInteger, ForeignKey("projects.id"), nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

sources = Table(
    "sources",
    metadata,
    Column("id", BigInteger, Identity(), primary_key=True),
    Column("path", Text, nullable=False, unique=True),
    # the file name's bytes when they are not UTF-8 (``path`` then holds them escaped)
    Column("path_bytes", LargeBinary, nullable=True),
    Column("inode", BigInteger, nullable=False),
    Column("device", BigInteger, nullable=False),
    Column("generation", Integer, nullable=False, server_default=text("0")),
    Column("committed_offset", BigInteger, nullable=False, server_default=text("0")),
    Column("fingerprint", LargeBinary, nullable=True),
    Column("lines_committed", BigInteger, nullable=False, server_default=text("0")),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

events = Table(
    "events",
    metadata,
    Column("id", BigInteger, Identity(), primary_key=True),
    Column("timestamp", DateTime(timezone=True), nullable=False),
    Column("event_type", Text, nullable=False),
    Column("payload", JSONB, nullable=False),
    Column("project_id", BigInteger, ForeignKey("projects.id"), nullable=True),
    Column("agent_id", BigInteger, ForeignKey("agents.id"), nullable=True),
    Column("task_id", BigInteger, nullable=True),
    Column("turn_id", BigInteger, nullable=True),
    Column("source_id", BigInteger, ForeignKey("sources.id"), nullable=True),
    Column("source_generation", Integer, nullable=True),
    Column("source_offset", BigInteger, nullable=True),
    Column("source_seq", Integer, nullable=True),
    # An in-process producer's key for an event without a stream position (see
    # store.producer): unique, so a second write with the same key stores nothing.
    Column("idempotency_key", Text, nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Index("ix_events_type_ts", "event_type", "timestamp"),
    Index("ix_events_project_ts", "project_id", "timestamp"),
    Index("ix_events_agent_ts", "agent_id", "timestamp"),
    Index(
        "ux_events_source_position",
        "source_id",
        "source_generation",
        "source_offset",
        "source_seq",
        unique=True,
    ),
    Index("ux_events_idempotency_key", "idempotency_key", unique=True),
)

rejected_events = Table(
    "rejected_events",
    metadata,
    Column("id", BigInteger, Identity(), primary_key=True),
    Column("source_path", Text, nullable=True),
    Column("byte_offset", BigInteger, nullable=True),
    Column("raw_text", Text, nullable=False),
    Column("raw_length", BigInteger, nullable=False),
    Column("reason", Text, nullable=False),
    Column("event_type", Text, nullable=True),
    Column("details", JSONB, nullable=True),
    Column("source_id", BigInteger, ForeignKey("sources.id"), nullable=True),
    Column("source_generation", Integer, nullable=True),
    Column("source_seq", Integer, nullable=True),
    Column("rejected_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Index(
        "ux_rejected_source_position",
        "source_id",
        "source_generation",
        "byte_offset",
        "source_seq",
        unique=True,
    ),
    Index("ix_rejected_at", "rejected_at"),
)

sessions = Table(
    "sessions",
    metadata,
    Column("session_uuid", Text, primary_key=True),
    Column("project_id", BigInteger, ForeignKey("projects.id"), nullable=True),
    Column("agent_id", BigInteger, ForeignKey("agents.id"), nullable=True),
    Column("state", Text, nullable=False),  # active | ended
    Column("epoch", Integer, nullable=False, server_default=text("1")),
    Column("registered_at", DateTime(timezone=True), nullable=False),
    Column("last_activity_at", DateTime(timezone=True), nullable=False),
    Column("ended_at", DateTime(timezone=True), nullable=True),
    Column("end_reason", Text, nullable=True),
    # Explicit registration (CLI / API): what `file_watcher.mode: registered` watches.
    Column("monitored", Boolean, nullable=False, server_default=text("false")),
    Column("project_path", Text, nullable=True),
    Column("working_directory", Text, nullable=True),
    Column("iterm_pane_id", Text, nullable=True),
    Index("ix_sessions_state", "state"),
)

heartbeats = Table(
    "watcher_heartbeats",
    metadata,
    Column("watcher_id", Text, primary_key=True),  # host:projects_path
    Column("host", Text, nullable=False),
    Column("pid", Integer, nullable=False),
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("beat_at", DateTime(timezone=True), nullable=False),
    Column("state", Text, nullable=False),
    Column("health", JSONB, nullable=False),
)

schema_info = Table(
    "headspace_schema",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("version", Integer, nullable=False),
    Column("upgraded_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)
