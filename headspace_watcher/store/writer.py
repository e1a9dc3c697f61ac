"""BatchWriter: a batch of events, rejections, session decisions and checkpoints in ONE
transaction, retried on transient failures.

Why one transaction: offsets and events can never disagree. A crash before the commit loses
nothing (the bytes are read again from the old checkpoint); after it, the checkpoint has
moved past them with their events. The order inside the transaction is fixed: reference
rows first (before any row lock, so racing writers lock in the same order), then the
checkpoint guard (locks the stream rows and proves the positions are new), session
decisions under their guards, events by COPY, rejections, and the checkpoint advance.

If COPY is refused for anything but a transient reason (one poison event, or the guard
wrong after all), the events are redone row by row under savepoints (``rows.insert_careful``):
duplicates skipped, refused rows rejected, the rest stored — in the same transaction.

Any other non-transient refusal (a project path or session id beyond an index's limit, a
value the driver cannot encode) redoes the whole batch once more, each project, agent,
session change, event and rejection in its own savepoint (``_store_careful``): a refused
reference is left out (its events are stored without it, the value stays in the payload), a
refused event becomes a rejection of its line, everything else is stored. Only when even
that fails does the caller get ``BatchRefused`` (nothing stored) and isolate the stream.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import Connection, Engine

from headspace_watcher.errors import BatchRefused, CheckpointConflict, WriteAborted, WriteFailed
from headspace_watcher.records import Batch, Event, Rejection, WriteResult
from headspace_watcher.store import checkpoints, rows, sessions
from headspace_watcher.store.references import NewRefs, References
from headspace_watcher.store.retry import RetryPolicy, describe, is_transient

log = logging.getLogger(__name__)

_LIFECYCLE = {"session_registered": "register", "session_ended": "end"}


@dataclass(slots=True)
class WriterMetrics:
    """What ``status`` reports about writing (counts since the process started)."""

    events_written: int = 0
    failed_writes: int = 0
    rejected: int = 0
    duplicates: int = 0
    last_write_at: datetime | None = None
    last_error: str | None = None


def _now() -> datetime:
    return datetime.now(UTC)


class BatchWriter:
    """Stores batches exactly once; see the module docstring for the guarantees."""

    def __init__(
        self,
        engine: Engine,
        references: References,
        *,
        retry: RetryPolicy | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], datetime] = _now,
    ) -> None:
        self.engine = engine
        self.references = references
        self.retry = retry or RetryPolicy()
        self.metrics = WriterMetrics()
        self._sleep = sleep
        self._clock = clock

    def write_batch(
        self, batch: Batch, *, should_abort: Callable[[], bool] = lambda: False
    ) -> WriteResult:
        """Store a batch and advance its checkpoints atomically (see module docstring).

        Raises CheckpointConflict (nothing stored: reload and redo), WriteFailed (transient
        failures outlasted the retries) or WriteAborted (``should_abort`` said stop).
        """
        return self.with_retries(
            lambda conn, _refs: self._store(conn, batch),
            batch.events,
            should_abort,
            careful=lambda conn, refs: self._store_careful(conn, batch, refs),
        )

    def with_retries(
        self,
        attempt: Callable[[Connection, NewRefs], WriteResult],
        evts: list[Event],
        should_abort: Callable[[], bool],
        careful: Callable[[Connection, NewRefs], WriteResult] | None = None,
    ) -> WriteResult:
        """Run ``attempt`` in a fresh transaction until it commits or retries run out;
        ``careful``: the attempt to switch to (once) when ``attempt`` is refused for good."""
        delays = self.retry.delays()
        narrowing = False
        while True:
            refs = NewRefs()
            try:
                with self.engine.begin() as conn:
                    self.references.resolve(conn, evts, refs, careful=narrowing)
                    result = (careful if narrowing and careful else attempt)(conn, refs)
                self.references.committed(refs)
                self._account(result)
                return result
            except BaseException as exc:
                refs.forget()  # ids of rolled-back rows must not stick to the events
                if isinstance(exc, CheckpointConflict) or not isinstance(exc, Exception):
                    raise
                if not is_transient(exc):
                    if careful is None:
                        raise
                    if narrowing:
                        self.metrics.failed_writes += 1
                        self.metrics.last_error = describe(exc)
                        raise BatchRefused(self.metrics.last_error) from exc
                    log.warning(
                        "batch refused; narrowing it to the offending lines",
                        extra={"error": describe(exc), "events": len(evts)},
                    )
                    narrowing = True
                    continue
                self.metrics.last_error = describe(exc)
                delay = next(delays, None)
                if delay is None or should_abort():
                    self.metrics.failed_writes += 1
                    log.error(
                        "write failed after retries",
                        extra={"error": self.metrics.last_error, "events": len(evts)},
                    )
                    if delay is not None:
                        raise WriteAborted(self.metrics.last_error) from exc
                    raise WriteFailed(self.metrics.last_error) from exc
                log.warning(
                    "transient write failure, retrying",
                    extra={"error": self.metrics.last_error, "delay_s": round(delay, 3)},
                )
                self._sleep(delay)

    def _account(self, result: WriteResult) -> None:
        self.metrics.events_written += result.written
        self.metrics.rejected += result.rejected
        self.metrics.duplicates += result.duplicates
        self.metrics.last_write_at = self._clock()
        self.metrics.last_error = None

    def _store(self, conn: Connection, batch: Batch) -> WriteResult:
        checkpoints.check_guard(conn, batch.advances)
        result = WriteResult()
        result.lost = sessions.apply_changes(conn, batch.sessions, self.references)
        evts = _without_lost(batch.events, result.lost)
        invalid: list[Rejection] = []
        if evts:
            try:
                with conn.begin_nested():
                    result.written = rows.copy_events(conn, evts, invalid)
            except rows.REFUSABLE as exc:
                if is_transient(exc):
                    raise
                log.warning(
                    "bulk insert refused, storing row by row",
                    extra={"error": describe(exc), "events": len(evts)},
                )
                outcomes, invalid = rows.insert_careful(conn, evts)
                result.written = outcomes.written
                result.duplicates = outcomes.duplicates
        result.rejected += rows.insert_rejections(conn, batch.rejections + invalid)
        checkpoints.advance(conn, batch.advances)
        return result

    def _store_careful(self, conn: Connection, batch: Batch, refs: NewRefs) -> WriteResult:
        """``_store`` after a refusal, every row alone: a refused row affects only its line."""
        checkpoints.check_guard(conn, batch.advances)
        result = WriteResult()
        refused: dict[str, str] = {}
        result.lost = sessions.apply_changes(conn, batch.sessions, self.references, refused)
        for what, reasons in (
            ("project", refs.refused_projects),
            ("agent", refs.refused_agents),
            ("session", refused),
        ):
            for reason in reasons.values():
                log.warning(
                    f"{what} refused by the database; its lines are stored without it",
                    extra={"error": reason},
                )
        outcomes, invalid = rows.insert_careful(conn, _without_lost(batch.events, result.lost))
        result.written, result.duplicates = outcomes.written, outcomes.duplicates
        result.rejected += rows.insert_rejections_careful(conn, batch.rejections + invalid)
        checkpoints.advance(conn, batch.advances)
        return result


def _without_lost(evts: list[Event], lost: set[tuple[str, str]]) -> list[Event]:
    """The batch's events less the lifecycle events whose session decision lost its guard."""
    if not lost:
        return evts
    return [
        e
        for e in evts
        if not isinstance(e.payload, dict)
        or (_LIFECYCLE.get(e.event_type), e.payload.get("session_uuid")) not in lost
    ]
