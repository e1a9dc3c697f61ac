"""EventWriter: the only way events reach PostgreSQL.

Two paths share one set of guarantees (atomic, idempotent, retried):

* ``write(event)`` for single producers (state machine, hooks, CLI);
* ``write_batch(batch)`` for the tailer: events, rejections, session state and the source
  checkpoints they came from, in ONE transaction — offsets and events can never disagree.

The batch path streams rows with COPY (the server is the bottleneck; COPY is its cheapest
input). The checkpoint guard makes that safe: the source rows are locked and their offsets
compared with where the batch starts, so rows for those positions cannot exist yet. If the
guard is ever wrong (a unique-index hit) or one event is poison (PostgreSQL refuses it), the
transaction is redone row by row with savepoints: duplicates are skipped with a warning,
poison events go to ``rejected_events``, the rest is stored.

Any other non-transient refusal (a project path or session id beyond an index's limit, a
value the driver cannot encode) redoes the whole batch once more, each project, agent,
session change, event and rejection in its own savepoint (``_store_careful``): a refused
reference is left out (its events are stored without it), a refused event becomes a
rejection of its line, everything else is stored. Only when even that fails does the caller
get ``BatchRefused`` (nothing stored) and isolate the file.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import orjson
import psycopg
from sqlalchemy import Connection, Engine, bindparam, func, select, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects.postgresql import insert as pg_insert

from headspace_watcher.checkpoints import storable_path
from headspace_watcher.db import agents, events, projects, rejected_events, sessions, sources
from headspace_watcher.events import Event, Rejection, SourcePosition
from headspace_watcher.retry import RetryPolicy, is_transient
from headspace_watcher.retry import describe as _describe  # cli.py imports it from here
from headspace_watcher.schemas import InvalidEvent, validate_payload
from headspace_watcher.sessions import SessionChange, SessionInfo

log = logging.getLogger(__name__)

RAW_TEXT_CAP = 64 * 1024
_EVENT_COLUMNS = (
    "timestamp",
    "event_type",
    "payload",
    "project_id",
    "agent_id",
    "task_id",
    "turn_id",
    "source_id",
    "source_generation",
    "source_offset",
    "source_seq",
)
_LIFECYCLE = {"session_registered": "register", "session_ended": "end"}
_COPY_SQL = f"COPY events ({', '.join(_EVENT_COLUMNS)}) FROM STDIN"


class WriteFailed(RuntimeError):
    """Transient failures outlasted the retries; nothing of the batch was stored."""


class WriteAborted(RuntimeError):
    """The caller asked to stop (shutdown) while retrying; nothing of the batch was stored."""


class BatchRefused(RuntimeError):
    """A non-transient error remained even line by line; nothing of the batch was stored."""


class CheckpointConflict(RuntimeError):
    """A source's stored offset is not where the batch starts: someone else wrote it."""


@dataclass(frozen=True, slots=True)
class SourceAdvance:
    """Moves one source's checkpoint from ``start_offset`` to ``end_offset``."""

    source_id: int
    generation: int
    start_offset: int
    end_offset: int
    lines: int
    fingerprint: bytes | None = None


@dataclass(slots=True)
class Batch:
    events: list[Event] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)
    advances: list[SourceAdvance] = field(default_factory=list)
    sessions: list[SessionChange] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.events or self.rejections or self.advances or self.sessions)


@dataclass(slots=True)
class WriteResult:
    written: int = 0
    rejected: int = 0
    duplicates: int = 0
    # lifecycle decisions whose guard lost (someone else registered/ended first): (kind, uuid)
    lost: set[tuple[str, str]] = field(default_factory=set)


@dataclass(slots=True)
class WriterMetrics:
    events_written: int = 0
    failed_writes: int = 0
    rejected: int = 0
    duplicates: int = 0
    last_write_at: datetime | None = None
    last_error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "events_written": self.events_written,
            "failed_writes": self.failed_writes,
            "rejected": self.rejected,
            "duplicates": self.duplicates,
            "last_write_at": self.last_write_at.isoformat() if self.last_write_at else None,
            "last_error": self.last_error,
        }


