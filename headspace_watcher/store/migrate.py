"""Bringing a database to the schema of ``store.schema``.

``init_db`` is idempotent and safe while a watcher runs: it only creates what is missing
under an advisory lock, so two concurrent ``init-db`` calls cannot race each other.
"""

from __future__ import annotations

from sqlalchemy import Engine, text

from headspace_watcher.store.schema import metadata

SCHEMA_VERSION = 1
_INIT_LOCK_KEY = 0x68656164  # "head": serialises concurrent init-db runs


def init_db(engine: Engine) -> int:
    """Create or upgrade the schema; return the schema version. Idempotent."""
    with engine.begin() as conn:
        conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _INIT_LOCK_KEY})
        metadata.create_all(conn, checkfirst=True)
        conn.execute(
            text(
                "INSERT INTO headspace_schema (id, version) VALUES (1, :v) "
                "ON CONFLICT (id) DO UPDATE SET version = EXCLUDED.version, upgraded_at = now() "
                "WHERE headspace_schema.version < EXCLUDED.version"
            ),
            {"v": SCHEMA_VERSION},
        )
    return SCHEMA_VERSION
