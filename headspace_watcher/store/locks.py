"""The single-instance lock: one watcher per host and projects tree, per database.

A PostgreSQL session advisory lock, held on a connection of its own, outside the pool: a
pooled connection "closed" back into the pool keeps its session — and the lock — alive, so
the service's own next attempt could not take it again. Held for the process's life; when
the connection is lost the lock is gone with it, which ``held()`` notices so the owner can
take it again.
"""

from __future__ import annotations

import contextlib

from sqlalchemy import Connection, Engine, text

from headspace_watcher.errors import AnotherInstance

_LOCK_NAMESPACE = 0x4853  # "HS"


class InstanceLock:
    def __init__(self, engine: Engine, key: str, description: str) -> None:
        self._engine = engine
        self._key = key
        self._description = description
        self._conn: Connection | None = None

    def acquire(self) -> None:
        """Take the lock (again); raise AnotherInstance when someone else holds it."""
        self.release()
        conn = self._engine.connect()
        conn.detach()  # its own session: closing it really ends it (and the lock)
        try:
            got = conn.execute(
                text("SELECT pg_try_advisory_lock(:ns, hashtext(:k))"),
                {"ns": _LOCK_NAMESPACE, "k": self._key},
            ).scalar()
            conn.commit()
        except BaseException:
            conn.close()
            raise
        if not got:
            conn.close()
            raise AnotherInstance(f"another headspace-watcher already {self._description}")
        self._conn = conn

    def held(self) -> bool:
        """Whether the lock's session is still alive (one round trip)."""
        if self._conn is None:
            return False
        try:
            self._conn.execute(text("SELECT 1"))
            self._conn.commit()
            return True
        except Exception:
            self.release()
            return False

    def release(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None
