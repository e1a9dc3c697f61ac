"""Catch-up of a tree of many small sessions (issue 12): streams and sessions registered in
bulk, known files without a round trip, memory that does not grow with ended sessions.

Counts are statements and commits seen by SQLAlchemy on a real PostgreSQL (no timing)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, event, text
from watcher_helpers import append, new_uuid, project_dir, rows, scalar, user, wait_for

from headspace_watcher.errors import CheckpointConflict
from headspace_watcher.ingest.sessions import EndedEpochs
from headspace_watcher.records import SessionChange, SessionInfo
from headspace_watcher.store import sessions as store_sessions
from headspace_watcher.store.engine import make_engine
from headspace_watcher.store.references import IdCache, NewRefs, References

OLD = datetime.now(UTC).replace(microsecond=0) - timedelta(days=3)  # sessions long ended


class Seen:
    """Statements and commits of every engine in this process while counting."""

    def __init__(self) -> None:
        self.statements: list[str] = []
        self.commits = 0

    def inserts_into(self, table: str) -> int:
        return sum(
            s.lstrip().upper().startswith(f"INSERT INTO {table.upper()}") for s in self.statements
        )


@contextmanager
def counting() -> Iterator[Seen]:
    seen = Seen()

    def on_execute(_conn, _cursor, statement, *_args) -> None:  # type: ignore[no-untyped-def]
        seen.statements.append(statement)

    def on_commit(_conn) -> None:  # type: ignore[no-untyped-def]
        seen.commits += 1

    event.listen(Engine, "before_cursor_execute", on_execute)
    event.listen(Engine, "commit", on_commit)
    try:
        yield seen
    finally:
        event.remove(Engine, "before_cursor_execute", on_execute)
        event.remove(Engine, "commit", on_commit)


def small_sessions(root: Path, n: int) -> list[Path]:
    """``n`` sessions of one turn each, days old, over 3 projects."""
    paths = []
    for i in range(n):
        session = new_uuid()
        path = project_dir(root, f"-home-dev-src-p{i % 3}") / f"{session}.jsonl"
        append(path, user(session, f"turn {i}", at=OLD))
        paths.append(path)
    return paths


# --------------------------------------------------------------------------- the service


def test_many_new_files_are_registered_in_bulk(watcher, db_engine, exactly_once) -> None:  # type: ignore[no-untyped-def]
    small_sessions(watcher.root, 1500)
    with counting() as seen:
        watcher.run_once()
    # 1,500 lines at 500 a batch: 3 batches; 1,500 new files: 3 registrations (500 each),
    # not one transaction per file
    assert seen.inserts_into("sources") <= 3
    assert seen.commits < 40, seen.commits
    assert scalar(db_engine, "SELECT count(*) FROM sources") == 1500
    exactly_once(db_engine, watcher.root)
    # every session ended and every file caught up: nothing of them is kept
    status = watcher.status_file()
    assert (status["files_watched"], status["sessions_watched"]) == (0, 0)


def test_a_batch_takes_at_most_128_streams(watcher, db_engine, exactly_once) -> None:  # type: ignore[no-untyped-def]
    """Lines alone would pack 500 one-line files into a batch; each file also costs its
    state and a session's rows, so a batch stops at 128 files (600 files: 5 batches)."""
    small_sessions(watcher.root, 600)
    with counting() as seen:
        watcher.run_once()
    advances = sum("UPDATE sources SET committed_offset" in s for s in seen.statements)
    assert advances == 5, advances
    exactly_once(db_engine, watcher.root)


def test_known_files_are_looked_up_in_bulk_on_a_rerun(watcher, db_engine, exactly_once) -> None:  # type: ignore[no-untyped-def]
    small_sessions(watcher.root, 1200)
    watcher.run_once()
    with counting() as seen:
        watcher.run_once()
    assert seen.inserts_into("sources") == 0  # known: only read, nothing written for them
    lookups = sum("FROM sources" in s and "ANY" in s.upper() for s in seen.statements)
    assert lookups <= 3, lookups  # 1,200 files, 500 to a lookup: not one round trip each
    assert seen.commits < 10, seen.commits
    exactly_once(db_engine, watcher.root)


def test_forgotten_file_is_read_again_from_its_checkpoint(watcher, db_engine, exactly_once) -> None:  # type: ignore[no-untyped-def]
    """A live service forgets the files of ended sessions; a line appended to one is read
    from the stored checkpoint and registers the session again (its next epoch)."""
    paths = small_sessions(watcher.root, 50)
    proc = watcher.start()

    def all_ended() -> bool:
        return (
            scalar(db_engine, "SELECT count(*) FROM events WHERE event_type = 'session_ended'")
            == 50
        )

    wait_for(all_ended, "every session ended", details=proc.log)
    wait_for(
        lambda: watcher.status_file().get("files_watched") == 0, "files forgotten", details=proc.log
    )
    session = paths[7].stem
    append(paths[7], user(session, "back again"))
    keys = "SELECT count(*) FROM events WHERE idempotency_key = :k"
    wait_for(
        lambda: scalar(db_engine, keys, k=f"session_registered:{session}:2") == 1,
        "the session registered again",
        details=proc.log,
    )
    assert proc.stop() == 0
    exactly_once(db_engine, watcher.root)


