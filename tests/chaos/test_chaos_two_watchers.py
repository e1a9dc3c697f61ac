"""Two watchers against the same database and host by mistake.

What holds, and which mechanism: the second watcher **refuses to start** (exit code 4, a
"refusing to start" log line) because the first holds a PostgreSQL advisory lock for this
host + real projects path — whatever its state dir. If the first one's lock connection dies
while it keeps running, it takes the lock again (checked before every batch); should a second
one have got it in that window, the first writes nothing and waits, degraded. Behind both,
the **checkpoint guard** (each batch locks its source rows and checks ``committed_offset`` ==
where the batch starts, else ``CheckpointConflict`` and nothing is stored) keeps any two
writers from storing a line twice.
"""

from __future__ import annotations

import random
import threading
import time
from datetime import UTC, datetime

import pytest
from appender import append_lines
from gen import TreeGen, write_tree
from harness import ChaosEnv, make_rng, pick, wait_for
from invariants import assert_exact, snapshot
from sqlalchemy import text

from headspace_watcher.errors import CheckpointConflict
from headspace_watcher.records import Batch, Event, SourceAdvance, SourcePosition
from headspace_watcher.store.checkpoints import CheckpointStore
from headspace_watcher.store.references import References
from headspace_watcher.store.writer import BatchWriter

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(pick(240, 1800))]

LOCK_NAMESPACE = 0x4853  # service._LOCK_NAMESPACE


def _connected(w: object) -> bool:
    return "database reachable" in w.log()  # type: ignore[attr-defined]


def test_second_watcher_refuses_to_start(chaos_env: ChaosEnv, exactly_once: object) -> None:
    env = chaos_env
    rng, seed = make_rng("second watcher refuses")
    gen = TreeGen(rng, env.root, max_line_bytes=env.max_line)
    write_tree(gen, gen.tree(8), (100, 300))
    a = env.start()
    wait_for(lambda: not a.alive() or _connected(a), "the first watcher to connect", details=a.log)

    # The same set-up started again (same state dir), and with a state dir of its own.
    for state_dir in (None, env.tmp / "state-b"):
        b = env.start(state_dir=state_dir, log_path=env.tmp / "watcher-b.log")
        wait_for(lambda b=b: not b.alive(), "the second watcher to exit", timeout=20, details=b.log)
        assert b.popen.returncode == 4, f"seed {seed}: exit {b.popen.returncode}\n{b.log()}"
        assert "refusing to start: another headspace-watcher already watches" in b.log(), b.log()
        assert a.alive(), a.log()

    # The first one is untouched: still the one `status` reports, still ingesting.
    code, report = env.status()
    assert report["pid"] == a.pid, f"status reports {report} while watcher {a.pid} runs"
    app = TreeGen(random.Random(seed + 1), env.root, max_line_bytes=env.max_line)
    t = threading.Thread(
        target=append_lines,
        args=(app, [f for _ in range(4) for f in app.new_session_files()]),
        kwargs={"lines": pick(300, 3000)},
        daemon=True,
    )
    t.start()
    t.join(timeout=pick(120, 600))
    env.wait_caught_up(a, timeout=pick(60, 300))
    code, report = env.status()
    assert (code, report["state"], report["pid"]) == (0, "healthy", a.pid), report
    assert a.term()[0] == 0, a.log()
    assert_exact(env.engine, snapshot(env.root), max_line_bytes=env.max_line)
    exactly_once(env.engine, env.root, max_line_bytes=env.max_line)  # type: ignore[operator]


def _terminate_lock_holder(env: ChaosEnv) -> int:
    with env.engine.begin() as conn:
        pids = (
            conn.execute(
                text(
                    "SELECT l.pid FROM pg_locks l JOIN pg_database d ON d.oid = l.database "
                    "WHERE l.locktype = 'advisory' AND l.classid = :ns "
                    "AND d.datname = current_database()"
                ),
                {"ns": LOCK_NAMESPACE},
            )
            .scalars()
            .all()
        )
        for pid in pids:
            conn.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid})
    return len(pids)


