"""The database schema (SQLAlchemy Core) and engine creation.

``init_db`` is idempotent and safe while a watcher runs: it only creates what is missing
(``CREATE … IF NOT EXISTS`` semantics) under an advisory lock, so two concurrent
``init-db`` calls cannot race each other.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Connection,
    DateTime,
    Engine,
    ForeignKey,
    Identity,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    Table,
    Text,
    create_engine,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB

SCHEMA_VERSION = 1
_INIT_LOCK_KEY = 0x68656164  # "head": serialises concurrent init-db runs

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


def make_engine(url: str, *, connect_timeout: int = 5, **kwargs: Any) -> Engine:
    """An engine for the watcher: small pool, pre-ping, bounded connect time."""
    return create_engine(
        url,
        pool_size=kwargs.pop("pool_size", 2),
        max_overflow=kwargs.pop("max_overflow", 2),
        pool_pre_ping=True,
        connect_args={"connect_timeout": connect_timeout, "application_name": "headspace-watcher"},
        **kwargs,
    )


def init_db(engine: Engine) -> int:
    """Create or upgrade the schema; return the schema version. Idempotent."""
    with engine.begin() as conn:
        conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _INIT_LOCK_KEY})
        metadata.create_all(conn, checkfirst=True)
        _add_missing_columns(conn)
        conn.execute(
            text(
                "INSERT INTO headspace_schema (id, version) VALUES (1, :v) "
                "ON CONFLICT (id) DO UPDATE SET version = EXCLUDED.version, upgraded_at = now() "
                "WHERE headspace_schema.version < EXCLUDED.version"
            ),
            {"v": SCHEMA_VERSION},
        )
    return SCHEMA_VERSION


def _add_missing_columns(conn: Connection) -> None:
    """Columns added to tables that existed before them (additive, nullable).

    Checked first: ``ALTER TABLE`` takes an exclusive lock even when there is nothing to do.
    """
    present = conn.execute(
        text(
            "SELECT 1 FROM information_schema.columns "
            "WHERE table_schema = current_schema() AND table_name = 'sources' "
            "AND column_name = 'path_bytes'"
        )
    ).first()
    if present is None:
        conn.execute(text("ALTER TABLE sources ADD COLUMN IF NOT EXISTS path_bytes bytea"))
