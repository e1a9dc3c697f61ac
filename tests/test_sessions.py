"""Session lifecycle: the tracker's decisions, inactivity timeouts (injected clock and live),
``file_watcher.mode: registered``, and ``register``/``unregister`` (CLI and Python API)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from watcher_helpers import (
    append,
    assistant,
    conversation,
    project_dir,
    rows,
    scalar,
    session_events,
    source_row,
    turn_texts,
    user,
    wait_for,
)

from headspace_watcher.ingest.sessions import SessionTracker
from headspace_watcher.records import SourcePosition
from headspace_watcher.service.registration import register_session, unregister_session
from headspace_watcher.store import Store

S1 = "a1a1a1a1-b2b2-4c3c-8d4d-e5e5e5e5e5e5"
S2 = "f6f6f6f6-0707-4818-9929-3a3a3a3a3a3a"
T0 = datetime(2025, 3, 1, 10, 0, 0, tzinfo=UTC)


def fixed(at: datetime) -> Callable[[], datetime]:
    return lambda: at


def session_row(engine, session: str):  # type: ignore[no-untyped-def]
    found = rows(engine, "SELECT * FROM sessions WHERE session_uuid = :s", s=session)
    return found[0] if found else None


# =========================================================================== the tracker


def test_tracker_registers_once_then_records_activity() -> None:
    tracker = SessionTracker(inactivity_timeout=60)
    pos = SourcePosition(1, 0, 0, 0)

    event, change = tracker.observe(S1, T0, "/srv/app", "/srv/app", pos)
    assert event is not None and event.event_type == "session_registered"
    assert event.payload["session_uuid"] == S1
    assert event.position == pos
    assert (change.kind, change.expected_epoch, change.info.epoch) == ("register", 0, 1)
    tracker.commit()

    event2, change2 = tracker.observe(S1, T0 + timedelta(seconds=5), None, None, pos)
    assert event2 is None
    assert change2.kind == "activity"
    tracker.commit()
    assert tracker.get(S1).last_activity_at == T0 + timedelta(seconds=5)
    assert tracker.active_count == 1


def test_tracker_rollback_forgets_staged_decisions() -> None:
    tracker = SessionTracker(inactivity_timeout=60)
    tracker.observe(S1, T0, None, None, None)

    tracker.rollback()

    assert tracker.get(S1) is None
    event, _ = tracker.observe(S1, T0, None, None, None)
    assert event is not None  # still a first sighting


def test_tracker_deadline_due_and_end_with_duration() -> None:
    tracker = SessionTracker(inactivity_timeout=60)
    tracker.observe(S1, T0, None, None, None)
    tracker.observe(S1, T0 + timedelta(seconds=30), None, None, None)
    tracker.commit()

    assert tracker.next_deadline() == T0 + timedelta(seconds=90)
    assert tracker.due(T0 + timedelta(seconds=89)) == []
    due = tracker.due(T0 + timedelta(seconds=500))
    assert due == [(S1, T0 + timedelta(seconds=90))]

    event, change = tracker.end(S1, "timeout", due[0][1])
    tracker.commit()
    assert event.payload == {"session_uuid": S1, "reason": "timeout", "duration_seconds": 90}
    assert (change.kind, change.end_reason, change.expected_epoch) == ("end", "timeout", 1)
    assert tracker.next_deadline() is None
    assert tracker.due(T0 + timedelta(days=1)) == []

    again, change = tracker.observe(S1, T0 + timedelta(seconds=600), None, None, None)
    assert again is not None  # a session that writes after ending is registered again
    assert (change.expected_epoch, change.info.epoch) == (1, 2)


# =========================================================================== inactivity


def test_inactivity_timeout_with_injected_clock(watcher, db_engine) -> None:
    watcher.configure(file_watcher={"inactivity_timeout": 60})
    path = project_dir(watcher.root) / f"{S1}.jsonl"
    append(path, user(S1, "hello", at=T0), assistant(S1, "hi", at=T0 + timedelta(seconds=10)))

    watcher.run_once(clock=fixed(T0 + timedelta(seconds=20)))
    assert len(session_events(db_engine, S1, "session_registered")) == 1
    assert session_events(db_engine, S1, "session_ended") == []

    watcher.run_once(clock=fixed(T0 + timedelta(seconds=75)))  # 65 s after the last line
    ended = session_events(db_engine, S1, "session_ended")
    assert ended == [{"session_uuid": S1, "reason": "timeout", "duration_seconds": 70}]
    ended_at = scalar(db_engine, "SELECT timestamp FROM events WHERE event_type = 'session_ended'")
    assert ended_at == T0 + timedelta(seconds=70)  # when the deadline passed

    watcher.run_once(clock=fixed(T0 + timedelta(seconds=500)))
    assert len(session_events(db_engine, S1, "session_ended")) == 1  # exactly one

    append(path, user(S1, "back again", at=T0 + timedelta(seconds=600)))
    watcher.run_once(clock=fixed(T0 + timedelta(seconds=610)))
    assert len(session_events(db_engine, S1, "session_registered")) == 2
    row = session_row(db_engine, S1)
    assert (row.state, row.epoch) == ("active", 2)
    assert len(session_events(db_engine, S1, "session_ended")) == 1


def test_a_future_dated_line_does_not_delay_the_inactivity_timeout(watcher, db_engine) -> None:
    """A line stamped in 2099 counts as activity *now*: the session still times out."""
    watcher.configure(file_watcher={"inactivity_timeout": 60})
    path = project_dir(watcher.root) / f"{S1}.jsonl"
    append(path, user(S1, "from the future", at=datetime(2099, 1, 1, tzinfo=UTC)))

    watcher.run_once(clock=fixed(T0))
    assert len(session_events(db_engine, S1, "session_registered")) == 1
    assert session_events(db_engine, S1, "session_ended") == []

    watcher.run_once(clock=fixed(T0 + timedelta(seconds=120)))
    ended = session_events(db_engine, S1, "session_ended")
    assert ended == [{"session_uuid": S1, "reason": "timeout", "duration_seconds": 60}]
    ended_at = scalar(db_engine, "SELECT timestamp FROM events WHERE event_type = 'session_ended'")
    assert ended_at == T0 + timedelta(seconds=60)


def test_live_inactivity_timeout_fires_while_idle(watcher, db_engine) -> None:
    watcher.configure(file_watcher={"inactivity_timeout": 1})
    proc = watcher.start()
    path = project_dir(watcher.root) / f"{S1}.jsonl"

    append(path, user(S1, "only line", at=datetime.now(UTC)))

    ended = wait_for(
        lambda: session_events(db_engine, S1, "session_ended"), "the timeout", details=proc.log
    )
    assert ended[0]["reason"] == "timeout"
    assert ended[0]["duration_seconds"] in (0, 1, 2)
    append(path, assistant(S1, "again", at=datetime.now(UTC)))
    wait_for(
        lambda: len(session_events(db_engine, S1, "session_registered")) == 2,
        "the re-registration",
        details=proc.log,
    )
    assert proc.stop() == 0
    assert len(session_events(db_engine, S1, "session_ended")) in (1, 2)


# =========================================================================== registered mode


def test_registered_mode_ingests_only_registered_sessions(watcher, db_engine, exactly_once) -> None:
    watcher.configure(file_watcher={"mode": "registered"})
    proj = project_dir(watcher.root)
    s1_files = [proj / f"{S1}.jsonl", proj / S1 / "subagents" / "agent-a77.jsonl"]
    s2_files = [proj / f"{S2}.jsonl", proj / "agent-b88.jsonl"]  # 2.0 layout: id in its lines
    append(s1_files[0], *conversation(S1, 3))
    append(s1_files[1], assistant(S1, "s1 sub", agentId="a77"))
    append(s2_files[0], *conversation(S2, 2))
    append(s2_files[1], assistant(S2, "s2 sub", agentId="b88"))
    assert register_session(Store.for_engine(db_engine), S1, "/srv/one", "/srv/one") is True

    watcher.run_once()

    assert {t for t in turn_texts(db_engine) if "s2" in t or S2[:8] in t} == set()
    assert len(turn_texts(db_engine, S1)) == 4
    assert all(source_row(db_engine, p) is None for p in s2_files)
    exactly_once(
        db_engine, watcher.root, max_line_bytes=watcher.max_line_bytes,
        files=[str(p) for p in s1_files],
    )  # fmt: skip

    done = watcher.cli("register", S2, "--project-path", "/srv/two", "--working-directory", "/w")
    assert done.returncode == 0, done.stderr
    watcher.run_once()

    assert len(turn_texts(db_engine, S2)) == 3
    assert len(turn_texts(db_engine, S1)) == 4  # nothing of S1 again
    assert len(session_events(db_engine, S2, "session_registered")) == 1  # the CLI's only
    exactly_once(db_engine, watcher.root, max_line_bytes=watcher.max_line_bytes)


# =========================================================================== register / unregister


def test_cli_register_then_service_sees_the_session_registers_once(watcher, db_engine) -> None:
    args = ["--project-path", "/srv/app", "--working-directory", "/srv/app/sub"]
    first = watcher.cli("register", S1, *args, "--iterm-pane-id", "w0t0p1")
    assert first.returncode == 0, first.stderr
    writer = Store.for_engine(db_engine)
    assert register_session(writer, S1, "/srv/app", "/srv/app/sub", "w0t0p1") is False  # again

    registered = session_events(db_engine, S1, "session_registered")
    assert registered == [
        {
            "session_uuid": S1,
            "project_path": "/srv/app",
            "working_directory": "/srv/app/sub",
            "source": "cli",
            "iterm_pane_id": "w0t0p1",
        }
    ]
    row = session_row(db_engine, S1)
    assert (row.state, row.monitored) == ("active", True)

    append(project_dir(watcher.root) / f"{S1}.jsonl", *conversation(S1, 2))
    watcher.run_once()

    assert len(turn_texts(db_engine, S1)) == 2
    assert len(session_events(db_engine, S1, "session_registered")) == 1

    gone = watcher.cli("unregister", S1)
    assert gone.returncode == 0, gone.stderr
    assert unregister_session(writer, S1) is False  # again: nothing more recorded
    ended = session_events(db_engine, S1, "session_ended")
    assert len(ended) == 1
    assert ended[0]["reason"] == "unregistered"
    row = session_row(db_engine, S1)
    assert (row.state, row.monitored, row.end_reason) == ("ended", False, "unregistered")


def test_service_first_then_register_records_no_second_registration(watcher, db_engine) -> None:
    append(project_dir(watcher.root) / f"{S1}.jsonl", *conversation(S1, 2))
    watcher.run_once()
    assert len(session_events(db_engine, S1, "session_registered")) == 1

    writer = Store.for_engine(db_engine)
    assert register_session(writer, S1, "/srv/app", "/srv/app", "pane-9") is False

    assert len(session_events(db_engine, S1, "session_registered")) == 1
    row = session_row(db_engine, S1)
    assert (row.monitored, row.iterm_pane_id) == (True, "pane-9")
    assert unregister_session(writer, S1) is True
    assert unregister_session(writer, S1) is False
    assert [e["reason"] for e in session_events(db_engine, S1, "session_ended")] == ["unregistered"]


def test_live_registered_mode_follows_register_and_unregister(watcher, db_engine) -> None:
    watcher.configure(file_watcher={"mode": "registered"})
    writer = Store.for_engine(db_engine)
    path = project_dir(watcher.root) / f"{S1}.jsonl"
    other = project_dir(watcher.root) / f"{S2}.jsonl"
    append(path, user(S1, "before registration", at=datetime.now(UTC)))
    assert register_session(writer, S2, "/srv/b", "/srv/b") is True
    proc = watcher.start()

    assert register_session(writer, S1, "/srv/a", "/srv/a") is True  # while running
    wait_for(lambda: turn_texts(db_engine, S1), "ingestion after register", details=proc.log)
    append(path, assistant(S1, "while registered", at=datetime.now(UTC)))
    wait_for(lambda: len(turn_texts(db_engine, S1)) == 2, "a live append", details=proc.log)

    assert unregister_session(writer, S1) is True
    append(path, user(S1, "right after unregister", at=datetime.now(UTC)))
    append(other, user(S2, "barrier", at=datetime.now(UTC)))  # S1's line was seen by then
    wait_for(lambda: turn_texts(db_engine, S2), "the barrier line", details=proc.log)
    assert proc.stop() == 0

    assert turn_texts(db_engine, S1) == ["before registration", "while registered"]
    assert len(session_events(db_engine, S1, "session_registered")) == 1
    assert [e["reason"] for e in session_events(db_engine, S1, "session_ended")] == ["unregistered"]


def test_live_writing_after_unregister_registers_the_session_again(watcher, db_engine) -> None:
    path = project_dir(watcher.root) / f"{S1}.jsonl"
    append(path, user(S1, "one", at=datetime.now(UTC)))
    proc = watcher.start()
    wait_for(lambda: session_events(db_engine, S1, "session_registered"), "registration")

    assert unregister_session(Store.for_engine(db_engine), S1) is True
    append(path, assistant(S1, "two", at=datetime.now(UTC)))

    wait_for(lambda: len(turn_texts(db_engine, S1)) == 2, "the new line", details=proc.log)
    assert proc.stop() == 0
    registered = rows(
        db_engine,
        "SELECT e.payload->>'source', e.source_offset FROM events e "
        "WHERE e.event_type = 'session_registered' ORDER BY e.id",
    )
    two_at = scalar(db_engine, "SELECT max(source_offset) FROM events")
    assert [tuple(r) for r in registered] == [("transcript", 0), ("transcript", two_at)]
    row = session_row(db_engine, S1)
    assert (row.state, row.epoch) == ("active", 2)
    assert turn_texts(db_engine, S1) == ["one", "two"]


def test_a_new_session_row_points_at_the_project_and_agent_of_its_own_batch(
    watcher, db_engine
) -> None:  # type: ignore[no-untyped-def]
    """The session, its project and its agent are all new in one batch: the session row must
    get the ids created in that very transaction, not NULL (only committed ids were seen)."""
    append(project_dir(watcher.root) / f"{S1}.jsonl", *conversation(S1, 3))
    watcher.run_once()
    row = rows(
        db_engine,
        "SELECT s.project_id, s.agent_id, p.path, a.session_uuid FROM sessions s "
        "LEFT JOIN projects p ON p.id = s.project_id LEFT JOIN agents a ON a.id = s.agent_id "
        "WHERE s.session_uuid = :s",
        s=S1,
    )
    assert [(r.path, r.session_uuid) for r in row] == [("/home/dev/src/demo", S1)]
