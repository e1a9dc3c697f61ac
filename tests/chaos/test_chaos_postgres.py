"""PostgreSQL outages under the running service: ``pg_ctl stop -m immediate`` (SIGQUIT) or a
SIGKILL of the whole server, while transcripts keep growing; and a restart while a large
batch is being committed. The service must stay up (process alive, ``status --json``
degraded while the database is down), resume by itself, and end exact.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time

import psycopg
import pytest
from appender import append_lines
from gen import TreeGen, write_tree
from harness import ChaosEnv, Watcher, make_rng, pick, wait_for
from invariants import assert_exact, snapshot

from headspace_watcher.store.embedded import PgCluster

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(pick(240, 1800))]


def _wait_degraded(env: ChaosEnv, w: Watcher, seed: int) -> dict[str, object]:
    def degraded() -> dict[str, object] | None:
        assert w.alive(), f"seed {seed}: the watcher died with the database:\n{w.log()}"
        code, report = env.status()
        if report.get("state") == "degraded":
            assert code == 1, report
            assert report["pid"] == w.pid and report["database_reachable"] is False, report
            return report
        return None

    return wait_for(degraded, "status --json to say degraded", timeout=20, details=w.log)


def _wait_resumed(env: ChaosEnv, w: Watcher, seed: int, before: int) -> None:
    def resumed() -> bool:
        assert w.alive(), f"seed {seed}: watcher exited:\n{w.log()}"
        try:
            return env.committed() > before
        except Exception:  # the server may still be in recovery
            return False

    wait_for(resumed, "the watcher to resume by itself", timeout=45, details=w.log)


def _stop_server(pg: PgCluster, rng: random.Random) -> str:
    if rng.random() < 0.75:
        pg.stop("immediate")
        return "stop -m immediate"
    pg.kill()
    return "SIGKILL"


def test_postgres_outages_while_appending(
    chaos_env_own_pg: ChaosEnv, own_pg_cluster: PgCluster, exactly_once: object
) -> None:
    env, pg = chaos_env_own_pg, own_pg_cluster
    rng, seed = make_rng("PostgreSQL outages while appending")
    gen = TreeGen(rng, env.root, oversized_every=1999, max_line_bytes=env.max_line)
    write_tree(gen, gen.tree(25), (50, 300))
    w = env.start()
    wait_for(lambda: not w.alive() or env.committed() > 0, "first commit", details=w.log)

    # A writer keeps appending, in pieces, to existing and new sessions, through every outage.
    app_gen = TreeGen(random.Random(seed + 1), env.root, max_line_bytes=env.max_line)
    app_files = [f for _ in range(6) for f in app_gen.new_session_files()]
    stop = threading.Event()
    appender = threading.Thread(
        target=append_lines,
        args=(app_gen, app_files),
        kwargs={"stop": stop, "new_session_every": 150},
        daemon=True,
    )
    appender.start()
    outages = pick(2, 25)
    try:
        for i in range(outages):
            time.sleep(rng.uniform(0.1, 1.0))  # fault schedule: while catching up / live
            how = _stop_server(pg, rng)
            down_at = time.monotonic()
            report = _wait_degraded(env, w, seed)
            time.sleep(max(0.0, rng.uniform(0.5, pick(1.5, 6.0)) - (time.monotonic() - down_at)))
            assert w.alive(), f"seed {seed}: watcher exited during the outage:\n{w.log()}"
            pg.start()
            committed = env.committed()
            _wait_resumed(env, w, seed, committed)
            print(
                f"[chaos] outage {i} ({how}): status degraded (failed_writes="
                f"{report.get('failed_writes')}); writing again {time.monotonic() - down_at:.1f}s "
                "after the stop"
            )
    finally:
        stop.set()
        appender.join(timeout=10)

    env.wait_caught_up(w, timeout=pick(60, 300))
    code, report = env.status()
    assert code == 0 and report["state"] == "healthy", report
    exit_code, _took = w.term()
    assert exit_code == 0, w.log()
    rep = assert_exact(env.engine, snapshot(env.root), max_line_bytes=env.max_line)
    exactly_once(env.engine, env.root, max_line_bytes=env.max_line)  # type: ignore[operator]
    print(
        f"[chaos] seed {seed}: {outages} outages; {rep.files} files, {rep.lines} lines, "
        f"{rep.turns} turns, {rep.rejects} rejected"
    )


def _copy_in_flight(pg: PgCluster) -> bool:
    with contextlib.suppress(psycopg.Error), pg.connect(connect_timeout=2) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'headspace-watcher' "
            "AND state = 'active' AND query LIKE 'COPY events%'"
        ).fetchone()
        return bool(row and row[0])
    return False


def test_postgres_restart_in_the_middle_of_a_large_batch(
    chaos_env_own_pg: ChaosEnv, own_pg_cluster: PgCluster, exactly_once: object
) -> None:
    env, pg = chaos_env_own_pg, own_pg_cluster
    env.configure(file_watcher={"batch_max_lines": 50_000, "batch_max_bytes": 64 << 20})
    rng, seed = make_rng("PostgreSQL restart mid-batch")
    gen = TreeGen(rng, env.root, oversized_every=2999, max_line_bytes=env.max_line, long_text=0.05)
    files = gen.tree(30)
    backlog = pick(6, 30) << 20

    def big_backlog() -> None:
        written = 0
        while written < backlog:
            written += write_tree(gen, rng.sample(files, k=10), (200, 600))

    big_backlog()  # the first scan finds it all: one large batch
    w = env.start()
    rounds = pick(2, 10)
    for i in range(rounds):
        # Wait for the COPY of a large batch to be on the wire, then pull the server.
        wait_for(lambda: not w.alive() or _copy_in_flight(pg), "a large COPY", timeout=60)
        time.sleep(rng.uniform(0, 0.15))  # fault schedule
        assert w.alive(), f"seed {seed}: {w.log()}"
        how = _stop_server(pg, rng)
        _wait_degraded(env, w, seed)
        if i < rounds - 1:
            big_backlog()  # appended during the outage: the reconnect starts with a big batch
        pg.start()
        print(f"[chaos] round {i}: {how} during a COPY; committed then: {env.committed()} bytes")
    env.wait_caught_up(w, timeout=pick(60, 300))

    exit_code, _took = w.term()
    assert exit_code == 0, w.log()
    rep = assert_exact(env.engine, snapshot(env.root), max_line_bytes=env.max_line)
    exactly_once(env.engine, env.root, max_line_bytes=env.max_line)  # type: ignore[operator]
    print(f"[chaos] seed {seed}: {rep.lines} lines, {rep.turns} turns, {rep.rejects} rejected")