def _now() -> datetime:
    return datetime.now(UTC)


def storable_text(raw: bytes | str) -> str:
    """Raw input as text PostgreSQL accepts: bad bytes escaped, NUL and surrogates escaped."""
    if isinstance(raw, bytes):
        value = raw[:RAW_TEXT_CAP].decode("utf-8", "backslashreplace")
    else:
        value = raw[:RAW_TEXT_CAP].encode("utf-8", "backslashreplace").decode("utf-8")
    return value.replace("\x00", "\\x00")


def _dumps(payload: dict[str, Any]) -> str:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"))


def _dumps_turn(payload: dict[str, Any]) -> str:
    """A validated ``turn_detected`` payload as JSON text, ~2.5x faster than ``_dumps``.

    Only for that type: its schema is closed (strings, booleans, a list of strings, a dict of
    integers), where orjson writes the same document as ``json``. Open payloads may hold
    floats (orjson writes NaN as null) or types orjson serialises and ``json`` refuses.
    Integers beyond 64 bits (orjson refuses them) take ``_dumps``.
    """
    try:
        return orjson.dumps(payload).decode()
    except TypeError:
        return _dumps(payload)


@dataclass(slots=True)
class _NewRefs:
    """Reference ids an attempt created, and the events it gave ids to (undone on failure)."""

    projects: dict[str, int] = field(default_factory=dict)
    agents: dict[str, int] = field(default_factory=dict)
    assigned: list[Event] = field(default_factory=list)
    assigned_agents: list[Event] = field(default_factory=list)

    # new references PostgreSQL refused (careful mode), with the reason: their events are
    # rejected instead of stored
    refused_projects: dict[str, str] = field(default_factory=dict)
    refused_agents: dict[str, str] = field(default_factory=dict)

    def forget(self) -> None:
        for e in self.assigned:
            e.project_id = None
        for e in self.assigned_agents:
            e.agent_id = None


