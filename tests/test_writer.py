"""The batch writer on a real PostgreSQL: atomicity, idempotence, poison rows, retries, outages.

Everything here runs on a real server because the guarantees live in the database (one
transaction, unique position index, row locks); a mock would test our assumptions instead.
Outages are real too: the server of ``own_pg_cluster`` is stopped, not simulated.
"""

from __future__ import annotations

import os
import random
import secrets
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, event, text
from watcher_helpers import wait_for

from headspace_watcher.errors import BatchRefused, CheckpointConflict, WriteAborted, WriteFailed
from headspace_watcher.records import (
    Batch,
    Event,
    Rejection,
    SessionChange,
    SessionInfo,
    SourceAdvance,
    SourcePosition,
    StreamState,
)
from headspace_watcher.store import checkpoints
from headspace_watcher.store.checkpoints import CheckpointStore
from headspace_watcher.store.embedded import PgCluster
from headspace_watcher.store.engine import make_engine
from headspace_watcher.store.references import References
from headspace_watcher.store.retry import RetryPolicy
from headspace_watcher.store.writer import BatchWriter

LINE = 100  # bytes per fake transcript line: positions are offsets i * LINE
SESSION = "5b0f8c1e-2a7d-4f3b-9c6e-0d1a2b3c4d5e"
PROJECT = "/home/dev/src/headspace"
EVENT_TIME = datetime(2024, 3, 1, 12, 30, 15, 250000, tzinfo=UTC)


# --------------------------------------------------------------------------- helpers


def turn(
    i: int,
    source: StreamState | None = None,
    *,
    base_offset: int = 0,
    text_value: str | None = None,
    event_type: str = "turn_detected",
    payload: dict[str, Any] | None = None,
) -> Event:
    """A realistic turn_detected event for line ``i`` of ``source`` (or unsourced)."""
    offset = base_offset + i * LINE
    when = EVENT_TIME + timedelta(seconds=i)
    return Event(
        event_type=event_type,
        payload=payload
        if payload is not None
        else {
            "session_uuid": SESSION,
            "actor": "user" if i % 2 == 0 else "agent",
            "text": text_value if text_value is not None else f"turn number {i}: ça marche ✓",
            "source": "polling",
            "turn_timestamp": when.isoformat().replace("+00:00", "Z"),
            "message_uuid": str(uuid.UUID(int=i + 1)),
            "model": "claude-opus-4-1-20250805",
            "usage": {"input_tokens": 10 + i, "output_tokens": 3},
        },
        timestamp=when,
        project_path=PROJECT,
        agent_key=SESSION,
        position=None
        if source is None
        else SourcePosition(source.source_id, source.generation, offset, 0),
    )


def batch_for(
    source: StreamState, start: int, events: list[Event], rejections: Sequence[Rejection] = ()
) -> Batch:
    """A batch covering lines [start, start + len(events)) of ``source``."""
    return Batch(
        events=events,
        rejections=list(rejections),
        advances=[
            SourceAdvance(
                source_id=source.source_id,
                generation=source.generation,
                start_offset=start * LINE,
                end_offset=(start + len(events) + len(rejections)) * LINE,
                lines=len(events) + len(rejections),
                fingerprint=b"fp",
            )
        ],
    )


def scalar(engine: Engine, sql: str, **params: Any) -> Any:
    with engine.connect() as conn:
        return conn.execute(text(sql), params).scalar()


def rows(engine: Engine, sql: str, **params: Any) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(text(sql), params))


def register(engine: Engine, name: str = "session.jsonl") -> StreamState:
    return CheckpointStore(engine).register(f"/home/dev/.claude/projects/p/{name}", 1234, 42)


