"""Event and rejection rows: how a record becomes a row, and the statements that insert them.

Two ways in for events, one set of outcomes. ``copy_events`` streams rows with COPY (the
server is the bottleneck of a catch-up; COPY is its cheapest input) and is only used where
the checkpoint guard already proved no row of those positions can exist. ``insert_careful``
goes row by row under savepoints with ``ON CONFLICT DO NOTHING`` on every unique key
(stream position, idempotency key): a duplicate is skipped, a row PostgreSQL refuses becomes
a rejection, the rest is stored. Every event is validated against the taxonomy here, just
before its row is sent, so nothing unvalidated reaches the table.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson
import psycopg
from sqlalchemy import Connection
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects.postgresql import insert as pg_insert

from headspace_watcher.errors import InvalidEvent
from headspace_watcher.records import Event, Rejection, SourcePosition
from headspace_watcher.store.checkpoints import storable_path
from headspace_watcher.store.retry import describe, is_transient
from headspace_watcher.store.schema import events, rejected_events
from headspace_watcher.taxonomy import REGISTRY, validate_payload

log = logging.getLogger(__name__)

# what PostgreSQL or the driver may refuse for a row's own values (ValueError: encoding)
REFUSABLE = (sa_exc.StatementError, psycopg.Error, ValueError)
RAW_TEXT_CAP = 64 * 1024
EVENT_COLUMNS = (
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
    "idempotency_key",
)
_COPY_SQL = f"COPY events ({', '.join(EVENT_COLUMNS)}) FROM STDIN"
_PAYLOAD_COLUMN = EVENT_COLUMNS.index("payload")
# A payload's JSON beyond this stays bytes and is streamed (``_copy_streamed``) in pieces of
# _STREAM_PIECE: psycopg's write_row would hold it three more times (str, encoded, escaped).
_STREAM_PAYLOAD_BYTES = 1 << 20
_STREAM_PIECE = 1 << 20


@dataclass(slots=True)
class Outcomes:
    """Per event, in order: the new id, ``None`` for a duplicate, or the rejection reason."""

    ids: list[int | None] = field(default_factory=list)
    reasons: dict[int, str] = field(default_factory=dict)  # index → why it was rejected
    written: int = 0
    duplicates: int = 0
    rejected: int = 0


def storable_text(raw: bytes | str) -> str:
    """Raw input as text PostgreSQL accepts: bad bytes escaped, NUL and surrogates escaped."""
    if isinstance(raw, bytes):
        value = raw[:RAW_TEXT_CAP].decode("utf-8", "backslashreplace")
    else:
        value = raw[:RAW_TEXT_CAP].encode("utf-8", "backslashreplace").decode("utf-8")
    return value.replace("\x00", "\\x00")


def _dumps(payload: dict[str, Any]) -> str:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"))


def payload_json(event_type: str, payload: dict[str, Any]) -> str | bytes:
    """The payload as JSON text; orjson (~2.5x faster) only for closed schemas.

    A closed schema (``EventType.closed``) admits only strings, booleans, lists of strings and
    dicts of integers, where orjson writes the same document as ``json``. Open payloads may
    hold floats (orjson writes NaN as null) or types orjson serialises and ``json`` refuses.
    Integers beyond 64 bits (orjson refuses them) take ``json``. Beyond _STREAM_PAYLOAD_BYTES
    the UTF-8 bytes are returned as they are, for ``_copy_streamed``.
    """
    entry = REGISTRY.get(event_type)
    if entry is not None and entry.closed:
        try:
            data = orjson.dumps(payload)
        except TypeError:
            return _dumps(payload)
        return data if len(data) > _STREAM_PAYLOAD_BYTES else data.decode()
    return _dumps(payload)


def _copy_escape(data: bytes) -> bytes:
    """COPY text format: backslash, tab, newline and carriage return escaped."""
    return (
        data.replace(b"\\", b"\\\\")
        .replace(b"\t", b"\\t")
        .replace(b"\n", b"\\n")
        .replace(b"\r", b"\\r")
    )


def _copy_field(value: Any) -> bytes:
    if value is None:
        return b"\\N"
    if isinstance(value, datetime):
        return value.isoformat().encode()
    return _copy_escape(str(value).encode())


def _copy_streamed(cur: Any, row: tuple[Any, ...]) -> None:
    """One row in a COPY of its own, its payload bytes escaped and sent piece by piece.

    A COPY of its own because psycopg buffers ``write_row`` rows and ``write`` would overtake
    them. The only whole copies alive are the payload's text and its JSON bytes.
    """
    data = row[_PAYLOAD_COLUMN]
    before = b"".join(_copy_field(v) + b"\t" for v in row[:_PAYLOAD_COLUMN])
    after = b"".join(b"\t" + _copy_field(v) for v in row[_PAYLOAD_COLUMN + 1 :])
    with cur.copy(_COPY_SQL) as copy:
        copy.write(before)
        for start in range(0, len(data), _STREAM_PIECE):
            copy.write(_copy_escape(data[start : start + _STREAM_PIECE]))
        copy.write(after + b"\n")


def event_row(e: Event) -> tuple[Any, ...]:
    """The event as a tuple in ``EVENT_COLUMNS`` order (the payload already as JSON text)."""
    p = e.position
    return (
        e.timestamp,
        e.event_type,
        payload_json(e.event_type, e.payload),
        e.project_id,
        e.agent_id,
        e.task_id,
        e.turn_id,
        p.source_id if p else None,
        p.generation if p else None,
        p.offset if p else None,
        p.seq if p else None,
        e.idempotency_key,
    )


def validate(e: Event) -> InvalidEvent | None:
    """Normalise ``e.payload`` in place; the error instead when it breaks its schema."""
    try:
        e.payload = validate_payload(e.event_type, e.payload)
    except InvalidEvent as exc:
        return exc
    return None


def copy_events(conn: Connection, evts: list[Event], invalid: list[Rejection]) -> int:
    """COPY the valid events, validating each just before its row is sent.

    Why here rather than before the transaction: the server works through the rows already
    sent while Python validates and serialises the next ones, so validation costs no wall
    time. Invalid events are appended to ``invalid`` and left out. Returns the rows sent.
    """
    raw = conn.connection.driver_connection
    assert raw is not None
    sent = 0
    rows = _valid_rows(evts, invalid)
    with raw.cursor() as cur:
        while True:
            big: tuple[Any, ...] | None = None
            with cur.copy(_COPY_SQL) as copy:
                for row in rows:
                    if isinstance(row[_PAYLOAD_COLUMN], bytes):
                        big = row
                        break
                    copy.write_row(row)
                    sent += 1
            if big is None:
                return sent
            _copy_streamed(cur, big)
            sent += 1


def _valid_rows(evts: list[Event], invalid: list[Rejection]) -> Iterator[tuple[Any, ...]]:
    for e in evts:
        error = validate(e)
        if error is not None:
            invalid.append(invalid_rejection(e, error))
            continue
        yield event_row(e)


def insert_careful(conn: Connection, evts: Iterable[Event]) -> tuple[Outcomes, list[Rejection]]:
    """Row by row with savepoints: duplicates skipped, invalid and refused rows rejected.

    Returns the outcomes and the rejections to store (the caller inserts them in the same
    transaction).
    """
    out = Outcomes()
    rejections: list[Rejection] = []
    for i, e in enumerate(evts):
        error = validate(e)
        if error is not None:
            rejections.append(invalid_rejection(e, error))
            out.ids.append(None)
            out.reasons[i] = rejections[-1].reason
            continue
        values = dict(zip(EVENT_COLUMNS, event_row(e), strict=True))
        values["payload"] = e.payload
        stmt = pg_insert(events).values(values).on_conflict_do_nothing().returning(events.c.id)
        try:
            with conn.begin_nested():
                new_id = conn.execute(stmt).scalar()
        except REFUSABLE as exc:
            if is_transient(exc):
                raise
            rejections.append(poison_rejection(e, exc))
            out.ids.append(None)
            out.reasons[i] = rejections[-1].reason
            continue
        out.ids.append(new_id)
        if new_id is None:
            out.duplicates += 1
            log.warning(
                "event already stored, skipped",
                extra={"event_type": e.event_type, "position": _position(e.position)},
            )
        else:
            out.written += 1
    return out, rejections


def insert_rejections(conn: Connection, rejections: list[Rejection]) -> int:
    """Dead-letter rows, idempotent by stream position; returns how many were new."""
    if not rejections:
        return 0
    rows = [rejection_row(r) for r in rejections]
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


def insert_rejections_careful(conn: Connection, rejections: list[Rejection]) -> int:
    """Each rejection alone; one still refused is stored without its raw text."""
    stored = 0
    for r in rejections:
        try:
            with conn.begin_nested():
                stored += insert_rejections(conn, [r])
            continue
        except REFUSABLE as exc:
            if is_transient(exc):
                raise
            reason = f"{r.reason} (raw text refused: {describe(exc)})"
        bare = Rejection(reason, b"", r.source_path, r.offset, r.full_length, r.position)
        bare.event_type = r.event_type
        with conn.begin_nested():
            stored += insert_rejections(conn, [bare])
    return stored


def rejection_row(r: Rejection) -> dict[str, Any]:
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


def invalid_rejection(event: Event, exc: InvalidEvent) -> Rejection:
    return Rejection(
        reason=f"invalid_payload: {exc}",
        raw=safe_dumps(event.payload),
        offset=event.position.offset if event.position else None,
        position=event.position,
        event_type=event.event_type,
        details={"field": exc.field} if exc.field else {},
    )


def poison_rejection(event: Event, exc: BaseException) -> Rejection:
    log.error(
        "event refused by the database",
        extra={"event_type": event.event_type, "error": describe(exc)},
    )
    return Rejection(
        reason=f"database_refused: {describe(exc)}",
        raw=safe_dumps(event.payload),
        offset=event.position.offset if event.position else None,
        position=event.position,
        event_type=event.event_type,
    )


def safe_dumps(payload: Any) -> str:
    try:
        return json.dumps(payload, ensure_ascii=False, default=repr)
    except Exception:
        return repr(payload)


def _position(p: SourcePosition | None) -> str | None:
    return None if p is None else f"{p.source_id}/{p.generation}/{p.offset}/{p.seq}"
