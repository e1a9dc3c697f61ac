"""The single-instance lock: one watcher per host and projects tree, per database.

A PostgreSQL session advisory lock, held on a connection of its own, taken out of the pool
for the process's life: back in the pool its session (and the lock) would live on, and the
service's own next try to take it would fail against itself. It goes through the pool's
connect settings (socket, SCRAM), so it authenticates like every other connection. When the
session is lost the lock is gone with it; ``held()`` notices without a round trip, so the
owner can take it again.
"""

from __future__ import annotations

import contextlib
import select
from typing import Any

import psycopg
from sqlalchemy import Engine

from headspace_watcher.errors import AnotherInstance

_LOCK_NAMESPACE = 0x4853  # "HS"


class InstanceLock:
    def __init__(self, engine: Engine, key: str, description: str) -> None:
        self._engine = engine
        self._key = key
        self._description = description
        self._conn: psycopg.Connection[Any] | None = None
        self.ever_held = False  # once held, losing it to another watcher is waited out

    def acquire(self) -> None:
        """Take the lock (again); raise AnotherInstance when someone else holds it."""
        if self.held():
            return
        self.release()
        pooled = self._engine.raw_connection()
        conn = pooled.driver_connection
        assert isinstance(conn, psycopg.Connection)
        pooled.detach()  # closing it now really ends the session, and the lock with it
        try:
            conn.rollback()
            conn.autocommit = True
            row = conn.execute(
                "SELECT pg_try_advisory_lock(%s, hashtext(%s))", (_LOCK_NAMESPACE, self._key)
            ).fetchone()
        except BaseException:
            conn.close()
            raise
        if not row or not row[0]:
            conn.close()
            raise AnotherInstance(f"another headspace-watcher already {self._description}")
        self._conn = conn
        self.ever_held = True

    def held(self) -> bool:
        """Is the lock's session still ours? A look at its socket, no round trip: a session
        that was terminated or lost has sent its FATAL message or closed, so it is readable.
        Only then a query tells (an idle session may also have sent a parameter update)."""
        conn = self._conn
        if conn is None or conn.closed:
            return False
        try:
            readable, _, _ = select.select([conn.fileno()], [], [], 0)
        except (OSError, ValueError, psycopg.Error):
            return False
        if not readable:
            return True
        try:
            conn.execute("SELECT 1")
        except psycopg.Error:
            return False
        return True

    def release(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None