class SleepRecorder:
    """Injected sleep: records the writer's backoff delays without waiting."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    eng = make_engine(database_url)
    yield eng
    eng.dispose()


@pytest.fixture
def writer(engine: Engine) -> BatchWriter:
    return BatchWriter(engine, References(), retry=RetryPolicy(attempts=2, base_delay=0.01))


# --------------------------------------------------------------------------- write_batch()


def test_batch_stores_events_and_advances_checkpoint_in_one_transaction(
    engine: Engine, writer: BatchWriter, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = register(engine)
    events = [turn(i, source) for i in range(10)]
    seen_at_advance: dict[str, Any] = {}
    real_advance = checkpoints.advance

    def spying_advance(conn: Connection, advances: list[SourceAdvance]) -> None:
        """At the checkpoint step: events are in this transaction, invisible outside it."""
        seen_at_advance["inside"] = conn.execute(text("SELECT count(*) FROM events")).scalar()
        seen_at_advance["outside"] = scalar(engine, "SELECT count(*) FROM events")
        real_advance(conn, advances)
        seen_at_advance["offset_outside"] = scalar(
            engine, "SELECT committed_offset FROM sources WHERE id = :i", i=source.source_id
        )

    monkeypatch.setattr(checkpoints, "advance", spying_advance)
    result = writer.write_batch(batch_for(source, 0, events))

    assert seen_at_advance == {"inside": 10, "outside": 0, "offset_outside": 0}
    assert (result.written, result.rejected, result.duplicates) == (10, 0, 0)
    stored = rows(
        engine,
        "SELECT source_id, source_generation, source_offset, source_seq, timestamp, "
        "project_id, agent_id FROM events ORDER BY source_offset",
    )
    assert [r.source_offset for r in stored] == [i * LINE for i in range(10)]
    assert {(r.source_id, r.source_generation, r.source_seq) for r in stored} == {
        (source.source_id, source.generation, 0)
    }
    assert [r.timestamp for r in stored] == [EVENT_TIME + timedelta(seconds=i) for i in range(10)]
    assert all(r.project_id is not None and r.agent_id is not None for r in stored)

    state = CheckpointStore(engine).load(source.path)
    assert state is not None
    assert (state.committed_offset, state.lines_committed, state.fingerprint) == (
        10 * LINE,
        10,
        b"fp",
    )
    assert writer.metrics.events_written == 10


def test_batch_failing_after_insert_stores_nothing(
    engine: Engine, writer: BatchWriter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A (non-transient) failure at the checkpoint step rolls the events back with it."""
    source = register(engine)

    def broken_advance(*_: Any) -> None:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(checkpoints, "advance", broken_advance)
    with pytest.raises(BatchRefused, match="disk on fire"):  # careful mode failed too
        writer.write_batch(batch_for(source, 0, [turn(i, source) for i in range(5)]))

    assert scalar(engine, "SELECT count(*) FROM events") == 0
    assert CheckpointStore(engine).load(source.path).committed_offset == 0  # type: ignore[union-attr]


def test_rewriting_same_batch_conflicts_and_stores_nothing(
    engine: Engine, writer: BatchWriter
) -> None:
    source = register(engine)
    rejection = Rejection(
        reason="not_json",
        raw=b"{oops",
        source_path=source.path,
        offset=5 * LINE,
        position=SourcePosition(source.source_id, source.generation, 5 * LINE, 0),
    )
    events = [turn(i, source) for i in range(5)]
    writer.write_batch(batch_for(source, 0, events, [rejection]))
    assert scalar(engine, "SELECT count(*) FROM events") == 5
    assert scalar(engine, "SELECT count(*) FROM rejected_events") == 1

    with pytest.raises(CheckpointConflict) as info:
        writer.write_batch(batch_for(source, 0, [turn(i, source) for i in range(5)], [rejection]))

    assert f"source {source.source_id}" in str(info.value)
    assert scalar(engine, "SELECT count(*) FROM events") == 5
    assert scalar(engine, "SELECT count(*) FROM rejected_events") == 1
    assert CheckpointStore(engine).load(source.path).committed_offset == 6 * LINE  # type: ignore[union-attr]
    assert writer.metrics.events_written == 5