class EventWriter:
    """Stores events exactly once; see the module docstring for the guarantees."""

    def __init__(
        self,
        engine: Engine,
        *,
        retry: RetryPolicy | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], datetime] = _now,
    ) -> None:
        self.engine = engine
        self.retry = retry or RetryPolicy()
        self.metrics = WriterMetrics()
        self._sleep = sleep
        self._clock = clock
        self._project_ids: dict[str, int] = {}
        self._agent_ids: dict[str, int] = {}

    # ------------------------------------------------------------------ public API
    def write(self, event: Event) -> int | None:
        """Validate and store one event; return its id, or None if already stored.

        Raises InvalidEvent (after recording it in ``rejected_events``) for an unknown type or
        an invalid payload, WriteFailed when the database stayed unreachable.
        """
        try:
            event.payload = validate_payload(event.event_type, event.payload)
        except InvalidEvent as exc:
            self._record_invalid(event, exc)
            raise
        ids: list[int | None] = []

        def attempt(conn: Connection, _refs: _NewRefs) -> WriteResult:
            ids.clear()
            result = WriteResult()
            self._insert_careful(conn, [event], result, ids)
            return result

        self._with_retries(attempt, [event], lambda: False)
        return ids[0] if ids else None

    def write_batch(
        self, batch: Batch, *, should_abort: Callable[[], bool] = lambda: False
    ) -> WriteResult:
        """Store a batch and advance its checkpoints atomically (see module docstring).

        Payloads are validated inside the transaction while the rows stream to the server
        (``_copy_events``); invalid events become rejections of that same transaction.
        """
        return self._with_retries(
            lambda conn, _refs: self._store(conn, batch),
            batch.events,
            should_abort,
            careful=lambda conn, refs: self._store_careful(conn, batch, refs),
        )

    def ping(self) -> bool:
        """True when the database answers a trivial query now."""
        try:
            with self.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            return True
        except Exception:
            return False

    # ------------------------------------------------------------------ retries
    def _with_retries(
        self,
        attempt: Callable[[Connection, _NewRefs], WriteResult],
        evts: list[Event],
        should_abort: Callable[[], bool],
        careful: Callable[[Connection, _NewRefs], WriteResult] | None = None,
    ) -> WriteResult:
        """``careful``: the attempt to switch to (once) when ``attempt`` is refused for good."""
        delays = self.retry.delays()
        narrowing = False
        while True:
            refs = _NewRefs()
            try:
                with self.engine.begin() as conn:
                    self._resolve_ids(conn, evts, refs, careful=narrowing)
                    result = (careful if narrowing and careful else attempt)(conn, refs)
                self._project_ids.update(refs.projects)  # committed: safe to reuse
                self._agent_ids.update(refs.agents)
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
                        self.metrics.last_error = _describe(exc)
                        raise BatchRefused(self.metrics.last_error) from exc
                    log.warning(
                        "batch refused; narrowing it to the offending lines",
                        extra={"error": _describe(exc), "events": len(evts)},
                    )
                    narrowing = True
                    continue
                self.metrics.last_error = _describe(exc)
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

    # ------------------------------------------------------------------ the transaction
    def _store(self, conn: Connection, batch: Batch) -> WriteResult:
        self._check_guard(conn, batch.advances)
        result = WriteResult()
        result.lost = self._apply_sessions(conn, batch.sessions)
        evts = batch.events
        if result.lost:
            evts = [
                e
                for e in evts
                if not isinstance(e.payload, dict)
                or (_LIFECYCLE.get(e.event_type), e.payload.get("session_uuid")) not in result.lost
            ]
        invalid: list[Rejection] = []
        if evts:
            try:
                with conn.begin_nested():
                    result.written = self._copy_events(conn, evts, invalid)
            except _REFUSABLE as exc:
                if is_transient(exc):
                    raise
                log.warning(
                    "bulk insert refused, storing row by row",
                    extra={"error": _describe(exc), "events": len(evts)},
                )
                valid, invalid = self._validated(evts)  # the COPY may have stopped midway
                self._insert_careful(conn, valid, result, [])
        rejections = batch.rejections + invalid
        if rejections:
            result.rejected += self._insert_rejections(conn, rejections)
        self._advance(conn, batch.advances)
        return result

    def _store_careful(self, conn: Connection, batch: Batch, refs: _NewRefs) -> WriteResult:
        """``_store`` after a refusal, every row alone: a refused row affects only its line.

        A project, agent or session PostgreSQL refuses (a path or id beyond an index's
        limit) is left out and its events are stored without that reference (the payload
        still holds the value); an event refused itself becomes a rejection of its line.
        """
        self._check_guard(conn, batch.advances)
        result = WriteResult()
        refused: dict[str, str] = {}
        result.lost = self._apply_sessions(conn, batch.sessions, refused)
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
        evts = [
            e
            for e in batch.events
            if not isinstance(e.payload, dict)
            or (_LIFECYCLE.get(e.event_type), e.payload.get("session_uuid")) not in result.lost
        ]
        valid, invalid = self._validated(evts)
        self._insert_careful(conn, valid, result, [])
        result.rejected += self._insert_rejections_careful(conn, batch.rejections + invalid)
        self._advance(conn, batch.advances)
        return result

    def _check_guard(self, conn: Connection, advances: list[SourceAdvance]) -> None:
        if not advances:
            return
        wanted = {a.source_id: a for a in advances}
        rows = conn.execute(
            select(sources.c.id, sources.c.generation, sources.c.committed_offset)
            .where(sources.c.id.in_(sorted(wanted)))
            .order_by(sources.c.id)
            .with_for_update()
        ).all()
        found = {r.id: r for r in rows}
        for sid, adv in wanted.items():
            row = found.get(sid)
            if row is None or (row.generation, row.committed_offset) != (
                adv.generation,
                adv.start_offset,
            ):
                stored = None if row is None else (row.generation, row.committed_offset)
                raise CheckpointConflict(
                    f"source {sid}: expected generation/offset "
                    f"{(adv.generation, adv.start_offset)}, database has {stored}"
                )

    def _copy_events(self, conn: Connection, evts: list[Event], invalid: list[Rejection]) -> int:
        """COPY the valid events, validating each just before its row is sent.

        Why here rather than before the transaction: the server is the bottleneck (jsonb
        parsing, TOAST, WAL) and works through the rows already sent while Python validates
        and serialises the next ones, so validation costs no wall time; done upfront it was
        ~10-15% of the batch path with the server idle. Invalid events are appended to
        ``invalid`` and left out. Returns the number of rows sent.
        """
        raw = conn.connection.driver_connection
        assert raw is not None
        sent = 0
        with raw.cursor() as cur, cur.copy(_COPY_SQL) as copy:
            for e in evts:
                try:
                    e.payload = validate_payload(e.event_type, e.payload)
                except InvalidEvent as exc:
                    invalid.append(self._invalid_rejection(e, exc))
                    continue
                copy.write_row(self._row_tuple(e))
                sent += 1
        return sent

    def _validated(self, evts: list[Event]) -> tuple[list[Event], list[Rejection]]:
        """Valid events (payload normalised) and rejections for the invalid ones."""
        valid: list[Event] = []
        invalid: list[Rejection] = []
        for e in evts:
            try:
                e.payload = validate_payload(e.event_type, e.payload)
            except InvalidEvent as exc:
                invalid.append(self._invalid_rejection(e, exc))
            else:
                valid.append(e)
        return valid, invalid

    def _row_tuple(self, e: Event) -> tuple[Any, ...]:
        p = e.position
        return (
            e.timestamp,
            e.event_type,
            _dumps_turn(e.payload) if e.event_type == "turn_detected" else _dumps(e.payload),
            e.project_id,
            e.agent_id,
            e.task_id,
            e.turn_id,
            p.source_id if p else None,
            p.generation if p else None,
            p.offset if p else None,
            p.seq if p else None,
        )

    def _insert_careful(
        self, conn: Connection, evts: Iterable[Event], result: WriteResult, ids: list[int | None]
    ) -> None:
        """Row by row with savepoints: skip duplicates, divert poison events."""
        poison: list[Rejection] = []
        for e in evts:
            values = dict(zip(_EVENT_COLUMNS, self._row_tuple(e), strict=True))
            values["payload"] = e.payload
            stmt = (
                pg_insert(events)
                .values(values)
                .on_conflict_do_nothing(
                    index_elements=["source_id", "source_generation", "source_offset", "source_seq"]
                )
                .returning(events.c.id)
            )
            try:
                with conn.begin_nested():
                    new_id = conn.execute(stmt).scalar()
            except _REFUSABLE as exc:
                if is_transient(exc):
                    raise
                poison.append(self._poison_rejection(e, exc))
                ids.append(None)
                continue
            ids.append(new_id)
            if new_id is None:
                result.duplicates += 1
                log.warning(
                    "event already stored, skipped",
                    extra={"event_type": e.event_type, "position": _position(e.position)},
                )
            else:
                result.written += 1
        if poison:
            result.rejected += self._insert_rejections(conn, poison)

    def _insert_rejections(self, conn: Connection, rejections: list[Rejection]) -> int:
        rows = [self._rejection_row(r) for r in rejections]
        stmt = (
            pg_insert(rejected_events)
            .on_conflict_do_nothing(
                index_elements=["source_id", "source_generation", "byte_offset", "source_seq"]
            )
            .returning(rejected_events.c.id)
        )
        stored = conn.execute(stmt.values(rows)).all()
        for r in rejections:
            log.warning(
                "rejected",
                extra={"reason": r.reason, "source_path": r.source_path, "offset": r.offset},
            )
        return len(stored)

    def _insert_rejections_careful(self, conn: Connection, rejections: list[Rejection]) -> int:
        """Each rejection alone; one still refused is stored without its raw text."""
        stored = 0
        for r in rejections:
            try:
                with conn.begin_nested():
                    stored += self._insert_rejections(conn, [r])
                continue
            except _REFUSABLE as exc:
                if is_transient(exc):
                    raise
                reason = f"{r.reason} (raw text refused: {_describe(exc)})"
            bare = replace(r, raw=b"", reason=reason, details={})
            with conn.begin_nested():
                stored += self._insert_rejections(conn, [bare])
        return stored

    @staticmethod
    def _rejection_row(r: Rejection) -> dict[str, Any]:
        p = r.position
        full = r.full_length if r.full_length is not None else len(r.raw)
        return {
            "source_path": storable_path(r.source_path) if r.source_path else r.source_path,
            "byte_offset": r.offset if r.offset is not None else (p.offset if p else None),
            "raw_text": storable_text(r.raw),
            "raw_length": full,
            "reason": storable_text(r.reason),
            "event_type": r.event_type,
            "details": json.loads(storable_text(_dumps(r.details))) if r.details else None,
            "source_id": p.source_id if p else None,
            "source_generation": p.generation if p else None,
            "source_seq": p.seq if p else None,
        }

    def _apply_sessions(
        self,
        conn: Connection,
        changes: list[SessionChange],
        refused: dict[str, str] | None = None,
    ) -> set[tuple[str, str]]:
        """Apply lifecycle changes under their guards; return the (kind, uuid) that lost.

        With ``refused`` (careful mode) each change is alone in a savepoint: one PostgreSQL
        refuses (e.g. a session id beyond the primary key's index limit) is noted there with
        the reason and counted as lost.
        """
        lost: set[tuple[str, str]] = set()
        for ch in _coalesce(changes):
            if refused is None:
                self._apply_session(conn, ch, lost)
                continue
            try:
                with conn.begin_nested():
                    self._apply_session(conn, ch, lost)
            except _REFUSABLE as exc:
                if is_transient(exc):
                    raise
                refused[ch.info.session_uuid] = _describe(exc)
                lost.add((ch.kind, ch.info.session_uuid))
        return lost

    def _apply_session(
        self, conn: Connection, ch: SessionChange, lost: set[tuple[str, str]]
    ) -> None:
        """One guarded lifecycle change; a guard that failed adds (kind, uuid) to ``lost``."""
        i = ch.info
        if ch.kind == "activity":
            params = {"uuid": i.session_uuid, "expected_epoch": ch.expected_epoch}
            params["at"] = i.last_activity_at
            if conn.execute(_session_activity_stmt(), params).rowcount == 0:
                # ended meanwhile (e.g. `unregister`): nothing of the batch is stored; the
                # caller reloads the sessions and redoes it, registering the session again
                raise CheckpointConflict(
                    f"session {i.session_uuid} is no longer active with epoch {ch.expected_epoch}"
                )
            return
        if ch.kind == "end" and ch.expected_epoch == 0:
            lost.add((ch.kind, i.session_uuid))
            return
        values = {
            "session_uuid": i.session_uuid,
            "state": i.state,
            "epoch": i.epoch,
            "registered_at": i.registered_at,
            "last_activity_at": i.last_activity_at,
            "project_path": i.project_path,
            "project_id": self._project_ids.get(i.project_path or ""),
            "agent_id": self._agent_ids.get(i.session_uuid),
            "ended_at": ch.ended_at,
            "end_reason": ch.end_reason,
            "monitored": i.monitored,
            "working_directory": i.working_directory,
            "iterm_pane_id": i.iterm_pane_id,
            "expected_epoch": ch.expected_epoch,
        }
        stmt = _session_upsert_stmt(ch.kind == "register")
        if conn.execute(stmt, values).first() is None:
            lost.add((ch.kind, i.session_uuid))

    def _advance(self, conn: Connection, advances: list[SourceAdvance]) -> None:
        if not advances:
            return
        conn.execute(
            sources.update()
            .where(sources.c.id == bindparam("sid"))
            .values(
                committed_offset=bindparam("end"),
                lines_committed=sources.c.lines_committed + bindparam("n"),
                fingerprint=bindparam("fp"),
                updated_at=text("now()"),
            ),
            [
                {"sid": a.source_id, "end": a.end_offset, "n": a.lines, "fp": a.fingerprint}
                for a in advances
            ],
        )

    # ------------------------------------------------------------------ reference data
    def _resolve_ids(
        self, conn: Connection, evts: list[Event], refs: _NewRefs, *, careful: bool = False
    ) -> None:
        """Upsert the batch's new projects/agents first in its transaction, before any lock.

        All new ones of a batch in one statement per table (a catch-up sees hundreds). In the
        batch's transaction rather than one of their own, which cost a second commit (an
        fsync) per batch of a catch-up. First, before the checkpoint guard's row locks, so two
        writers racing for the same sources take their locks in the same order. ``careful``:
        each alone in a savepoint, the refused ones noted in ``refs.refused_*``.
        """
        paths = {e.project_path for e in evts if e.project_path} - self._project_ids.keys()
        keys = {e.agent_key for e in evts if e.agent_key} - self._agent_ids.keys()
        if paths:
            refs.projects = (
                _each_alone(conn, self._upsert_projects, sorted(paths), refs.refused_projects)
                if careful
                else self._upsert_projects(conn, sorted(paths))
            )
        if keys:
            project_of: dict[str, str] = {}
            for e in evts:
                if e.agent_key in keys and e.project_path:
                    project_of.setdefault(e.agent_key, e.project_path)
            known = self._project_ids | refs.projects
            wanted = [(k, known.get(project_of.get(k, ""))) for k in sorted(keys)]
            refs.agents = (
                _each_alone(conn, self._upsert_agents, wanted, refs.refused_agents)
                if careful
                else self._upsert_agents(conn, wanted)
            )
        project_ids = self._project_ids | refs.projects if refs.projects else self._project_ids
        agent_ids = self._agent_ids | refs.agents if refs.agents else self._agent_ids
        for e in evts:
            if e.project_id is None and e.project_path in project_ids:
                e.project_id = project_ids[e.project_path]
                refs.assigned.append(e)
            if e.agent_id is None and e.agent_key in agent_ids:
                e.agent_id = agent_ids[e.agent_key]
                refs.assigned_agents.append(e)

    @staticmethod
    def _upsert_projects(conn: Connection, paths: list[str]) -> dict[str, int]:
        rows = [{"path": p, "name": p.rstrip("/").rsplit("/", 1)[-1] or p} for p in paths]
        conn.execute(pg_insert(projects).values(rows).on_conflict_do_nothing())
        found = conn.execute(
            select(projects.c.path, projects.c.id).where(projects.c.path.in_(paths))
        ).all()
        return {r.path: r.id for r in found}

    @staticmethod
    def _upsert_agents(conn: Connection, keys: list[tuple[str, int | None]]) -> dict[str, int]:
        rows = [{"session_uuid": k, "project_id": pid} for k, pid in keys]
        conn.execute(pg_insert(agents).values(rows).on_conflict_do_nothing())
        found = conn.execute(
            select(agents.c.session_uuid, agents.c.id).where(
                agents.c.session_uuid.in_([k for k, _ in keys])
            )
        ).all()
        return {r.session_uuid: r.id for r in found}

    # ------------------------------------------------------------------ rejections
    def _invalid_rejection(self, event: Event, exc: InvalidEvent) -> Rejection:
        return Rejection(
            reason=f"invalid_payload: {exc}",
            raw=_safe_dumps(event.payload),
            offset=event.position.offset if event.position else None,
            position=event.position,
            event_type=event.event_type,
            details={"field": exc.field} if exc.field else {},
        )

    def _poison_rejection(self, event: Event, exc: BaseException) -> Rejection:
        log.error(
            "event refused by the database",
            extra={"event_type": event.event_type, "error": _describe(exc)},
        )
        return Rejection(
            reason=f"database_refused: {_describe(exc)}",
            raw=_safe_dumps(event.payload),
            offset=event.position.offset if event.position else None,
            position=event.position,
            event_type=event.event_type,
        )

    def _record_invalid(self, event: Event, exc: InvalidEvent) -> None:
        rejection = self._invalid_rejection(event, exc)
        try:
            with self.engine.begin() as conn:
                self.metrics.rejected += self._insert_rejections(conn, [rejection])
        except Exception as db_exc:  # the caller still gets the InvalidEvent
            log.error("could not record rejected event", extra={"error": _describe(db_exc)})


