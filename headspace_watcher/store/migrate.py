"""Bringing a database to the schema of ``store.schema``: the Alembic revisions in
``store/migrations`` (how to add one: that package's docstring).

``init_db`` upgrades to the newest revision, idempotent and safe while a watcher runs: the
upgrade holds an advisory lock, so two concurrent ``init-db`` calls cannot race, and a database
already at head costs two catalog reads and no lock (it runs at every service connect).
"""

from __future__ import annotations

import logging

from sqlalchemy import Connection, Engine, text

from headspace_watcher.errors import SchemaError
from headspace_watcher.store import migrations
from headspace_watcher.store.schema import schema_info

log = logging.getLogger(__name__)

_INIT_LOCK_KEY = 0x68656164  # "head": serialises concurrent init-db runs

__all__ = ["SchemaError", "init_db"]


def init_db(engine: Engine) -> int:
    """Upgrade the schema to the newest revision; return its version. Idempotent."""
    target = migrations.head()
    with engine.begin() as conn:
        if migrations.current(conn) != target:
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _INIT_LOCK_KEY})
            _upgrade(conn, target)
    return migrations.schema_version(target)


def _upgrade(conn: Connection, target: str) -> None:
    """Under the lock: adopt a pre-migration database, apply what is missing, record it."""
    before = migrations.current(conn)  # again: a concurrent run may have just upgraded
    if before is not None and not migrations.is_known(before):
        raise SchemaError(
            f"database schema is at revision {before}, newer than this code's {target}: "
            "upgrade headspace-watcher"
        )
    if before is None and _is_pre_migration(conn):
        migrations.stamp(conn, migrations.BASELINE)
        before = migrations.BASELINE
        log.info("schema adopted", extra={"revision": before})
    if before == target:
        return
    migrations.upgrade(conn)
    conn.execute(
        text(
            "INSERT INTO headspace_schema (id, version) VALUES (1, :v) "
            "ON CONFLICT (id) DO UPDATE SET version = EXCLUDED.version, upgraded_at = now() "
            "WHERE headspace_schema.version < EXCLUDED.version"
        ),
        {"v": migrations.schema_version(target)},
    )
    log.info("schema upgraded", extra={"from_revision": before, "to_revision": target})


def _is_pre_migration(conn: Connection) -> bool:
    """True for a database made before migrations (by ``create_all``: all baseline tables,
    ``headspace_schema`` version 1), False for one without our tables; anything else is
    refused rather than guessed at."""
    present = migrations.existing_tables(conn, sorted(migrations.BASELINE_TABLES))
    if not present:
        return False
    if schema_info.name not in present:
        raise SchemaError(
            f"tables {sorted(present)} exist without {schema_info.name} or "
            f"{migrations.VERSION_TABLE}: not a database this code created; refusing to migrate"
        )
    version = conn.execute(text("SELECT version FROM headspace_schema WHERE id = 1")).scalar()
    if version != 1 or present != migrations.BASELINE_TABLES:
        raise SchemaError(
            f"pre-migration database at {schema_info.name}.version {version} with tables "
            f"{sorted(present)}: expected version 1 with all of "
            f"{sorted(migrations.BASELINE_TABLES)}"
        )
    return True
