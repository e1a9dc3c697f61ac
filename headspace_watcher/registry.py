"""Explicit session registration (CLI / Python API), durable in the ``sessions`` table.

Registration goes through the writer's guarded lifecycle path, the same one the service
uses, so a ``register`` racing the service's own discovery of the session yields one
``session_registered``, never two.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from datetime import UTC, datetime

from sqlalchemy import select, update

from headspace_watcher.db import sessions
from headspace_watcher.events import Event
from headspace_watcher.sessions import SessionChange, SessionInfo
from headspace_watcher.writer import Batch, EventWriter

log = logging.getLogger(__name__)


def _current(writer: EventWriter, session_uuid: str) -> SessionInfo | None:
    with writer.engine.connect() as conn:
        r = conn.execute(select(sessions).where(sessions.c.session_uuid == session_uuid)).first()
    return None if r is None else SessionInfo.from_row(r)


def register_session(
    writer: EventWriter,
    session_uuid: str,
    project_path: str,
    working_directory: str,
    iterm_pane_id: str | None = None,
) -> bool:
    """Monitor the session; record ``session_registered`` unless it is already active.

    Returns True when an event was recorded.
    """
    for _ in range(3):
        current = _current(writer, session_uuid)
        if current is not None and current.state == "active":
            with writer.engine.begin() as conn:
                conn.execute(
                    update(sessions)
                    .where(sessions.c.session_uuid == session_uuid)
                    .values(
                        monitored=True,
                        project_path=project_path,
                        working_directory=working_directory,
                        iterm_pane_id=iterm_pane_id,
                    )
                )
            return False
        now = datetime.now(UTC)
        info = SessionInfo(
            session_uuid,
            "active",
            (current.epoch if current else 0) + 1,
            now,
            now,
            project_path,
            True,
            working_directory,
            iterm_pane_id,
        )
        payload = {
            "session_uuid": session_uuid,
            "project_path": project_path,
            "working_directory": working_directory,
            "source": "cli",
        }
        if iterm_pane_id is not None:
            payload["iterm_pane_id"] = iterm_pane_id
        event = Event(
            "session_registered", payload, now, project_path=project_path, agent_key=session_uuid
        )
        change = SessionChange("register", info, info.epoch - 1)
        result = writer.write_batch(Batch(events=[event], sessions=[change]))
        if not result.lost:
            return True
    return False


def unregister_session(writer: EventWriter, session_uuid: str) -> bool:
    """Stop monitoring; record ``session_ended`` (unregistered) if the session is active."""
    for _ in range(3):
        current = _current(writer, session_uuid)
        if current is None or current.state != "active":
            if current is not None:
                with writer.engine.begin() as conn:
                    conn.execute(
                        update(sessions)
                        .where(sessions.c.session_uuid == session_uuid)
                        .values(monitored=False)
                    )
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
        )
        change = SessionChange("end", info, current.epoch, "unregistered", now)
        result = writer.write_batch(Batch(events=[event], sessions=[change]))
        if not result.lost:
            return True
    return False
