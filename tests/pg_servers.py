"""Servers the test suite runs against: ours (``PgCluster``) or an external one.

Test-only: the package itself only ever manages the embedded server (``store.embedded``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import psycopg
from sqlalchemy.engine import make_url

from headspace_watcher.store.embedded import _create_database, _drop_database, _libpq_conninfo
from headspace_watcher.store.engine import auth_requirements


class PgServer(Protocol):
    """What the test fixtures need from a server, whether ours or an external one."""

    def url(self, dbname: str | None = None) -> str: ...

    def connect(self, dbname: str | None = None, **kwargs: Any) -> psycopg.Connection[Any]: ...

    def create_database(self, name: str, *, exist_ok: bool = False) -> bool: ...

    def drop_database(self, name: str) -> None: ...


@dataclass(slots=True)
class ExternalServer:
    """A server we do not manage, reached through a SQLAlchemy URL
    (``HEADSPACE_TEST_DATABASE_URL``); its database is used for administrative commands."""

    admin_url: str

    def url(self, dbname: str | None = None) -> str:
        parsed = make_url(self.admin_url)
        if dbname is not None:
            parsed = parsed.set(database=dbname)
        return parsed.render_as_string(hide_password=False)

    def connect(self, dbname: str | None = None, **kwargs: Any) -> psycopg.Connection[Any]:
        kwargs.setdefault("autocommit", True)
        kwargs.setdefault("connect_timeout", 10)
        url = self.url(dbname)
        return psycopg.connect(_libpq_conninfo(url), **{**auth_requirements(url), **kwargs})

    def create_database(self, name: str, *, exist_ok: bool = False) -> bool:
        with self.connect() as conn:
            return _create_database(conn, name, exist_ok=exist_ok)

    def drop_database(self, name: str) -> None:
        with self.connect() as conn:
            _drop_database(conn, name)
