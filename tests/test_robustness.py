"""No bad file, line or full disk stops ingest; no second instance takes over (issue 9 §2, §5).

Each trigger runs under the real service (``WatcherEnv.start()``: the console script as its
own process) with a good file beside the bad one, and asserts that the service keeps running
(pid alive, status healthy or degraded as the case demands) and that the good file's lines
are stored exactly once. Faults are real: a file name that is not UTF-8, values beyond
PostgreSQL's index limits, a database set read-only, a tablespace on a full tmpfs, the lock's
backend terminated, a trigger that refuses one file's checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import Engine
from sqlalchemy.engine import make_url
from watcher_helpers import (
    WatcherEnv,
    WatcherProcess,
    append,
    conversation,
    new_uuid,
    project_dir,
    rows,
    scalar,
    source_row,
    turn_texts,
    user,
    wait_for,
)

from headspace_watcher.store.embedded import PgCluster
from headspace_watcher.store.engine import make_engine

LOCK_NAMESPACE = 0x4853  # service._LOCK_NAMESPACE


# --------------------------------------------------------------------------- helpers


def good_file(env: WatcherEnv, n: int = 4) -> tuple[Path, str]:
    session = new_uuid()
    path = project_dir(env.root) / f"{session}.jsonl"
    append(path, *conversation(session, n))
    return path, session


def stored(engine: Engine, path: Path, n: int) -> bool:
    row = source_row(engine, path)
    return row is not None and row.lines_committed >= n


def status_of(proc: WatcherProcess) -> dict[str, Any]:
    return proc.status_file() or {}


def assert_running(proc: WatcherProcess, state: str) -> None:
    assert proc.popen.poll() is None, f"watcher exited {proc.popen.returncode}:\n{proc.log()}"
    wait_for(
        lambda: status_of(proc).get("state") == state and status_of(proc).get("pid") == proc.pid,
        f"status {state}",
        details=lambda: f"{status_of(proc)}\n{proc.log()}",
    )


def stays_degraded(proc: WatcherProcess, beats: int = 2) -> None:
    """Degraded through ``beats`` more status reports (retry rounds in between), still up."""
    seen: set[str] = set()

    def another() -> bool:
        st = status_of(proc)
        assert proc.popen.poll() is None, proc.log()
        assert st.get("state") == "degraded", st
        seen.add(st.get("updated_at", ""))
        return len(seen) > beats

    wait_for(another, f"{beats} more degraded status reports", details=proc.log)


def lock_holders(engine: Engine) -> list[int]:
    return [
        r[0]
        for r in rows(
            engine,
            "SELECT l.pid FROM pg_locks l JOIN pg_database d ON d.oid = l.database "
            "WHERE l.locktype = 'advisory' AND l.classid = :ns AND l.granted "
            "AND d.datname = current_database()",
            ns=LOCK_NAMESPACE,
        )
    ]


def admin(url: str) -> psycopg.Connection[Any]:
    """An autocommit connection to the server's ``postgres`` database (ALTER DATABASE …)."""
    u = make_url(url).set(drivername="postgresql", database="postgres")
    return psycopg.connect(u.render_as_string(hide_password=False), autocommit=True)


def terminate_pool_backends(url: str, keep: list[int]) -> None:
    """End the watcher's pooled sessions (not the lock's ``keep``): its next write reconnects."""
    dbname = make_url(url).database
    with admin(url) as conn:
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s "
            "AND application_name = 'headspace-watcher' AND NOT pid = ANY(%s)",
            (dbname, keep),
        )


# --------------------------------------------------------------------------- bad values


