"""Health as ``status`` reports it: a hung service is not healthy, lag counts what is behind.

Against the contract: a real ``headspace-watcher run`` process, its ``status.json`` and
``status --json``; time moved with freezegun, never waited for.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from freezegun import freeze_time
from watcher_helpers import (
    WatcherEnv,
    WatcherProcess,
    append,
    assistant,
    project_dir,
    turn_texts,
    user,
    wait_for,
)

from headspace_watcher.service import health
from headspace_watcher.store.engine import make_engine

S1 = "0a0a0a0a-1b1b-4c2c-8d3d-4e4e4e4e4e4e"


@contextmanager
def stopped(proc: WatcherProcess) -> Iterator[None]:
    """The process frozen (SIGSTOP) — alive, pid file in place, reporting nothing."""
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(proc.pid, signal.SIGCONT)


def status_json(watcher: WatcherEnv) -> tuple[int, dict[str, Any]]:
    result = watcher.cli("status", "--json")
    return result.returncode, json.loads(result.stdout)


def test_a_hung_service_is_reported_degraded_with_a_reason(watcher: WatcherEnv) -> None:
    proc = watcher.start()
    with stopped(proc):
        config = watcher.config()
        fresh = health.status(config, check_database=False)
        assert fresh["state"] == "healthy", fresh  # the control: just frozen, still fresh
        assert "reason" not in fresh

        with freeze_time(datetime.now(UTC) + timedelta(minutes=1)):
            late = health.status(config, check_database=False)

        assert late["pid"] == proc.pid  # the process is alive ...
        assert late["state"] == "degraded"  # ... but has not reported for a minute
        assert late["reason"] == "the service has not reported for a while"

        # The same through the command: a status.json last updated an hour ago.
        path = health.status_path(watcher.state_dir)
        old = json.loads(path.read_text())
        old["updated_at"] = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
        path.write_text(json.dumps(old))
        code, report = status_json(watcher)
        assert (code, report["state"]) == (health.EXIT_DEGRADED, "degraded"), report
        assert report["reason"] == "the service has not reported for a while"
    assert proc.stop() == 0


def complete_bytes(path: Path, committed: int) -> int:
    data = path.read_bytes()
    return data.rfind(b"\n") + 1 - committed


def test_lag_bytes_counts_complete_lines_not_committed_during_an_outage(
    tmp_path: Path, own_pg_cluster: Any, exactly_once: Any
) -> None:
    env = WatcherEnv.create(tmp_path, own_pg_cluster.url())
    path = project_dir(env.root) / f"{S1}.jsonl"
    try:
        proc = env.start()
        append(path, user(S1, "before the outage"))
        engine = make_engine(own_pg_cluster.url())
        try:
            wait_for(lambda: turn_texts(engine) == ["before the outage"], "the first turn")
            committed = path.stat().st_size
            engine.dispose()
            own_pg_cluster.stop()

            behind = assistant(S1, "during") + user(S1, "the outage")
            append(path, behind + b'{"type": "user", "partial')  # one write: read as a whole
            assert complete_bytes(path, committed) == len(behind)

            def lag() -> int | None:
                st = proc.status_file() or {}
                return st.get("lag_bytes") if st.get("state") == "degraded" else None

            wait_for(
                lambda: lag() == len(behind),
                f"status.json lag_bytes == {len(behind)} (the partial line not counted)",
                details=lambda: f"{proc.status_file()}\n{proc.log()}",
            )

            own_pg_cluster.start()
            wait_for(lambda: len(turn_texts(engine)) == 3, "the backlog after the outage")
            wait_for(lambda: (proc.status_file() or {}).get("lag_bytes") == 0, "lag back to 0")
            assert proc.stop() == 0
            exactly_once(engine, env.root, max_line_bytes=env.max_line_bytes)
        finally:
            engine.dispose()
    finally:
        env.close()
