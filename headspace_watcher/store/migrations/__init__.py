"""Schema migrations: Alembic revisions shipped inside the package.

``store.migrate.init_db`` upgrades every database to the newest revision (``head``) in the caller's
connection; there is no ``alembic.ini`` — :func:`config` builds the configuration in code, so
an installed package finds its own ``versions/``.

Adding a revision (ids are sequential four-digit numbers; ``headspace_schema.version`` is that
number, so ``init-db`` reports it):

1. change the tables in ``headspace_watcher/store/schema.py``;
2. ``python -m headspace_watcher.store.migrations revision -m "add sources.path_bytes"`` writes
   ``versions/0002_add_sources_path_bytes.py`` with empty ``upgrade()``/``downgrade()``; fill
   them with ``op.*`` calls (or add ``--autogenerate`` with ``HEADSPACE_DATABASE_URL`` naming
   a database at the previous head, and review what it wrote);
3. ``pytest tests/test_migrations.py``: the drift test fails until the migrated database
   equals ``store.schema.metadata``.

A revision runs inside ``init_db``'s transaction, under its advisory lock, while a watcher may
be running: nothing that cannot run in a transaction (``CREATE INDEX CONCURRENTLY``), no long
table rewrites, and never edit a revision that has shipped — add a new one.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Connection, text

if TYPE_CHECKING:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

# Alembic (~60 ms to import) is imported where it is used, so CLI commands that never touch
# the schema do not pay for it.

SCRIPT_LOCATION = Path(__file__).resolve().parent
BASELINE = "0001"  # the schema that `create_all` made before migrations existed
VERSION_TABLE = "alembic_version"
BASELINE_TABLES = frozenset(
    {
        "projects",
        "agents",
        "sources",
        "events",
        "rejected_events",
        "sessions",
        "watcher_heartbeats",
        "headspace_schema",
    }
)  # what BASELINE creates, frozen: later revisions do not change it


def config(connection: Connection | None = None, url: str | None = None) -> Config:
    """Alembic's configuration without an ini file; ``env.py`` migrates ``connection`` (or
    connects to ``url``, for the command line)."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(SCRIPT_LOCATION))
    cfg.set_main_option("file_template", "%%(rev)s_%%(slug)s")
    if url is not None:
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


@lru_cache(maxsize=1)
def _script() -> ScriptDirectory:
    """The revisions shipped with this code; read once per process (it parses every file)."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(config())


@lru_cache(maxsize=1)
def shipped() -> tuple[str, ...]:
    """The revisions shipped with this code, oldest first, from their file names.

    Not from Alembic's ScriptDirectory: importing Alembic and parsing every revision costs
    ~9 MB of RSS, and the service's every connect only needs "is the database at head?".
    Revision ids are sequential four-digit numbers, each file named after its id (the
    migration tests check this agrees with Alembic's own view of the chain).
    """
    names = sorted(p.name[:4] for p in (SCRIPT_LOCATION / "versions").glob("[0-9]" * 4 + "_*.py"))
    if not names:
        raise RuntimeError(f"no migration revisions found in {SCRIPT_LOCATION / 'versions'}")
    return tuple(names)


def head() -> str:
    """The newest revision."""
    return shipped()[-1]


def is_known(revision: str) -> bool:
    """Whether this code ships ``revision`` (a database upgraded by newer code is not)."""
    return revision in shipped()


def alembic_chain() -> list[str]:
    """The chain as Alembic reads it, oldest first (for the tests of ``shipped``)."""
    return [s.revision for s in reversed(list(_script().walk_revisions()))]


def schema_version(revision: str) -> int:
    """The integer ``headspace_schema.version`` (and ``init-db``'s output) of a revision."""
    return int(revision)


def existing_tables(conn: Connection, names: list[str]) -> set[str]:
    """Which of ``names`` exist in the current schema, read from ``pg_class`` with this
    statement's snapshot. Not ``to_regclass``: it answers from the backend's catalog cache,
    which after waiting for another session's upgrade (the advisory lock processes no cache
    invalidations) can still say "no such table" about one just committed."""
    found = conn.execute(
        text(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = current_schema() AND c.relname = ANY(:names)"
        ),
        {"names": list(names)},
    ).scalars()
    return set(found)


def current(conn: Connection) -> str | None:
    """The database's revision, or None when it has never been migrated."""
    if not existing_tables(conn, [VERSION_TABLE]):
        return None
    return conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalar()


def stamp(conn: Connection, revision: str) -> None:
    """Record ``revision`` as applied without running it (a database made before migrations)."""
    from alembic import command

    command.stamp(config(conn), revision)


def upgrade(conn: Connection, target: str = "head") -> None:
    """Apply every revision after the database's current one up to ``target``, in ``conn``'s
    transaction."""
    from alembic import command

    command.upgrade(config(conn), target)