_SESSION_VALUE_COLUMNS = (
    "session_uuid",
    "state",
    "epoch",
    "registered_at",
    "last_activity_at",
    "project_path",
    "project_id",
    "agent_id",
    "ended_at",
    "end_reason",
    "monitored",
    "working_directory",
    "iterm_pane_id",
)


@functools.cache
def _session_activity_stmt() -> Any:
    """Built once: constructing these per change cost ~2 ms each (a catch-up has thousands)."""
    return (
        sessions.update()
        .where(
            sessions.c.session_uuid == bindparam("uuid"),
            sessions.c.state == "active",
            sessions.c.epoch == bindparam("expected_epoch"),
        )
        .values(last_activity_at=func.greatest(sessions.c.last_activity_at, bindparam("at")))
    )


@functools.cache
def _session_upsert_stmt(register: bool) -> Any:
    """The guarded upsert of a ``register`` (row absent or ended with the expected epoch)
    or an ``end`` (row active with the expected epoch); parameters named as the columns,
    plus ``expected_epoch``. Returns the epoch, or no row when the guard failed."""
    ins = pg_insert(sessions).values({c: bindparam(c) for c in _SESSION_VALUE_COLUMNS})
    keep: dict[str, Any] = {c: ins.excluded[c] for c in _SESSION_VALUE_COLUMNS[1:]}
    for key in ("project_id", "agent_id", "project_path", "working_directory", "iterm_pane_id"):
        keep[key] = func.coalesce(ins.excluded[key], sessions.c[key])
    if register:
        keep["monitored"] = sessions.c.monitored | ins.excluded.monitored
    want_state = "ended" if register else "active"
    return ins.on_conflict_do_update(
        index_elements=["session_uuid"],
        set_=keep,
        where=(sessions.c.state == want_state) & (sessions.c.epoch == bindparam("expected_epoch")),
    ).returning(sessions.c.epoch)


