"""Chunks of complete lines → the events, rejections and session decisions of one batch.

No database here: the store applies what this produces. Each line is accounted for exactly
once — as its events, as one rejection, or as a counted skip — and every event carries the
line's stream position with its own ``seq``, so a re-read of the same bytes can never store
a second copy.

Transcript-derived event types are derived by the functions registered with ``@deriver``
under their taxonomy name; the taxonomy (``REGISTRY``) says which types are derived from
transcripts, and this module refuses to load if one has no deriver. Adding such a type is
its registry entry plus one function here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from headspace_watcher.ingest.sessions import SessionTracker
from headspace_watcher.ingest.transcript import (
    HUGE_LINE_BYTES,
    LineOutcome,
    parse_line,
    parse_line_owned,
)
from headspace_watcher.records import Batch, Chunk, Event, Rejection, SourceAdvance, SourcePosition
from headspace_watcher.taxonomy import REGISTRY

log = logging.getLogger(__name__)

# source_seq of an unreadable-stream record: its position is the checkpoint the read failed
# at, set apart from the lines' own sequence numbers (0, 1, …) at that offset.
UNREADABLE_SEQ = -1

_REJECTION_HEAD = 64 * 1024  # the store keeps at most this much of a rejected line's text
Deriver = Callable[[LineOutcome], Iterator[dict[str, Any]]]
_DERIVERS: dict[str, Deriver] = {}


def deriver(event_type: str) -> Callable[[Deriver], Deriver]:
    """Register the function that derives ``event_type`` payloads from a parsed line."""

    def register(fn: Deriver) -> Deriver:
        _DERIVERS[event_type] = fn
        return fn

    return register


@deriver("turn_detected")
def _turns(out: LineOutcome) -> Iterator[dict[str, Any]]:
    """INTERFACE.md's turn rule, applied by the parser (``ingest.transcript``)."""
    if out.kind == "turn" and out.payload is not None:
        yield out.payload


_TRANSCRIPT_TYPES = [t.name for t in REGISTRY.values() if t.origin == "transcript"]
_missing = sorted(set(_TRANSCRIPT_TYPES) - set(_DERIVERS))
if _missing:  # a registry entry without its deriving code would silently derive nothing
    raise RuntimeError(f"transcript event types without a deriver: {_missing}")


@dataclass(slots=True)
class Counters:
    """What the lines came to, since the process started (for logs and ``status``)."""

    lines: int = 0
    turns: int = 0
    skipped: int = 0
    rejected_lines: int = 0
    batches: int = 0


class Deriving:
    """Turns chunks into a batch, staging session decisions in the tracker."""

    def __init__(
        self, tracker: SessionTracker, max_line: int, clock: Callable[[], datetime]
    ) -> None:
        self.tracker = tracker
        self.max_line = max_line
        self.clock = clock
        self.counters = Counters()

    def batch(self, chunks: list[Chunk]) -> Batch:
        batch = Batch()
        for chunk in chunks:
            if chunk.failure is not None:
                batch.rejections.append(_failure_rejection(chunk))
                continue
            self._lines(chunk, batch)
            st = chunk.state
            assert st is not None
            batch.advances.append(
                SourceAdvance(
                    st.source_id, st.generation, chunk.start, chunk.end, chunk.count,
                    chunk.fingerprint,
                )
            )  # fmt: skip
        return batch

    def _lines(self, chunk: Chunk, batch: Batch) -> None:
        st = chunk.state
        assert st is not None
        now = self.clock()
        records = chunk.records
        for i in range(len(records)):
            offset, raw = records[i]
            # handed over once: a huge line is not kept alive beside its parsed text
            records[i] = (offset, b"")
            length = len(raw)
            self.counters.lines += 1
            if length > HUGE_LINE_BYTES:
                holder = [raw]
                raw = raw[:_REJECTION_HEAD]  # all a rejection keeps; the parser frees the rest
                out = parse_line_owned(holder, chunk.context)
            else:
                out = parse_line(raw, chunk.context)
            if out.kind == "reject":
                self.counters.rejected_lines += 1
                pos = SourcePosition(st.source_id, st.generation, offset, 0)
                reason = out.reason or "rejected"
                batch.rejections.append(Rejection(reason, raw, chunk.path, offset, length, pos))
                continue
            seq = self._observe(out, st.source_id, st.generation, offset, now, batch)
            derived = 0
            for event_type, fn in _DERIVERS.items():
                for payload in fn(out):
                    self._warn_sanitized(payload, chunk.path, offset)
                    pos = SourcePosition(st.source_id, st.generation, offset, seq)
                    batch.events.append(_event(event_type, payload, out, pos, now))
                    seq += 1
                    derived += 1
            if out.kind == "turn":
                self.counters.turns += 1
            elif not derived:
                self.counters.skipped += 1
        for over in chunk.oversized:
            self.counters.lines += 1
            self.counters.rejected_lines += 1
            batch.rejections.append(
                Rejection(
                    f"line_too_long: {over.length} bytes > max_line_bytes {self.max_line}",
                    over.head,
                    chunk.path,
                    over.offset,
                    over.length,
                    SourcePosition(st.source_id, st.generation, over.offset, 0),
                )
            )

    def _observe(
        self,
        out: LineOutcome,
        source_id: int,
        generation: int,
        offset: int,
        now: datetime,
        batch: Batch,
    ) -> int:
        """Session activity of a line (maybe its registration); the next free ``seq``."""
        if not out.session_uuid or (out.kind != "turn" and out.timestamp is None):
            return 0
        # a future-dated line must not push the inactivity timeout past now
        at = min(out.timestamp, now) if out.timestamp else now
        pos = SourcePosition(source_id, generation, offset, 0)
        reg, change = self.tracker.observe(
            out.session_uuid, at, out.project_path, out.project_path, pos
        )
        batch.sessions.append(change)
        if reg is None:
            return 0
        batch.events.append(reg)
        return 1

    @staticmethod
    def _warn_sanitized(payload: dict[str, Any], path: str, offset: int) -> None:
        if payload.get("sanitized"):
            log.warning(
                "unstorable characters (NUL or lone surrogate) replaced by U+FFFD",
                extra={"path": path, "offset": offset},
            )


def _event(
    event_type: str, payload: dict[str, Any], out: LineOutcome, pos: SourcePosition, now: datetime
) -> Event:
    """The event of a line, timed by the line (or the inferred time in its payload)."""
    ts = out.timestamp
    if ts is None:
        inferred = payload.get("turn_timestamp")
        ts = datetime.fromisoformat(inferred) if isinstance(inferred, str) else now
    return Event(
        event_type,
        payload,
        ts,
        project_path=out.project_path,
        agent_key=out.session_uuid,
        position=pos,
    )


def _failure_rejection(chunk: Chunk) -> Rejection:
    """One durable record per stream and checkpoint (across restarts too), no content."""
    position = None
    if chunk.state is not None:
        st = chunk.state
        position = SourcePosition(st.source_id, st.generation, st.committed_offset, UNREADABLE_SEQ)
    return Rejection(chunk.failure or "unreadable", b"", chunk.path, None, 0, position)