def test_stale_start_offset_conflicts_even_for_new_positions(
    engine: Engine, writer: BatchWriter
) -> None:
    """The guard, not only the unique index: a batch not starting at the checkpoint is refused."""
    source = register(engine)
    writer.write_batch(batch_for(source, 0, [turn(i, source) for i in range(3)]))
    with pytest.raises(CheckpointConflict):
        writer.write_batch(batch_for(source, 5, [turn(i, source) for i in range(5, 8)]))
    assert scalar(engine, "SELECT count(*) FROM events") == 3


def test_checkpoints_of_many_streams_move_in_one_statement(
    engine: Engine, writer: BatchWriter
) -> None:
    """A catch-up batch of many small files advances as many streams: one UPDATE for all of
    them, each stream to its own end, lines and fingerprint. A stream advanced twice in the
    batch (an empty advance, then one with lines) ends as the two in order leave it."""
    many = [register(engine, f"s{i}.jsonl") for i in range(40)]
    twice = register(engine, "twice.jsonl")
    batch = Batch()
    for i, source in enumerate(many):
        batch.advances.append(
            SourceAdvance(source.source_id, 0, 0, (i + 1) * LINE, i + 1, bytes([i]) * 32)
        )
    batch.advances.append(SourceAdvance(twice.source_id, 0, 0, 0, 0, None))
    batch.advances.append(SourceAdvance(twice.source_id, 0, 0, 3 * LINE, 3, b"t" * 32))
    updates: list[bool] = []

    def seen(_c: Any, _cur: Any, statement: str, _p: Any, _ctx: Any, many_rows: bool) -> None:
        if "UPDATE SOURCES" in statement.upper():
            updates.append(many_rows)

    event.listen(engine, "before_cursor_execute", seen)
    try:
        writer.write_batch(batch)
    finally:
        event.remove(engine, "before_cursor_execute", seen)

    assert updates == [False]  # one statement, not one per stream
    stored = {
        r.id: (r.committed_offset, r.lines_committed, bytes(r.fingerprint))
        for r in rows(
            engine, "SELECT id, committed_offset, lines_committed, fingerprint FROM sources"
        )
    }
    expected = {s.source_id: ((i + 1) * LINE, i + 1, bytes([i]) * 32) for i, s in enumerate(many)}
    expected[twice.source_id] = (3 * LINE, 3, b"t" * 32)
    assert stored == expected


def test_nul_byte_event_is_rejected_rest_stored(engine: Engine, writer: BatchWriter) -> None:
    source = register(engine)
    events = [turn(i, source) for i in range(5)]
    events[2] = turn(2, source, text_value="before\x00after")

    result = writer.write_batch(batch_for(source, 0, events))

    assert (result.written, result.rejected) == (4, 1)
    offsets = [r.source_offset for r in rows(engine, "SELECT source_offset FROM events")]
    assert sorted(offsets) == [0, 1 * LINE, 3 * LINE, 4 * LINE]
    rejected = rows(
        engine,
        "SELECT reason, raw_text, byte_offset, source_id, source_generation, source_seq, "
        "event_type FROM rejected_events",
    )
    assert len(rejected) == 1
    r = rejected[0]
    assert r.reason.startswith("database_refused")
    assert (r.byte_offset, r.source_id, r.source_generation, r.source_seq) == (
        2 * LINE,
        source.source_id,
        source.generation,
        0,
    )
    assert r.event_type == "turn_detected"
    assert "before" in r.raw_text and "after" in r.raw_text
    assert "\x00" not in r.raw_text
    assert CheckpointStore(engine).load(source.path).committed_offset == 5 * LINE  # type: ignore[union-attr]
    assert writer.metrics.rejected == 1


