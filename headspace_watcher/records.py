"""Records that travel between the stages: sources → ingest → store.

Plain data, no behaviour worth the name, and no imports of ours: every layer may use them,
so they are what keeps the layers from importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

# ---------------------------------------------------------------------------- positions


@dataclass(slots=True)
class StreamState:
    """The durable position of one stream (a transcript file today): a ``sources`` row.

    Only the store moves ``committed_offset`` forward, in the transaction that stores what
    the bytes before it produced; a source only reads this state.
    """

    source_id: int
    path: str
    inode: int
    device: int
    generation: int
    committed_offset: int
    fingerprint: bytes | None
    lines_committed: int = 0


@dataclass(frozen=True, slots=True)
class SourcePosition:
    """Where an event came from: the key that makes re-writes idempotent.

    ``seq`` numbers the events produced by one line (a line may yield a
    ``session_registered`` and a ``turn_detected``), so each has its own key.
    """

    source_id: int
    generation: int
    offset: int
    seq: int = 0


@dataclass(frozen=True, slots=True)
class SourceAdvance:
    """Moves one stream's checkpoint from ``start_offset`` to ``end_offset``."""

    source_id: int
    generation: int
    start_offset: int
    end_offset: int
    lines: int
    fingerprint: bytes | None = None


# ---------------------------------------------------------------------------- what sources yield


@dataclass(frozen=True, slots=True)
class FileContext:
    """What the file's path tells about its lines.

    Computed once per watched file, so that ``parse_line`` has fallbacks for lines that lack
    ``sessionId``/``cwd``/``agentId`` without re-deriving them per line.
    """

    path: str
    session_hint: str | None
    subagent_hint: str | None
    project_hint: str | None


@dataclass(frozen=True, slots=True)
class Oversized:
    """A complete line longer than the limit: only its head was kept."""

    offset: int
    length: int  # without the newline
    head: bytes


@dataclass(slots=True)
class Chunk:
    """Complete records of one stream, read past its checkpoint, and where they end.

    ``kind`` tells ingest how to turn the records into events (``transcript`` today).
    ``failure`` is set instead of records when the stream could not be read at all (it is
    recorded once per checkpoint as a rejection); ``context`` is whatever the source knows
    about the stream that ingest needs (for transcripts: the path's session/project hints).
    """

    kind: str
    path: str
    state: StreamState | None  # None only for a failure before any checkpoint existed
    start: int
    end: int
    records: list[tuple[int, bytes]] = field(default_factory=list)
    oversized: list[Oversized] = field(default_factory=list)
    fingerprint: bytes | None = None
    context: Any = None
    failure: str | None = None

    @property
    def count(self) -> int:
        return len(self.records) + len(self.oversized)

    @property
    def nbytes(self) -> int:
        return self.end - self.start


# ---------------------------------------------------------------------------- what ingest makes


@dataclass(slots=True)
class Event:
    """One event of the taxonomy, ready to validate and store.

    ``position`` keys an event derived from a stream; ``idempotency_key`` keys an event from
    an in-process producer (CLI, state machine) that has no position. Either makes a second
    write of the same event store nothing.
    """

    event_type: str
    payload: dict[str, Any]
    timestamp: datetime
    project_path: str | None = None
    agent_key: str | None = None
    position: SourcePosition | None = None
    idempotency_key: str | None = None
    project_id: int | None = None
    agent_id: int | None = None
    task_id: int | None = None
    turn_id: int | None = None


@dataclass(slots=True)
class Rejection:
    """A line or event that could not become an event; stored in ``rejected_events``."""

    reason: str
    raw: bytes | str
    source_path: str | None = None
    offset: int | None = None
    full_length: int | None = None
    position: SourcePosition | None = None
    event_type: str | None = None
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """One ``sessions`` row as the pipeline sees it."""

    session_uuid: str
    state: str  # active | ended
    epoch: int
    registered_at: datetime
    last_activity_at: datetime
    project_path: str | None = None
    monitored: bool = False
    working_directory: str | None = None
    iterm_pane_id: str | None = None


@dataclass(frozen=True, slots=True)
class SessionChange:
    """A lifecycle decision for the store.

    kind ``register``: applies only if the row is absent or ended with ``expected_epoch``;
    kind ``activity``: moves ``last_activity_at`` forward; kind ``end``: applies only if the
    row is active with ``expected_epoch``. A change whose guard fails drops its event.
    """

    kind: str
    info: SessionInfo
    expected_epoch: int
    end_reason: str | None = None
    ended_at: datetime | None = None


@dataclass(slots=True)
class Batch:
    """Everything one transaction stores: events, rejections, session changes, and the
    checkpoints of the bytes they came from."""

    events: list[Event] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)
    advances: list[SourceAdvance] = field(default_factory=list)
    sessions: list[SessionChange] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.events or self.rejections or self.advances or self.sessions)


@dataclass(slots=True)
class WriteResult:
    """What a batch's transaction did."""

    written: int = 0
    rejected: int = 0
    duplicates: int = 0
    # lifecycle decisions whose guard lost (someone else registered/ended first): (kind, uuid)
    lost: set[tuple[str, str]] = field(default_factory=set)