def _lifecycle(db_engine: Engine) -> dict[str, list[tuple[str, int]]]:
    """Per session: its lifecycle events (type, id) in id order."""
    found = rows(
        db_engine,
        "SELECT payload->>'session_uuid', event_type, id FROM events "
        "WHERE event_type IN ('session_registered', 'session_ended') ORDER BY id",
    )
    out: dict[str, list[tuple[str, int]]] = {}
    for session, kind, ident in found:
        out.setdefault(session, []).append((kind, ident))
    return out


def test_sessions_end_during_the_backlog_not_after_it(watcher, db_engine, exactly_once) -> None:  # type: ignore[no-untyped-def]
    """A catch-up over many ended sessions ends them a round at a time as it goes (so it
    never holds them all active): some session_ended precedes later sessions' turns."""
    small_sessions(watcher.root, 400)
    watcher.run_once()
    first_end = scalar(db_engine, "SELECT min(id) FROM events WHERE event_type = 'session_ended'")
    last_turn = scalar(db_engine, "SELECT max(id) FROM events WHERE event_type = 'turn_detected'")
    assert first_end < last_turn
    lifecycle = _lifecycle(db_engine)
    assert len(lifecycle) == 400
    assert {tuple(k for k, _ in v) for v in lifecycle.values()} == {
        ("session_registered", "session_ended")
    }
    exactly_once(db_engine, watcher.root)


def test_a_session_with_unread_lines_is_not_ended_during_the_backlog(
    watcher, db_engine, exactly_once
) -> None:  # type: ignore[no-untyped-def]
    """Ended early, a session whose sub-agent (2.1.x folder or 2.0.x file beside it) or own
    transcript still had unread lines would be registered again when they are read: each
    session is registered once and ended once, after the last of its lines."""
    sessions: list[str] = []
    for i in range(450):
        session = new_uuid()
        sessions.append(session)
        proj = project_dir(watcher.root, f"-home-dev-src-q{i % 2}")
        append(proj / f"{session}.jsonl", user(session, f"main {i}", at=OLD))
        lines = [user(session, f"agent {i}.{j}", at=OLD + timedelta(seconds=j)) for j in range(3)]
        agent = (
            proj / session / "subagents" / f"agent-a{i}.jsonl"
            if i % 3
            else proj / f"agent-b{i}.jsonl"  # 2.0.x: names no session, its lines do
        )
        append(agent, *lines)
    watcher.run_once()
    lifecycle = _lifecycle(db_engine)
    assert sorted(lifecycle) == sorted(sessions)
    again = {
        s: v
        for s, v in lifecycle.items()
        if [k for k, _ in v] != ["session_registered", "session_ended"]
    }
    assert not again, f"{len(again)} sessions registered again, e.g. {next(iter(again.items()))}"
    last_line = dict(
        rows(
            db_engine,
            "SELECT payload->>'session_uuid', max(id) FROM events "
            "WHERE event_type = 'turn_detected' GROUP BY 1",
        )
    )
    early = [s for s, v in lifecycle.items() if v[1][1] < last_line[s]]
    assert not early, f"{len(early)} sessions ended before their last line"
    exactly_once(db_engine, watcher.root)


def test_status_shows_the_end_of_a_catch_up_before_the_next_heartbeat(watcher, db_engine) -> None:  # type: ignore[no-untyped-def]
    """status.json is rewritten once more after the last change (at most once a second),
    not left as it was mid-catch-up until the next heartbeat (here a minute away)."""
    watcher.configure(health={"heartbeat_interval_seconds": 60})
    small_sessions(watcher.root, 600)
    proc = watcher.start()
    wait_for(
        lambda: (
            scalar(db_engine, "SELECT count(*) FROM events WHERE event_type = 'session_ended'")
            == 600
        ),
        "every session ended",
        details=proc.log,
    )
    wait_for(
        lambda: (
            (
                watcher.status_file().get("files_watched"),
                watcher.status_file().get("sessions_watched"),
            )
            == (0, 0)
        ),
        "status showing every file forgotten and no session active",
        timeout=10,
        details=lambda: f"{watcher.status_file()}\n{proc.log()}",
    )
    assert proc.stop() == 0


# --------------------------------------------------------------------------- store, bulk


def _info(session: str, state: str, epoch: int) -> SessionInfo:
    return SessionInfo(session, state, epoch, OLD, OLD, "/home/dev/src/p")