def test_invalid_payload_in_batch_is_rejected_rest_stored(
    engine: Engine, writer: BatchWriter
) -> None:
    source = register(engine)
    events = [turn(i, source) for i in range(4)]
    del events[1].payload["session_uuid"]
    events[3] = turn(3, source, event_type="no_such_type")

    result = writer.write_batch(batch_for(source, 0, events))

    assert (result.written, result.rejected) == (2, 2)
    offsets = sorted(r.source_offset for r in rows(engine, "SELECT source_offset FROM events"))
    assert offsets == [0, 2 * LINE]
    rejected = rows(
        engine, "SELECT byte_offset, reason, details FROM rejected_events ORDER BY byte_offset"
    )
    assert [r.byte_offset for r in rejected] == [1 * LINE, 3 * LINE]
    assert rejected[0].reason.startswith("invalid_payload")
    assert "'session_uuid'" in rejected[0].reason
    assert rejected[0].details == {"field": "session_uuid"}
    assert "unknown event type 'no_such_type'" in rejected[1].reason
    assert CheckpointStore(engine).load(source.path).committed_offset == 4 * LINE  # type: ignore[union-attr]


# --------------------------------------------------------------------------- retries


def stopped_writer(
    cluster: PgCluster, sleep: Callable[[float], None], policy: RetryPolicy
) -> tuple[BatchWriter, StreamState]:
    """A writer whose server is down; the source was registered while it was up."""
    source = register(make_engine(cluster.url()))
    cluster.stop("fast")
    assert not cluster.is_running()
    return BatchWriter(make_engine(cluster.url(), connect_timeout=2), References(), retry=policy,
                       sleep=sleep), source  # fmt: skip


def test_retry_backoff_then_write_failed_checkpoint_untouched(own_pg_cluster: PgCluster) -> None:
    base = 0.05
    sleeps = SleepRecorder()
    writer, source = stopped_writer(
        own_pg_cluster, sleeps, RetryPolicy(attempts=5, base_delay=base, rng=random.Random(7))
    )

    with pytest.raises(WriteFailed):
        writer.write_batch(batch_for(source, 0, [turn(i, source) for i in range(3)]))

    assert len(sleeps.delays) == 5
    for i, delay in enumerate(sleeps.delays):
        assert base * 2**i <= delay <= base * 2**i + base, (i, delay)
    assert sleeps.delays == sorted(sleeps.delays)  # grows exponentially
    assert writer.metrics.failed_writes == 1
    assert writer.metrics.events_written == 0
    assert writer.metrics.last_error is not None

    # The seeded generator makes the schedule reproducible.
    again = SleepRecorder()
    replay = BatchWriter(
        writer.engine,
        References(),
        retry=RetryPolicy(attempts=5, base_delay=base, rng=random.Random(7)),
        sleep=again,
    )
    with pytest.raises(WriteFailed):
        replay.write_batch(batch_for(source, 0, [turn(i, source) for i in range(3)]))
    assert again.delays == sleeps.delays

    own_pg_cluster.start()
    check = make_engine(own_pg_cluster.url())
    try:
        assert scalar(check, "SELECT count(*) FROM events") == 0
        assert CheckpointStore(check).load(source.path).committed_offset == 0  # type: ignore[union-attr]
    finally:
        check.dispose()


def test_should_abort_stops_retrying(own_pg_cluster: PgCluster) -> None:
    sleeps = SleepRecorder()
    writer, source = stopped_writer(
        own_pg_cluster, sleeps, RetryPolicy(attempts=50, base_delay=0.01)
    )
    with pytest.raises(WriteAborted):
        writer.write_batch(
            batch_for(source, 0, [turn(i, source) for i in range(3)]), should_abort=lambda: True
        )
    assert sleeps.delays == []  # no backoff once the caller asked to stop
    assert writer.metrics.failed_writes == 1


def test_should_abort_consulted_between_retries(own_pg_cluster: PgCluster) -> None:
    sleeps = SleepRecorder()
    writer, source = stopped_writer(
        own_pg_cluster, sleeps, RetryPolicy(attempts=50, base_delay=0.01)
    )
    with pytest.raises(WriteAborted):
        writer.write_batch(
            batch_for(source, 0, [turn(0, source)]), should_abort=lambda: len(sleeps.delays) >= 3
        )
    assert len(sleeps.delays) == 3


