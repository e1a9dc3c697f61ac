"""Session lifecycle: when a session starts being seen, and when it has gone quiet.

The tracker only decides; it holds no connection (its durable state is handed in from the
store) and the store applies each decision under a guard in the database (``sessions``
row state/epoch), so a CLI ``register``/``unregister`` racing the service can
never produce a second ``session_registered`` or ``session_ended`` for the same epoch.
Decisions are staged and become the tracker's state only once their batch has committed.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from datetime import datetime, timedelta

from headspace_watcher.records import Event, SessionChange, SessionInfo, SourcePosition


def lifecycle_key(event_type: str, session_uuid: str, epoch: int) -> str:
    """The idempotency key of a lifecycle event: one per session, epoch and kind."""
    return f"{event_type}:{session_uuid}:{epoch}"


class SessionTracker:
    def __init__(self, inactivity_timeout: float) -> None:
        self.timeout = timedelta(seconds=inactivity_timeout)
        self._known: dict[str, SessionInfo] = {}
        self._staged: dict[str, SessionInfo] = {}
        self._next: datetime | None = None

    # ---------------------------------------------------------------- state
    def load(self, infos: Iterable[SessionInfo]) -> None:
        """Adopt the durable state, so a restart neither re-registers nor forgets timers."""
        self._known = {i.session_uuid: i for i in infos}
        self._refresh_next()

    def get(self, session_uuid: str) -> SessionInfo | None:
        return self._staged.get(session_uuid) or self._known.get(session_uuid)

    def monitored(self) -> set[str]:
        return {k for k, v in self._known.items() if v.monitored}

    @property
    def active_count(self) -> int:
        return sum(1 for i in self._known.values() if i.state == "active")

    def commit(self) -> None:
        if self._staged:
            self._known.update(self._staged)
            self._staged.clear()
            self._refresh_next()

    def rollback(self) -> None:
        self._staged.clear()

    def forget(self, session_uuid: str) -> None:
        """Drop the cached view (e.g. after a guard failed) so the next load is authoritative."""
        self._known.pop(session_uuid, None)
        self._refresh_next()

    def _refresh_next(self) -> None:
        self._next = min(
            (i.last_activity_at for i in self._known.values() if i.state == "active"),
            default=None,
        )

    # ---------------------------------------------------------------- decisions
    def observe(
        self,
        session_uuid: str,
        at: datetime,
        project_path: str | None,
        working_directory: str | None,
        position: SourcePosition | None,
    ) -> tuple[Event | None, SessionChange]:
        """A line of ``session_uuid`` was seen at ``at``: maybe a (re-)registration."""
        current = self.get(session_uuid)
        if current is not None and current.state == "active":
            # called for every line of a catch-up: build the new info directly (replace()
            # costs several times more), or keep it when nothing moves
            last = current.last_activity_at
            adopt_path = bool(project_path) and not current.project_path
            if at <= last and not adopt_path:
                info = current
            else:
                info = SessionInfo(
                    current.session_uuid,
                    current.state,
                    current.epoch,
                    current.registered_at,
                    at if at > last else last,
                    project_path if adopt_path else current.project_path,
                    current.monitored,
                    current.working_directory,
                    current.iterm_pane_id,
                )
            self._staged[session_uuid] = info
            return None, SessionChange("activity", info, current.epoch)
        epoch = current.epoch + 1 if current else 1
        info = SessionInfo(
            session_uuid,
            "active",
            epoch,
            at,
            at,
            project_path,
            current.monitored if current else False,
        )
        self._staged[session_uuid] = info
        path = project_path or working_directory or "unknown"
        event = Event(
            "session_registered",
            {
                "session_uuid": session_uuid,
                "project_path": path,
                "working_directory": working_directory or path,
                "source": "transcript",
            },
            at,
            project_path=project_path,
            agent_key=session_uuid,
            position=position,
            idempotency_key=lifecycle_key("session_registered", session_uuid, epoch),
        )
        return event, SessionChange("register", info, epoch - 1)

    def end(self, session_uuid: str, reason: str, at: datetime) -> tuple[Event, SessionChange]:
        current = self.get(session_uuid)
        assert current is not None and current.state == "active"
        info = replace(current, state="ended")
        self._staged[session_uuid] = info
        duration = max(0, int((at - current.registered_at).total_seconds()))
        event = Event(
            "session_ended",
            {"session_uuid": session_uuid, "reason": reason, "duration_seconds": duration},
            at,
            project_path=current.project_path,
            agent_key=session_uuid,
            idempotency_key=lifecycle_key("session_ended", session_uuid, current.epoch),
        )
        return event, SessionChange("end", info, current.epoch, reason, at)

    def due(self, now: datetime) -> list[tuple[str, datetime]]:
        """Sessions whose inactivity deadline has passed, with the instant it passed."""
        if self._next is None or self._next + self.timeout > now:
            return []
        return sorted(
            (i.session_uuid, i.last_activity_at + self.timeout)
            for i in self._known.values()
            if i.state == "active" and i.last_activity_at + self.timeout <= now
        )

    def next_deadline(self) -> datetime | None:
        """When the next session times out: the service sleeps in inotify until then."""
        return None if self._next is None else self._next + self.timeout