def test_bulk_session_changes_keep_their_guards(database_url: str) -> None:
    engine = make_engine(database_url)
    fresh, taken, active, ended = (new_uuid() for _ in range(4))
    with engine.begin() as conn:
        seed = [
            SessionChange("register", _info(taken, "active", 1), 0),
            SessionChange("register", _info(active, "active", 1), 0),
            SessionChange("register", _info(ended, "active", 1), 0),
        ]
        assert store_sessions.apply_changes(conn, seed, References()) == set()
        end = SessionChange("end", _info(ended, "ended", 1), 1, "timeout", OLD)
        assert store_sessions.apply_changes(conn, [end], References()) == set()
    with engine.begin() as conn:
        changes = [
            SessionChange("register", _info(fresh, "active", 1), 0),
            SessionChange("register", _info(taken, "active", 1), 0),  # someone was first
            SessionChange("activity", _info(active, "active", 1), 1),
            SessionChange("end", _info(new_uuid(), "ended", 0), 0, "timeout", OLD),  # never seen
        ]
        lost = store_sessions.apply_changes(conn, changes, References())
        assert lost == {("register", taken), ("end", changes[3].info.session_uuid)}
    with pytest.raises(CheckpointConflict), engine.begin() as conn:  # activity after its end
        activity = SessionChange("activity", _info(ended, "active", 1), 1)
        store_sessions.apply_changes(conn, [activity, changes[0]], References())
    with engine.connect() as conn:
        states = dict(conn.execute(text("SELECT session_uuid, state FROM sessions")).all())
    assert states == {fresh: "active", taken: "active", active: "active", ended: "ended"}
    engine.dispose()


def test_reference_ids_are_bounded_and_found_again(database_url: str) -> None:
    from headspace_watcher.records import Event

    engine = make_engine(database_url)
    refs = References(cache_max=4)
    keys = [new_uuid() for _ in range(10)]

    def resolve(key: str) -> int | None:
        evt = Event("turn_detected", {}, OLD, project_path="/p", agent_key=key)
        new = NewRefs()
        with engine.begin() as conn:
            refs.resolve(conn, [evt], new)
        refs.committed(new)
        return evt.agent_id

    first = {k: resolve(k) for k in keys}
    assert len(refs._agent_ids) == 4  # the least recently used dropped
    assert {k: resolve(k) for k in keys} == first  # dropped ones: the same row found again
    engine.dispose()


# --------------------------------------------------------------------------- compact state


def test_ended_epochs_compact_map() -> None:
    ended = EndedEpochs([("a", 3), ("b", 1)])
    assert (ended.get("a"), ended.get("b"), ended.get("zz")) == (3, 1, 0)
    for i in range(2000):  # several merges into the arrays
        ended.set(f"s{i}", i % 7 + 1)
    ended.set("a", 0)  # active again
    ended.set("s5", 9)
    assert ended.get("a") == 0
    assert ended.get("s5") == 9
    assert all(ended.get(f"s{i}") == (9 if i == 5 else i % 7 + 1) for i in range(2000))


def test_id_cache_drops_least_recently_used() -> None:
    cache = IdCache(limit=2)
    cache.update({"a": 1, "b": 2})
    assert cache.get("a") == 1  # a is now the most recent
    cache.update({"c": 3})
    assert (cache.get("a"), cache.get("b"), cache.get("c")) == (1, None, 3)


# --------------------------------------------------------------------------- pings


def _backend_query(engine: Engine, pid: int) -> str | None:
    with engine.connect() as conn:
        return conn.execute(
            text("SELECT query FROM pg_stat_activity WHERE pid = :p"), {"p": pid}
        ).scalar()


def test_a_connection_idle_long_enough_is_pinged_and_replaced(database_url: str) -> None:
    engine = make_engine(database_url, ping_idle_s=0.05)
    other = make_engine(database_url)
    with engine.connect() as conn:
        pid = conn.execute(text("SELECT pg_backend_pid()")).scalar()
    back_at = time.monotonic()
    with other.connect() as conn:
        conn.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid})
    wait_for(lambda: _backend_query(other, pid) is None, "the backend to be gone")
    wait_for(lambda: time.monotonic() - back_at >= 0.05, "the connection to be idle")
    with engine.connect() as conn:  # the dead one was found by the ping and replaced
        assert conn.execute(text("SELECT pg_backend_pid()")).scalar() != pid
    engine.dispose()
    other.dispose()


def test_a_connection_used_a_moment_ago_is_not_pinged(database_url: str) -> None:
    engine = make_engine(database_url, ping_idle_s=3600)
    other = make_engine(database_url)
    with engine.connect() as conn:
        pid = conn.execute(text("SELECT pg_backend_pid()")).scalar()
    before = _backend_query(other, pid)  # what the pool's reset on return sent last
    with engine.connect() as conn:  # checked out again: no round trip before use
        assert _backend_query(other, pid) == before
        assert conn.execute(text("SELECT pg_backend_pid()")).scalar() == pid
    engine.dispose()
    other.dispose()
