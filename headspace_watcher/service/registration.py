"""Explicit session registration (CLI / Python API), durable in the ``sessions`` table.

Registration goes through the store's guarded lifecycle path, the same one the service
uses, so a ``register`` racing the service's own discovery of the session yields one
``session_registered``, never two. The event is validated before anything is written: a
registration that would be rejected never leaves its session marked active.
"""

from __future__ import annotations

import uuid
from dataclasses import replace
from datetime import UTC, datetime

from headspace_watcher.errors import InvalidEvent
from headspace_watcher.ingest.sessions import lifecycle_key
from headspace_watcher.records import Batch, Event, SessionChange, SessionInfo
from headspace_watcher.store import Store
from headspace_watcher.taxonomy import validate_payload

_ATTEMPTS = 3  # guard lost to a racing writer: read again and decide again


def canonical_uuid(value: str) -> str:
    """The session id as Claude Code writes it (lower-case 8-4-4-4-12), or InvalidEvent."""
    try:
        parsed = uuid.UUID(value)
    except (ValueError, AttributeError, TypeError):
        raise InvalidEvent(
            "session_registered", "session id: expected a UUID like 123e4567-e89b-…", "session_uuid"
        ) from None
    if str(parsed) != value.lower() or len(value) != 36:
        raise InvalidEvent(
            "session_registered",
            "session id: expected the canonical 8-4-4-4-12 form",
            "session_uuid",
        )
    return value.lower()


def register_session(
    store: Store,
    session_uuid: str,
    project_path: str,
    working_directory: str,
    iterm_pane_id: str | None = None,
) -> bool:
    """Monitor the session; record ``session_registered`` unless it is already active.

    Returns True when an event was recorded; raises InvalidEvent (nothing written) when the
    uuid or the registration payload is invalid.
    """
    session_uuid = canonical_uuid(session_uuid)
    payload: dict[str, str] = {
        "session_uuid": session_uuid,
        "project_path": project_path,
        "working_directory": working_directory,
        "source": "cli",
    }
    if iterm_pane_id is not None:
        payload["iterm_pane_id"] = iterm_pane_id
    payload = validate_payload("session_registered", payload)
    for _ in range(_ATTEMPTS):
        current = store.session(session_uuid)
        if current is not None and current.state == "active":
            details = {
                "project_path": project_path,
                "working_directory": working_directory,
                "iterm_pane_id": iterm_pane_id,
            }
            store.set_monitoring(session_uuid, True, details)
            return False
        now = datetime.now(UTC)
        epoch = (current.epoch if current else 0) + 1
        info = SessionInfo(
            session_uuid, "active", epoch, now, now, project_path, True, working_directory,
            iterm_pane_id,
        )  # fmt: skip
        event = Event(
            "session_registered",
            dict(payload),
            now,
            project_path=project_path,
            agent_key=session_uuid,
            idempotency_key=lifecycle_key("session_registered", session_uuid, epoch),
        )
        change = SessionChange("register", info, epoch - 1)
        result = store.write_batch(Batch(events=[event], sessions=[change]))
        if not result.lost:
            return True
    return False


def unregister_session(store: Store, session_uuid: str) -> bool:
    """Stop monitoring; record ``session_ended`` (unregistered) if the session is active."""
    session_uuid = canonical_uuid(session_uuid)
    for _ in range(_ATTEMPTS):
        current = store.session(session_uuid)
        if current is None or current.state != "active":
            if current is not None:
                store.set_monitoring(session_uuid, False)
            return False
        now = datetime.now(UTC)
        info = replace(current, state="ended", monitored=False)
        duration = max(0, int((now - current.registered_at).total_seconds()))
        event = Event(
            "session_ended",
            {"session_uuid": session_uuid, "reason": "unregistered", "duration_seconds": duration},
            now,
            project_path=current.project_path,
            agent_key=session_uuid,
            idempotency_key=lifecycle_key("session_ended", session_uuid, current.epoch),
        )
        change = SessionChange("end", info, current.epoch, "unregistered", now)
        result = store.write_batch(Batch(events=[event], sessions=[change]))
        if not result.lost:
            return True
    return False
