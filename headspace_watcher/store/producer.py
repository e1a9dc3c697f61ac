"""The producer API: one event written inside the caller's own transaction.

For in-process producers — the state machine, the hook receiver, the CLI — whose events have
no stream position. Why inside the caller's transaction: a state change and the
``state_transition`` event that records it must commit together or not at all. Why an
idempotency key: a producer that retries after a lost commit acknowledgement must not store
the event twice; the key's unique index makes the second write a no-op (``duplicate``).
Every write ends in one distinct outcome; a rejected event also leaves its dead-letter row
in the same transaction, so it is never silently lost.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

from sqlalchemy import Connection

from headspace_watcher.records import Event, Rejection
from headspace_watcher.store import rows
from headspace_watcher.store.references import NewRefs, References

log = logging.getLogger(__name__)

MAX_KEY_LENGTH = 512  # a btree index row holds ~2.7 KB; keys are names, not payloads


@dataclass(frozen=True, slots=True)
class WriteOutcome:
    """``stored`` (with the new id), ``duplicate`` (same key already stored: nothing
    written) or ``rejected`` (with the reason; a ``rejected_events`` row was written)."""

    status: Literal["stored", "duplicate", "rejected"]
    event_id: int | None = None
    reason: str | None = None

    @property
    def stored(self) -> bool:
        return self.status == "stored"


def write_event(conn: Connection, event: Event) -> WriteOutcome:
    """Validate and insert ``event`` in ``conn``'s open transaction; never commits.

    The event needs an ``idempotency_key`` (or a stream position). Transient database errors
    propagate: the caller's transaction is then lost anyway and the caller retries it whole.
    """
    problem = _key_problem(event)
    if problem is not None:
        return _reject(conn, event, problem)
    refs = NewRefs()
    References().resolve(conn, [event], refs)
    outcomes, rejections = rows.insert_careful(conn, [event])
    if rejections:
        rows.insert_rejections(conn, rejections)
        return WriteOutcome("rejected", reason=rejections[0].reason)
    new_id = outcomes.ids[0]
    if new_id is None:
        return WriteOutcome("duplicate")
    return WriteOutcome("stored", event_id=new_id)


def _key_problem(event: Event) -> str | None:
    key = event.idempotency_key
    if key is None:
        if event.position is None:
            return "unkeyed: an event without a stream position needs an idempotency_key"
        return None
    if not isinstance(key, str) or not key or len(key) > MAX_KEY_LENGTH:
        return f"invalid_idempotency_key: expected a non-empty string of <= {MAX_KEY_LENGTH} chars"
    return None


def _reject(conn: Connection, event: Event, reason: str) -> WriteOutcome:
    rejection = Rejection(
        reason=reason,
        raw=rows.safe_dumps(event.payload),
        position=event.position,
        event_type=event.event_type,
    )
    rows.insert_rejections(conn, [rejection])
    return WriteOutcome("rejected", reason=reason)