def test_lock_lost_is_taken_again_or_waited_for(chaos_env: ChaosEnv, exactly_once: object) -> None:
    env = chaos_env
    rng, seed = make_rng("lock lost: taken again")
    gen = TreeGen(rng, env.root, max_line_bytes=env.max_line)
    files = gen.tree(pick(12, 40))
    write_tree(gen, files, (100, 400))
    a = env.start()
    wait_for(lambda: not a.alive() or _connected(a), "watcher A to connect", details=a.log)
    assert _terminate_lock_holder(env) == 1
    b = env.start(state_dir=env.tmp / "state-b", log_path=env.tmp / "watcher-b.log")
    wait_for(lambda: not b.alive() or _connected(b), "watcher B to decide", details=b.log)
    assert a.alive(), a.log()  # never self-inflicted: A re-took the lock, or waits for it
    b_ran = b.alive()
    if not b_ran:
        assert b.popen.returncode == 4, b.log()

    app = TreeGen(random.Random(seed + 1), env.root, max_line_bytes=env.max_line)
    append_lines(app, [f for f in files if rng.random() < 0.5] or files[:1], lines=pick(400, 3000))
    for _ in range(pick(3, 15)):
        write_tree(gen, rng.sample(files, k=5), (50, 200))
        time.sleep(rng.uniform(0, 0.3))  # schedule of bursts
    env.wait_caught_up(b if b_ran else a, timeout=pick(60, 300))
    assert a.alive(), a.log()
    assert a.term()[0] == 0
    if b_ran:
        assert b.term()[0] == 0
    rep = assert_exact(env.engine, snapshot(env.root), max_line_bytes=env.max_line)
    exactly_once(env.engine, env.root, max_line_bytes=env.max_line)  # type: ignore[operator]
    print(
        f"[chaos] seed {seed}: lock lost; B {'ran' if b_ran else 'refused'}"
        f"; {rep.lines} lines, {rep.turns} turns, 0 duplicates"
    )


def test_stale_source_advance_is_refused_by_the_guard(chaos_env: ChaosEnv) -> None:
    """A second writer holding a stale checkpoint (what a watcher without the lock would
    have) stores nothing: CheckpointConflict, rows and checkpoint unchanged."""
    env = chaos_env
    path = env.root / "p" / "s.jsonl"
    store = CheckpointStore(env.engine)
    src = store.register(str(path), inode=1, device=1)
    writer = BatchWriter(env.engine, References())

    def batch(start: int, end: int, generation: int = 0) -> Batch:
        at = datetime(2025, 1, 1, tzinfo=UTC)
        payload = {
            "session_uuid": "s",
            "actor": "user",
            "text": f"line at {start}",
            "source": "polling",
            "turn_timestamp": at.isoformat(),
        }
        pos = SourcePosition(src.source_id, generation, start, 0)
        return Batch(
            events=[Event("turn_detected", payload, at, position=pos)],
            advances=[SourceAdvance(src.source_id, generation, start, end, 1, b"f" * 32)],
        )

    writer.write_batch(batch(0, 100))  # the first writer
    with pytest.raises(CheckpointConflict):
        writer.write_batch(batch(0, 100))  # the same range again, from a stale checkpoint
    with pytest.raises(CheckpointConflict):
        writer.write_batch(batch(50, 150))  # a range that does not start at the checkpoint
    with pytest.raises(CheckpointConflict):
        writer.write_batch(batch(100, 200, generation=1))  # a generation that is not current
    with env.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM events")).scalar() == 1
        assert conn.execute(
            text("SELECT generation, committed_offset FROM sources WHERE id = :i"),
            {"i": src.source_id},
        ).one() == (0, 100)
    writer.write_batch(batch(100, 200))  # the writer that is up to date goes on