def test_non_utf8_file_name_is_stored_with_its_raw_name(
    watcher: WatcherEnv, db_engine: Engine, exactly_once: Any
) -> None:
    good, good_session = good_file(watcher)
    session = new_uuid()
    bad_dir = os.fsencode(project_dir(watcher.root))
    bad = os.fsdecode(os.path.join(bad_dir, b"x\xff.jsonl"))  # str with a surrogate escape
    with open(bad, "wb") as f:
        f.write(b"".join(conversation(session, 3)))
    proc = watcher.start()

    wait_for(lambda: stored(db_engine, good, 4), "the good file", details=proc.log)
    raw = os.path.join(bad_dir, b"x\xff.jsonl")
    wait_for(
        lambda: (
            scalar(db_engine, "SELECT lines_committed FROM sources WHERE path_bytes = :b", b=raw)
            == 3
        ),
        "the file with a non-UTF-8 name",
        details=proc.log,
    )
    row = rows(db_engine, "SELECT path, path_bytes FROM sources WHERE path_bytes IS NOT NULL")
    assert row == [(raw.decode("utf-8", "backslashreplace"), raw)]
    assert len(turn_texts(db_engine, session)) == 3
    append(good, user(good_session, "after the bad name"))
    wait_for(lambda: stored(db_engine, good, 5), "ingest going on", details=proc.log)
    assert_running(proc, "healthy")
    exactly_once(db_engine, watcher.root, files=[str(good)])
    assert proc.stop() == 0


def test_20kb_cwd_is_stored_without_project_and_others_flow(
    watcher: WatcherEnv, db_engine: Engine, exactly_once: Any
) -> None:
    good, _ = good_file(watcher)
    session = new_uuid()
    bad = project_dir(watcher.root, "-huge-cwd") / f"{session}.jsonl"
    huge = "/" + secrets.token_hex(10_000)  # 20 KB, incompressible: beyond the btree limit
    append(bad, user(session, "before"), user(session, "huge", cwd=huge), user(session, "after"))
    proc = watcher.start()

    wait_for(lambda: stored(db_engine, good, 4), "the good file", details=proc.log)
    wait_for(lambda: stored(db_engine, bad, 3), "the file with a 20 KB cwd", details=proc.log)
    assert turn_texts(db_engine, session) == ["before", "huge", "after"]
    assert scalar(db_engine, "SELECT count(*) FROM projects WHERE path = :p", p=huge) == 0
    [(project_id, cwd)] = rows(
        db_engine,
        "SELECT project_id, payload->>'cwd' FROM events "
        "WHERE payload->>'text' = 'huge' AND event_type = 'turn_detected'",
    )
    assert (project_id, cwd) == (None, huge)  # made storable: the value is in the payload
    assert "project refused by the database" in proc.log()
    assert_running(proc, "healthy")
    exactly_once(db_engine, watcher.root, max_line_bytes=watcher.max_line_bytes)
    assert proc.stop() == 0


def test_20kb_session_id_is_stored_without_session_and_others_flow(
    watcher: WatcherEnv, db_engine: Engine, exactly_once: Any
) -> None:
    good, good_session = good_file(watcher)
    huge = secrets.token_hex(10_000)
    bad = project_dir(watcher.root, "-huge-session") / "huge.jsonl"
    append(bad, *conversation(huge, 3))
    proc = watcher.start()

    wait_for(lambda: stored(db_engine, good, 4), "the good file", details=proc.log)
    wait_for(lambda: stored(db_engine, bad, 3), "the file with a 20 KB sessionId", details=proc.log)
    assert len(turn_texts(db_engine, huge)) == 3
    assert scalar(db_engine, "SELECT count(*) FROM sessions WHERE session_uuid = :s", s=huge) == 0
    assert "session refused by the database" in proc.log()
    append(bad, user(huge, "later"))  # a later batch of that session: same, not stuck
    append(good, user(good_session, "later"))
    wait_for(lambda: stored(db_engine, bad, 4), "the later line", details=proc.log)
    wait_for(lambda: stored(db_engine, good, 5), "the good file's later line", details=proc.log)
    assert_running(proc, "healthy")
    exactly_once(db_engine, watcher.root, max_line_bytes=watcher.max_line_bytes)
    assert proc.stop() == 0