_REFUSABLE = (sa_exc.StatementError, psycopg.Error, ValueError)  # ValueError: encoding
_Item = Any


def _each_alone(
    conn: Connection,
    upsert: Callable[[Connection, list[_Item]], dict[str, int]],
    items: list[_Item],
    refused: dict[str, str],
) -> dict[str, int]:
    """``upsert`` one item per savepoint; a refused one's key goes to ``refused``, with why."""
    found: dict[str, int] = {}
    for item in items:
        key = item[0] if isinstance(item, tuple) else item
        try:
            with conn.begin_nested():
                found |= upsert(conn, [item])
        except _REFUSABLE as exc:
            if is_transient(exc):
                raise
            refused[key] = _describe(exc)
    return found


def _coalesce(changes: list[SessionChange]) -> list[SessionChange]:
    """One change per session and batch: an activity update folds into the change before it."""
    out: list[SessionChange] = []
    where: dict[str, int] = {}
    latest: dict[int, SessionInfo] = {}  # folded activity: the last info wins (one replace)
    for ch in changes:
        key = ch.info.session_uuid
        at = where.get(key)
        if at is not None and ch.kind == "activity" and out[at].kind != "end":
            latest[at] = ch.info
            continue
        where[key] = len(out)
        out.append(ch)
    for at, info in latest.items():
        out[at] = replace(out[at], info=info)
    return out


def _safe_dumps(payload: Any) -> str:
    try:
        return json.dumps(payload, ensure_ascii=False, default=repr)
    except Exception:
        return repr(payload)


def _position(p: SourcePosition | None) -> str | None:
    return None if p is None else f"{p.source_id}/{p.generation}/{p.offset}/{p.seq}"