def test_non_transient_error_is_not_retried(engine: Engine) -> None:
    """A batch naming a source that does not exist is a bug, not an outage: no retry."""
    sleeps = SleepRecorder()
    writer = BatchWriter(
        engine, References(), retry=RetryPolicy(attempts=5, base_delay=0.01), sleep=sleeps
    )
    ghost = StreamState(999, "/nowhere", 1, 1, 0, 0, None)
    with pytest.raises(CheckpointConflict):
        writer.write_batch(batch_for(ghost, 0, [turn(0, ghost)]))
    assert sleeps.delays == []


# --------------------------------------------------------------------------- outage


def test_server_crash_mid_stream_every_batch_stored_exactly_once(
    own_pg_cluster: PgCluster,
) -> None:
    """PostgreSQL dies (immediate stop: no checkpoint, crash recovery) while a thread writes
    batch after batch; it is restarted once failures show, three times over. Afterwards every
    line is stored once, and the checkpoint is the end of the last batch."""
    per_batch = 200
    engine = make_engine(own_pg_cluster.url(), connect_timeout=2)
    source = register(engine)
    writer = BatchWriter(
        engine,
        References(),
        retry=RetryPolicy(attempts=2000, base_delay=0.005, max_delay=0.05),
    )
    finish = threading.Event()
    errors: list[BaseException] = []
    progress = {"batches": 0, "next_line": 0, "conflicts": 0}

    def produce() -> None:
        """The tailer's loop in miniature: on a conflict, resume from the stored offset."""
        store = CheckpointStore(engine)
        try:
            while not finish.is_set():
                start = progress["next_line"]
                events = [turn(start + j, source) for j in range(per_batch)]
                try:
                    writer.write_batch(batch_for(source, start, events))
                except CheckpointConflict:
                    # The commit of our previous attempt reached the server but its answer
                    # did not reach us: the stored checkpoint says where to go on.
                    progress["conflicts"] += 1
                    state = store.load(source.path)
                    assert state is not None
                    progress["next_line"] = state.committed_offset // LINE
                    continue
                progress["next_line"] = start + per_batch
                progress["batches"] += 1
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=produce, name="writer-under-test", daemon=True)
    failures_seen: list[str | None] = []

    def batches_at_least(n: int) -> Callable[[], bool]:
        return lambda: progress["batches"] >= n or bool(errors)

    thread.start()
    try:
        for _crash in range(3):
            wait_for(
                batches_at_least(progress["batches"] + 5), "batches to be written", timeout=120
            )
            own_pg_cluster.stop("immediate")
            wait_for(
                lambda: writer.metrics.last_error is not None or bool(errors),
                "write failures",
                timeout=60,
            )
            failures_seen.append(writer.metrics.last_error)
            own_pg_cluster.start()
        wait_for(batches_at_least(progress["batches"] + 5), "writes to resume", timeout=120)
    finally:
        finish.set()
        thread.join(timeout=120)
    assert not thread.is_alive()
    assert errors == []
    assert len(failures_seen) == 3 and None not in failures_seen
    assert writer.metrics.failed_writes == 0
    # Only an ambiguous commit (stored, answer lost) causes a conflict: at most one per crash.
    assert progress["conflicts"] <= 3

    lines = progress["next_line"]
    dup = rows(
        engine,
        "SELECT source_offset, count(*) AS n FROM events "
        "GROUP BY source_id, source_generation, source_offset, source_seq HAVING count(*) > 1",
    )
    assert dup == []
    offsets = [r.source_offset for r in rows(engine, "SELECT source_offset FROM events")]
    assert sorted(offsets) == [i * LINE for i in range(lines)]  # none missing, none twice
    state = CheckpointStore(engine).load(source.path)
    assert state is not None
    assert state.committed_offset == lines * LINE
    assert state.lines_committed == lines
    assert scalar(engine, "SELECT count(*) FROM rejected_events") == 0
    engine.dispose()