def test_file_refused_even_line_by_line_is_held_and_others_flow(
    watcher: WatcherEnv, db_engine: Engine, database_url: str, exactly_once: Any
) -> None:
    """The last line of defence: a trigger refuses one file's checkpoint for good."""
    with db_engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "IF strpos(NEW.path, 'poison') > 0 AND NEW.committed_offset > 0 THEN "
            "RAISE EXCEPTION 'poison file refused'; END IF; RETURN NEW; END $$"
        )
        conn.exec_driver_sql(
            "CREATE TRIGGER refuse_poison BEFORE UPDATE ON sources "
            "FOR EACH ROW EXECUTE FUNCTION refuse_poison()"
        )
    good, good_session = good_file(watcher)
    poison_session = new_uuid()
    poison = project_dir(watcher.root, "-poison") / f"{poison_session}.jsonl"
    append(poison, *conversation(poison_session, 2))
    proc = watcher.start()

    wait_for(lambda: stored(db_engine, good, 4), "the good file", details=proc.log)
    held = wait_for(
        lambda: rows(
            db_engine,
            "SELECT source_path, reason FROM rejected_events WHERE reason LIKE 'file_held:%'",
        ),
        "the held file's record",
        details=proc.log,
    )
    assert held == [(str(poison), "file_held: P0001 RaiseException: poison file refused")]
    append(good, user(good_session, "while the other is held"))
    wait_for(lambda: stored(db_engine, good, 5), "the good file's new line", details=proc.log)
    assert_running(proc, "healthy")
    assert source_row(db_engine, poison).committed_offset == 0  # held, nothing lost

    with db_engine.begin() as conn:
        conn.exec_driver_sql("DROP TRIGGER refuse_poison ON sources")
    wait_for(lambda: stored(db_engine, poison, 2), "the held file, retried", details=proc.log)
    append(poison, user(poison_session, "appended"))
    wait_for(lambda: stored(db_engine, poison, 3), "its next line", details=proc.log)
    assert "held file stored again" in proc.log()
    exactly_once(db_engine, watcher.root, files=[str(good), str(poison)])
    assert proc.stop() == 0


# --------------------------------------------------------------------------- the database


def test_read_only_database_degrades_holds_and_recovers(
    watcher: WatcherEnv, db_engine: Engine, database_url: str, exactly_once: Any
) -> None:
    good, session = good_file(watcher)
    proc = watcher.start()
    wait_for(lambda: stored(db_engine, good, 4), "the first lines", details=proc.log)
    dbname = make_url(database_url).database
    try:
        with admin(database_url) as conn:
            conn.execute(f'ALTER DATABASE "{dbname}" SET default_transaction_read_only = on')
        # its pooled sessions started writable; the write path (not a reconnect) meets it
        terminate_pool_backends(database_url, keep=lock_holders(db_engine))
        append(good, user(session, "while read-only"))

        assert_running(proc, "degraded")
        wait_for(
            lambda: (
                "25006" in (status_of(proc).get("last_error") or "")
                or "read-only" in (status_of(proc).get("last_error") or "")
            ),
            "the read-only error in the status",
            details=lambda: f"{status_of(proc)}\n{proc.log()}",
        )
        stays_degraded(proc)
        assert source_row(db_engine, good).lines_committed == 4  # offsets held
        wait_for(lambda: "transient write failure" in proc.log(), "a retry", details=proc.log)
        assert "batch refused" not in proc.log()  # an outage, not bad lines: never narrowed
    finally:
        with admin(database_url) as conn:
            conn.execute(f'ALTER DATABASE "{dbname}" SET default_transaction_read_only = off')

    wait_for(lambda: stored(db_engine, good, 5), "recovery by itself", details=proc.log)
    assert_running(proc, "healthy")
    exactly_once(db_engine, watcher.root)
    assert proc.stop() == 0


