"""The quick start end to end: `headspace-watcher setup`, then real circusd running the
project's own circus.ini — the embedded PostgreSQL from the wheel and the real service —
ingesting a transcript tree, live appends included, then a clean Ctrl-C.

circusd runs in a temporary directory holding a copy of circus.ini and a symlink to the
project's .venv (circus.ini's paths are relative to circusd's working directory, as under
`just run`), with PATH stripped of any PostgreSQL so only the embedded server can be used.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from watcher_helpers import append, assistant, conversation, new_uuid, user, wait_for

from headspace_watcher.store import embedded as pgserver

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


@pytest.fixture
def quickstart_dir() -> Iterator[Path]:
    """World-traversable (PostgreSQL runs as an unprivileged user when we are root)."""
    root = Path(tempfile.mkdtemp(prefix="headspace-quickstart-", dir="/tmp"))
    os.chmod(root, 0o755)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _env(root: Path, port: int) -> dict[str, str]:
    config = root / "config.yaml"
    config.write_text(
        f"database:\n  url: null\n  embedded_port: {port}\n"
        "health:\n  heartbeat_interval_seconds: 1\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("HEADSPACE_")}
    env.update(
        HEADSPACE_CONFIG=str(config),
        HEADSPACE_STATE_DIR=str(root / "var"),
        HEADSPACE_PROJECTS_PATH=str(root / "projects"),
        PATH=f"{VENV_BIN}:/usr/bin:/bin",  # no PostgreSQL on PATH
        PWD=str(root),
    )
    return env


def _status(root: Path, env: dict[str, str]) -> tuple[int, dict]:
    proc = subprocess.run(
        [str(root / ".venv" / "bin" / "headspace-watcher"), "status", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    return proc.returncode, json.loads(proc.stdout)


def _turns(url: str) -> int:
    with psycopg.connect(url.replace("postgresql+psycopg", "postgresql")) as conn:
        return conn.execute(
            "SELECT count(*) FROM events WHERE event_type = 'turn_detected'"
        ).fetchone()[0]


def test_setup_then_circusd_ingests_a_tree_with_the_embedded_postgres(
    quickstart_dir: Path,
) -> None:
    root = quickstart_dir
    port = pgserver.free_port()
    env = _env(root, port)
    (root / ".venv").symlink_to(VENV_BIN.parent)
    shutil.copy(REPO / "circus.ini", root / "circus.ini")
    session = new_uuid()
    transcript = root / "projects" / "-home-u-proj" / f"{session}.jsonl"
    transcript.parent.mkdir(parents=True)
    append(transcript, *conversation(session, 6))  # 6 turns
    append(transcript.parent / session / "subagents" / "agent-a1.jsonl", user(session, "sub"))

    setup = subprocess.run(
        [str(VENV_BIN / "headspace-watcher"), "setup"],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert setup.returncode == 0, setup.stderr
    assert pgserver.embedded_bin_dir() is not None  # the wheel's server, not a system one
    url = pgserver.embedded_url(root / "var", port)
    password = pgserver.read_password(root / "var")

    log = (root / "circusd.log").open("wb")
    circusd = subprocess.Popen(
        [str(root / ".venv" / "bin" / "circusd"), "circus.ini"],
        cwd=root,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_for(lambda: _status(root, env)[1]["state"] == "healthy", "healthy", timeout=60)
        wait_for(lambda: _turns(url) == 7, "the tree's 7 turns", timeout=30)
        append(transcript, assistant(session, "live turn"))
        wait_for(lambda: _turns(url) == 8, "the live append", timeout=30)
        code, report = _status(root, env)
        assert code == 0 and report["database_reachable"] is True
        assert report["events_written"] >= 8
        assert password not in json.dumps(report)
    finally:
        circusd.send_signal(signal.SIGINT)  # Ctrl-C under `just run`
        try:
            circusd.wait(timeout=30)
        finally:
            if circusd.poll() is None:
                os.killpg(circusd.pid, signal.SIGKILL)
            log.close()
    code, report = _status(root, env)
    assert code == 3 and report["state"] == "stopped"
    data_dir = Path(os.path.realpath(pgserver.embedded_data_dir(root / "var")))
    wait_for(lambda: not (data_dir / "postmaster.pid").exists(), "postgres stopped", timeout=30)
    circus_log = (root / "circusd.log").read_text()
    assert password not in circus_log
    for path in (root / "var" / "log").glob("*.log"):
        assert password not in path.read_text(errors="replace"), path