def test_batch_payloads_are_stored_exactly_including_wide_integers(
    engine: Engine, writer: BatchWriter
) -> None:
    """The fast serialiser of turn payloads must store what the standard one would."""
    source = register(engine)
    events = [turn(i, source, text_value=f'"quoted" \\ é 😀 \u2028 \x1f {i}') for i in range(3)]
    events[1].payload["usage"] = {"input_tokens": 2**70, "output_tokens": 2**63}
    expected = [dict(e.payload) for e in events]

    writer.write_batch(batch_for(source, 0, events))

    stored = [r.payload for r in rows(engine, "SELECT payload FROM events ORDER BY source_offset")]
    assert stored == expected
    assert stored[1]["usage"]["input_tokens"] == 2**70


def test_connection_lost_after_new_references_retries_with_fresh_ids(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Projects/agents upserted in a batch's transaction vanish with its rollback: the retry
    must create them again, not reuse the ids of the rolled-back rows."""
    source = register(engine)
    sleeps = SleepRecorder()
    writer = BatchWriter(
        engine, References(), retry=RetryPolicy(attempts=3, base_delay=0.01), sleep=sleeps
    )
    real_guard = checkpoints.check_guard
    killed: list[int] = []

    def guard_after_losing_the_connection(conn: Connection, advances: Any) -> None:
        if not killed:  # a real fault: the server ends this session mid-transaction
            pid = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
            killed.append(pid)
            scalar(engine, "SELECT pg_terminate_backend(:p)", p=pid)
        real_guard(conn, advances)

    monkeypatch.setattr(checkpoints, "check_guard", guard_after_losing_the_connection)
    result = writer.write_batch(batch_for(source, 0, [turn(i, source) for i in range(3)]))

    assert result.written == 3 and len(sleeps.delays) == 1
    stored = rows(
        engine,
        "SELECT p.path, a.session_uuid FROM events e JOIN projects p ON p.id = e.project_id"
        " JOIN agents a ON a.id = e.agent_id",
    )
    assert stored == [(PROJECT, SESSION)] * 3
    assert writer.references.project_id(PROJECT) == scalar(engine, "SELECT id FROM projects")


# --------------------------------------------------------------------------- refusals narrowed


def test_unindexable_project_and_agent_keys_store_the_lines_without_them(
    engine: Engine, writer: BatchWriter
) -> None:
    """A 20 KB cwd or session id is beyond the btree limit of projects.path / agents: the
    batch is redone row by row, those events are stored without the reference."""
    source = register(engine)
    huge = "/" + secrets.token_hex(10_000)
    events = [turn(i, source) for i in range(4)]
    events[1].project_path = huge
    events[2].agent_key = huge

    result = writer.write_batch(batch_for(source, 0, events))

    assert (result.written, result.rejected) == (4, 0)
    refs = rows(engine, "SELECT source_offset, project_id, agent_id FROM events ORDER BY 1")
    assert [(r.project_id is None, r.agent_id is None) for r in refs] == [
        (False, False),
        (True, False),
        (False, True),
        (False, False),
    ]
    assert scalar(engine, "SELECT count(*) FROM projects WHERE path = :p", p=huge) == 0
    assert CheckpointStore(engine).load(source.path).committed_offset == 4 * LINE  # type: ignore[union-attr]
    # the ids of the refused attempt were forgotten: the next batch works normally
    nxt = [turn(i, source) for i in range(4, 6)]
    assert writer.write_batch(batch_for(source, 4, nxt)).written == 2


def test_keys_json_cannot_carry_store_the_lines_without_them(
    engine: Engine, writer: BatchWriter
) -> None:
    """A session id or cwd with a lone surrogate (a file name's undecodable byte) cannot be
    sent in the bulk statements' JSON rows: the batch is redone row by row like any refused
    value, the lines are stored without the reference and the session is left out."""
    source = register(engine)
    odd = "5b0f8c1e-2a7d-4f3b-9c6e-\udcff"
    events = [turn(i, source) for i in range(3)]
    events[1].project_path = "/home/dev/src/\udcff"
    events[2].agent_key = odd
    info = SessionInfo(odd, "active", 1, EVENT_TIME, EVENT_TIME, PROJECT)
    batch = batch_for(source, 0, events)
    batch.sessions.append(SessionChange("register", info, 0))

    result = writer.write_batch(batch)

    assert (result.written, result.rejected) == (3, 0)
    refs = rows(engine, "SELECT source_offset, project_id, agent_id FROM events ORDER BY 1")
    assert [(r.project_id is None, r.agent_id is None) for r in refs] == [
        (False, False),
        (True, False),
        (False, True),
    ]
    assert ("register", odd) in result.lost
    assert scalar(engine, "SELECT count(*) FROM sessions") == 0
    assert CheckpointStore(engine).load(source.path).committed_offset == 3 * LINE  # type: ignore[union-attr]


def test_agent_inserted_concurrently_is_found_after_the_upsert(
    engine: Engine, writer: BatchWriter
) -> None:
    """Another transaction inserts the batch's new agent and commits while the batch's
    upsert waits for it: the upsert neither inserts it nor sees it in its snapshot, and the
    events still get its id (looked up again), not none."""
    source = register(engine)
    other = engine.connect()
    other_tx = other.begin()
    other.execute(text("INSERT INTO agents (session_uuid) VALUES (:s)"), {"s": SESSION})
    done: dict[str, Any] = {}

    def write() -> None:
        try:
            done["result"] = writer.write_batch(batch_for(source, 0, [turn(0, source)]))
        except BaseException as exc:  # reported by the assertion below
            done["error"] = exc

    thread = threading.Thread(target=write, name="writer-under-test", daemon=True)
    thread.start()
    try:
        wait_for(
            lambda: scalar(engine, "SELECT count(*) FROM pg_locks WHERE NOT granted"),
            "the batch's upsert waiting for the other transaction",
        )
    finally:
        other_tx.commit()
        other.close()
    thread.join(timeout=30)

    assert "error" not in done and done["result"].written == 1
    agent = scalar(engine, "SELECT id FROM agents WHERE session_uuid = :s", s=SESSION)
    assert rows(engine, "SELECT agent_id FROM events")[0].agent_id == agent


def test_rejection_with_an_unstorable_path_is_stored_escaped(
    engine: Engine, writer: BatchWriter
) -> None:
    name = os.fsdecode(b"/home/dev/.claude/projects/p/x\xff.jsonl")
    source = CheckpointStore(engine).register(name, 77, 42)
    bad = Rejection("invalid_json", b"{nope", name, 0, 5, SourcePosition(source.source_id, 0, 0, 0))

    result = writer.write_batch(batch_for(source, 0, [], [bad]))

    assert result.rejected == 1
    [(path,)] = rows(engine, "SELECT source_path FROM rejected_events")
    assert path == "/home/dev/.claude/projects/p/x\\xff.jsonl"
    assert CheckpointStore(engine).load(name).path == name  # the exact name, from path_bytes


def test_batch_refused_even_row_by_row_raises_batch_refused_storing_nothing(
    engine: Engine, writer: BatchWriter
) -> None:
    source = register(engine)
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN RAISE EXCEPTION 'refused'; END $$"
        )
        conn.exec_driver_sql(
            "CREATE TRIGGER refuse BEFORE UPDATE ON sources FOR EACH ROW EXECUTE FUNCTION refuse()"
        )

    with pytest.raises(BatchRefused, match="P0001"):
        writer.write_batch(batch_for(source, 0, [turn(i, source) for i in range(3)]))

    assert scalar(engine, "SELECT count(*) FROM events") == 0
    assert writer.metrics.failed_writes == 1
