"""Session lifecycle: when a session starts being seen, and when it has gone quiet.

The tracker only decides; it holds no connection (its durable state is handed in from the
store) and the store applies each decision under a guard in the database (``sessions``
row state/epoch), so a CLI ``register``/``unregister`` racing the service can
never produce a second ``session_registered`` or ``session_ended`` for the same epoch.
Decisions are staged and become the tracker's state only once their batch has committed.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left
from collections.abc import Iterable
from dataclasses import replace
from datetime import datetime, timedelta

from headspace_watcher.records import Event, SessionChange, SessionInfo, SourcePosition


def lifecycle_key(event_type: str, session_uuid: str, epoch: int) -> str:
    """The idempotency key of a lifecycle event: one per session, epoch and kind."""
    return f"{event_type}:{session_uuid}:{epoch}"


class EndedEpochs:
    """The epoch of each ended session (what its next registration follows), ~16 bytes each
    in two flat arrays sorted by ``hash(session id)``: no Python object per session, as
    those outlive a catch-up's garbage and keep its heap pages from going back to the OS.

    Two ids of one hash (about n²/2^65 for n sessions) are kept by name once seen together
    by the constructor; before that the wrong epoch fails the store's guard, and the
    tracker's reload after a lost guard builds this again (and sees them together).
    """

    MERGE_AT = 512  # recent changes kept in a dict until merged into the arrays

    def __init__(self, sessions: Iterable[tuple[str, int]] = ()) -> None:
        self._keys = array("q")
        self._epochs = array("q")
        self._recent: dict[int, int] = {}
        self._named: dict[str, int] = {}
        owner: dict[int, str] = {}
        for uuid, epoch in sessions:
            key = hash(uuid)
            other = owner.setdefault(key, uuid)
            if other != uuid:
                self._named[uuid] = epoch
                self._named.setdefault(other, self._recent.get(key, 0))
            self._recent[key] = epoch
        self._merge()

    def get(self, session_uuid: str) -> int:
        """The epoch of the session's last registration; 0 if none is known."""
        named = self._named.get(session_uuid)
        if named is not None:
            return named
        key = hash(session_uuid)
        recent = self._recent.get(key)
        if recent is not None:
            return recent
        i = bisect_left(self._keys, key)
        return self._epochs[i] if i < len(self._keys) and self._keys[i] == key else 0

    def set(self, session_uuid: str, epoch: int) -> None:
        """``epoch`` 0: the session is not ended (active again, or forgotten)."""
        if session_uuid in self._named:
            self._named[session_uuid] = epoch
            return
        key = hash(session_uuid)
        i = bisect_left(self._keys, key)
        if i < len(self._keys) and self._keys[i] == key:
            self._epochs[i] = epoch
        elif epoch or key in self._recent:
            self._recent[key] = epoch
            if len(self._recent) >= self.MERGE_AT:
                self._merge()

    def _merge(self) -> None:
        if not self._recent:
            return
        merged = dict(zip(self._keys, self._epochs, strict=True))
        merged.update(self._recent)
        self._recent = {}
        keys = sorted(k for k, e in merged.items() if e)
        self._keys = array("q", keys)
        self._epochs = array("q", (merged[k] for k in keys))


class SessionTracker:
    """Active sessions in full; ended ones compactly (``EndedEpochs``: their epoch, for when
    they reappear): a tree of years of sessions costs bytes per ended one, not a row each."""

    def __init__(self, inactivity_timeout: float) -> None:
        self.timeout = timedelta(seconds=inactivity_timeout)
        self._active: dict[str, SessionInfo] = {}
        self._ended = EndedEpochs()
        self._ended_monitored: set[str] = set()  # registered mode: ended but still monitored
        self._staged: dict[str, SessionInfo] = {}
        self._next: datetime | None = None

    # ---------------------------------------------------------------- state
    def load(self, infos: Iterable[SessionInfo]) -> None:
        """Adopt the durable state, so a restart neither re-registers nor forgets timers."""
        self._active, self._ended_monitored = {}, set()
        ended: list[tuple[str, int]] = []
        for info in infos:
            if info.state == "active":
                self._active[info.session_uuid] = info
            else:
                ended.append((info.session_uuid, info.epoch))
                if info.monitored:
                    self._ended_monitored.add(info.session_uuid)
        self._ended = EndedEpochs(ended)
        self._refresh_next()

    def _adopt(self, info: SessionInfo) -> None:
        uuid = info.session_uuid
        if info.state == "active":
            self._active[uuid] = info
            self._ended.set(uuid, 0)
            self._ended_monitored.discard(uuid)
            return
        self._active.pop(uuid, None)
        self._ended.set(uuid, info.epoch)
        if info.monitored:
            self._ended_monitored.add(uuid)
        else:
            self._ended_monitored.discard(uuid)

    def get(self, session_uuid: str) -> SessionInfo | None:
        """The session if active or decided in the batch being built; None if ended."""
        return self._staged.get(session_uuid) or self._active.get(session_uuid)

    def touched(self, session_uuid: str) -> bool:
        """Decided on in the batch being built (a line of it, or its end)."""
        return session_uuid in self._staged

    def is_active(self, session_uuid: str) -> bool:
        return session_uuid in self._active

    def monitored(self) -> set[str]:
        return {k for k, v in self._active.items() if v.monitored} | self._ended_monitored

    @property
    def active_count(self) -> int:
        return len(self._active)

    def commit(self) -> None:
        if self._staged:
            before = len(self._active)
            for info in self._staged.values():
                self._adopt(info)
            self._staged.clear()
            if len(self._active) < before:  # ends: a dict never shrinks by deletions
                self._active = dict(self._active)
            self._refresh_next()

    def rollback(self) -> None:
        self._staged.clear()

    def forget(self, session_uuid: str) -> None:
        """Drop the cached view (e.g. after a guard failed) so the next load is authoritative."""
        self._active.pop(session_uuid, None)
        self._ended.set(session_uuid, 0)
        self._ended_monitored.discard(session_uuid)
        self._refresh_next()

    def _refresh_next(self) -> None:
        self._next = min((i.last_activity_at for i in self._active.values()), default=None)

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
        if current is not None:  # ended in this very batch
            epoch, monitored = current.epoch + 1, current.monitored
        else:
            epoch = self._ended.get(session_uuid) + 1
            monitored = session_uuid in self._ended_monitored
        info = SessionInfo(session_uuid, "active", epoch, at, at, project_path, monitored)
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
            for i in self._active.values()
            if i.last_activity_at + self.timeout <= now
        )

    def next_deadline(self) -> datetime | None:
        """When the next session times out: the service sleeps in inotify until then."""
        return None if self._next is None else self._next + self.timeout
