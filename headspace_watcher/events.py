"""Records that travel between the pipeline's stages (parser → writer)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


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


@dataclass(slots=True)
class Event:
    """One event of the taxonomy, ready to validate and store."""

    event_type: str
    payload: dict[str, Any]
    timestamp: datetime
    project_path: str | None = None
    agent_key: str | None = None
    position: SourcePosition | None = None
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