@contextlib.contextmanager
def small_tmpfs(owner: Any, size: str = "4m") -> Iterator[Path]:
    """A tmpfs owned by the server's user (``RunAs``), unmounted at the end."""
    where = Path(tempfile.mkdtemp(prefix="headspace-tmpfs-", dir="/tmp"))
    os.chmod(where, 0o755)
    opts = f"size={size},mode=0700"
    if owner is not None:
        opts += f",uid={owner.uid},gid={owner.gid}"
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        where.rmdir()
        pytest.skip(f"cannot mount a tmpfs for a full tablespace: {result.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)
        with contextlib.suppress(OSError):
            where.rmdir()


def fill(conn: psycopg.Connection[Any]) -> int:
    """Fill the tablespace of table ``filler`` until PostgreSQL reports disk full (53100)."""
    written = 0
    for chunk in (256 * 1024, 8 * 1024, 1024):
        while True:
            try:
                conn.execute(
                    "INSERT INTO filler VALUES (gen_random_uuid()::text || %s)",
                    (secrets.token_hex(chunk // 2),),
                )
            except psycopg.errors.DiskFull:
                break
            written += chunk
    return written


def test_disk_full_degrades_holds_and_recovers_when_space_returns(
    own_pg_cluster: PgCluster, tmp_path: Path, exactly_once: Any
) -> None:
    url = own_pg_cluster.url()
    engine = make_engine(url)
    env = WatcherEnv.create(tmp_path, url)
    try:
        with small_tmpfs(own_pg_cluster.run_as) as space:
            with own_pg_cluster.connect() as conn:
                conn.execute(f"CREATE TABLESPACE small LOCATION '{space}'")
                conn.execute("ALTER TABLE events SET TABLESPACE small")
                conn.execute("CREATE TABLE filler (b text) TABLESPACE small")
                conn.execute("ALTER TABLE filler ALTER COLUMN b SET STORAGE EXTERNAL")
                assert fill(conn) > 0
            good, session = good_file(env)
            proc = env.start(ready=False)

            assert_running(proc, "degraded")
            wait_for(
                lambda: (
                    "53100" in (status_of(proc).get("last_error") or "")
                    or "No space left" in (status_of(proc).get("last_error") or "")
                ),
                "the disk-full error in the status",
                details=lambda: f"{status_of(proc)}\n{proc.log()}",
            )
            row = source_row(engine, good)
            assert row is None or row.committed_offset == 0  # offsets held
            append(good, user(session, "while full"))
            stays_degraded(proc)
            row = source_row(engine, good)
            assert row is None or row.committed_offset == 0
            assert "batch refused" not in proc.log()  # an outage, not bad lines
            assert proc.popen.poll() is None, proc.log()

            with own_pg_cluster.connect() as conn:
                conn.execute("DROP TABLE filler")  # space returns
            wait_for(lambda: stored(engine, good, 5), "recovery by itself", details=proc.log)
            assert_running(proc, "healthy")
            exactly_once(engine, env.root)
            assert proc.stop() == 0
            own_pg_cluster.stop()  # before the tmpfs goes
    finally:
        env.close()
        engine.dispose()


# --------------------------------------------------------------------------- single instance


def test_lock_connection_killed_is_taken_again_without_exit(
    watcher: WatcherEnv, db_engine: Engine, exactly_once: Any
) -> None:
    good, session = good_file(watcher)
    proc = watcher.start()
    wait_for(lambda: stored(db_engine, good, 4), "the first lines", details=proc.log)
    [holder] = wait_for(lambda: lock_holders(db_engine), "the single-instance lock")

    assert scalar(db_engine, "SELECT pg_terminate_backend(:p)", p=holder)
    wait_for(
        lambda: (h := lock_holders(db_engine)) and h != [holder],
        "the lock taken again",
        details=proc.log,
    )
    append(good, user(session, "after the lock was lost"))
    wait_for(lambda: stored(db_engine, good, 5), "ingest going on", details=proc.log)
    assert_running(proc, "healthy")
    second = watcher.start(ready=False, HEADSPACE_STATE_DIR=str(watcher.tmp / "state-b"))
    assert second.popen.wait(timeout=30) == 4, second.log()  # the lock really is held again
    exactly_once(db_engine, watcher.root)
    assert proc.stop() == 0


def test_lock_taken_over_while_lost_is_waited_for_without_writing(
    watcher: WatcherEnv, db_engine: Engine, database_url: str, exactly_once: Any
) -> None:
    """Another holder got the lock in the window after ours was lost: we write nothing,
    stay up (degraded), and go on once it is free again."""
    good, session = good_file(watcher)
    proc = watcher.start()
    wait_for(lambda: stored(db_engine, good, 4), "the first lines", details=proc.log)
    key = f"headspace-watcher:{socket.gethostname()}:{os.path.realpath(watcher.root)}"
    with admin(database_url) as probe:
        dbname = make_url(database_url).database
        other = psycopg.connect(
            make_url(database_url)
            .set(drivername="postgresql")
            .render_as_string(hide_password=False),
            autocommit=True,
        )

        def take_over() -> bool:
            [holder] = wait_for(lambda: lock_holders(db_engine), "the lock")
            probe.execute("SELECT pg_terminate_backend(%s)", (holder,))
            row = other.execute(
                "SELECT pg_try_advisory_lock(%s, hashtext(%s))", (LOCK_NAMESPACE, key)
            ).fetchone()
            return bool(row and row[0])

        try:
            wait_for(take_over, f"the lock of {dbname} taken over", details=proc.log)
            append(good, user(session, "while another holds the lock"))
            assert_running(proc, "degraded")
            stays_degraded(proc)
            assert source_row(db_engine, good).lines_committed == 4  # nothing written
        finally:
            other.close()  # the other holder goes away
    wait_for(lambda: stored(db_engine, good, 5), "ingest going on", details=proc.log)
    assert_running(proc, "healthy")
    exactly_once(db_engine, watcher.root)
    assert proc.stop() == 0


def test_second_watcher_through_a_symlinked_alias_is_refused(
    watcher: WatcherEnv, db_engine: Engine, exactly_once: Any
) -> None:
    good, _ = good_file(watcher)
    first = watcher.start()
    alias = watcher.tmp / "alias"
    alias.symlink_to(watcher.root, target_is_directory=True)

    second = watcher.start(
        ready=False,
        HEADSPACE_PROJECTS_PATH=str(alias),
        HEADSPACE_STATE_DIR=str(watcher.tmp / "state-b"),
    )
    assert second.popen.wait(timeout=30) == 4, second.log()
    assert "another headspace-watcher already watches" in second.log()
    wait_for(lambda: stored(db_engine, good, 4), "the first watcher's ingest", details=first.log)
    assert_running(first, "healthy")
    exactly_once(db_engine, watcher.root)
    assert first.stop() == 0


def test_second_instance_with_the_same_state_dir_touches_nothing(
    watcher: WatcherEnv, db_engine: Engine, exactly_once: Any
) -> None:
    good, session = good_file(watcher)
    proc = watcher.start()
    pid_file = watcher.state_dir / "headspace-watcher.pid"
    status_file = watcher.state_dir / "status.json"
    other = watcher.tmp / "other-tree"
    other_good = project_dir(other) / f"{new_uuid()}.jsonl"
    append(other_good, *conversation(new_uuid(), 2))
    before = (pid_file.read_text(), pid_file.stat().st_ino)

    for args in (("run", "--once"), ("run",)):
        result = watcher.cli(*args, timeout=30, HEADSPACE_PROJECTS_PATH=str(other))
        assert result.returncode == 4, result.stderr
        assert str(watcher.state_dir) in result.stderr and str(proc.pid) in result.stderr
        assert (pid_file.read_text(), pid_file.stat().st_ino) == before
        assert json.loads(status_file.read_text())["pid"] == proc.pid

    assert source_row(db_engine, other_good) is None  # refused before touching anything
    report = json.loads(watcher.cli("status", "--json").stdout)
    assert (report["state"], report["pid"]) == ("healthy", proc.pid)
    append(good, user(session, "still ingesting"))
    wait_for(lambda: stored(db_engine, good, 5), "the live one's ingest", details=proc.log)
    assert_running(proc, "healthy")
    exactly_once(db_engine, watcher.root)
    assert proc.stop() == 0
    assert not pid_file.exists()  # the live one still owned (and removed) its pid file
