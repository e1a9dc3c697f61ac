"""The store: all SQL, and the only code that touches PostgreSQL.

Layout, one job per module: ``schema`` (tables), ``migrate`` (bring a database to them),
``engine`` (how we connect), ``checkpoints`` (stream positions), ``writer`` (a batch in one
transaction), ``rows`` (event/rejection rows), ``references`` (projects/agents),
``sessions`` (session rows under guards), ``producer`` (one event in the caller's
transaction), ``locks`` (single instance), ``heartbeats``, ``embedded`` (the embedded
server). ``Store`` bundles what the service and the CLI use, so neither needs a statement.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Engine

from headspace_watcher.records import Batch, Event, SessionInfo, WriteResult
from headspace_watcher.store import heartbeats, migrate, producer, sessions
from headspace_watcher.store.checkpoints import CheckpointStore
from headspace_watcher.store.engine import PING_AFTER_IDLE_S, make_engine
from headspace_watcher.store.locks import InstanceLock
from headspace_watcher.store.producer import WriteOutcome
from headspace_watcher.store.references import References
from headspace_watcher.store.retry import RetryPolicy
from headspace_watcher.store.writer import BatchWriter, WriterMetrics

__all__ = ["Store", "WriteOutcome", "WriterMetrics"]


def _now() -> datetime:
    return datetime.now(UTC)


class Store:
    """One database: its engine, the batch writer, checkpoints and the producer API."""

    def __init__(
        self,
        url: str,
        *,
        connect_timeout: int = 5,
        retry: RetryPolicy | None = None,
        clock: Callable[[], datetime] = _now,
        engine: Engine | None = None,
        **engine_kwargs: Any,
    ) -> None:
        self.url = url
        engine_kwargs.setdefault("ping_idle_s", PING_AFTER_IDLE_S)
        self.engine = engine or make_engine(url, connect_timeout=connect_timeout, **engine_kwargs)
        self.references = References()
        self.writer = BatchWriter(self.engine, self.references, retry=retry, clock=clock)
        self.checkpoints = CheckpointStore(self.engine)

    @classmethod
    def for_engine(cls, engine: Engine, **kwargs: Any) -> Store:
        """A store on an engine the caller owns (tests, benchmarks): ``close`` leaves it."""
        store = cls(engine.url.render_as_string(hide_password=False), engine=engine, **kwargs)
        store._owns_engine = False
        return store

    @property
    def metrics(self) -> WriterMetrics:
        return self.writer.metrics

    def init(self) -> int:
        """Create or upgrade the schema (idempotent); the schema version."""
        return migrate.init_db(self.engine)

    def ping(self) -> bool:
        """Whether the database answers a trivial query now."""
        try:
            with self.engine.connect() as conn:
                conn.exec_driver_sql("SELECT 1")
            return True
        except Exception:
            return False

    def lock(self, key: str, description: str) -> InstanceLock:
        return InstanceLock(self.engine, key, description)

    def load_sessions(self) -> Iterator[SessionInfo]:
        """Every session, streamed: consume it at once (it holds a connection meanwhile)."""
        return sessions.load_all(self.engine)

    def session(self, session_uuid: str) -> SessionInfo | None:
        return sessions.load_one(self.engine, session_uuid)

    def set_monitoring(
        self, session_uuid: str, monitored: bool, details: dict[str, str | None] | None = None
    ) -> None:
        with self.engine.begin() as conn:
            sessions.set_monitoring(conn, session_uuid, monitored, details)

    def write_batch(
        self, batch: Batch, *, should_abort: Callable[[], bool] = lambda: False
    ) -> WriteResult:
        return self.writer.write_batch(batch, should_abort=should_abort)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Connection]:
        """A transaction for a producer's own statements and its events (``produce``)."""
        with self.engine.begin() as conn:
            yield conn

    @staticmethod
    def produce(conn: Connection, event: Event) -> WriteOutcome:
        """Write ``event`` inside ``conn``'s transaction (see ``store.producer``)."""
        return producer.write_event(conn, event)

    def beat(self, watcher_id: str, snapshot: dict[str, Any]) -> None:
        heartbeats.beat(self.engine, watcher_id, snapshot)

    _owns_engine = True

    def reset_connections(self) -> None:
        """Drop pooled connections: after a failure, the next ones start afresh (a session
        keeps what it started with, e.g. a database since set read-only)."""
        with contextlib.suppress(Exception):
            self.engine.dispose()

    def close(self) -> None:
        if self._owns_engine:
            self.engine.dispose()
