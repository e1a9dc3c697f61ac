"""Alembic's entry point: migrate the caller's connection (``db.init_db``) or, from the
command line, a database named by the ``sqlalchemy.url`` option (``__main__``)."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, create_engine

from headspace_watcher.store.schema import metadata


def _migrate(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=metadata)
    with context.begin_transaction():
        context.run_migrations()


def _run() -> None:
    if context.is_offline_mode():
        raise RuntimeError("offline (--sql) migrations are not supported; use init-db")
    connection = context.config.attributes.get("connection")
    if connection is not None:
        _migrate(connection)
        return
    url = context.config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("no database: set HEADSPACE_DATABASE_URL (a database at head)")
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            _migrate(conn)
            conn.commit()
    finally:
        engine.dispose()


_run()
