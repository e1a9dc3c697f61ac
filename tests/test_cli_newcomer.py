"""Issue 11 as a new user meets it, through the real console script: seeing the data
(psql, pg-dump, url), honest outcomes (missing projects path, embedded server down, a
rejected registration), one state dir that `status` finds, and the CLI's paper cuts.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text
from watcher_helpers import (
    CONSOLE_SCRIPT,
    WATCHER_TEST_PASSWORD,
    WatcherEnv,
    append,
    count,
    project_dir,
    user,
    wait_for,
)

from headspace_watcher.store import embedded as pgserver

REPO = Path(__file__).resolve().parents[1]
S1 = "c0c0c0c0-d1d1-4e2e-8f3f-404040404041"
PSQL = pgserver.client_binary("psql")
COMMANDS = (
    "run", "status", "init-db", "check-config", "setup", "register", "unregister", "psql",
    "pg-dump", "url",
)  # fmt: skip


def no_secret(*outputs: str) -> None:
    for out in outputs:
        assert WATCHER_TEST_PASSWORD not in out


# =========================================================================== psql, url, pg-dump


def test_psql_runs_on_the_configured_database_with_no_password_in_argv(
    watcher: WatcherEnv, password_database_url: str
) -> None:
    watcher.database_url = password_database_url
    assert watcher.cli("init-db").returncode == 0

    done = watcher.cli("psql", "-At", "-c", "select count(*) from events")
    assert (done.returncode, done.stdout.strip()) == (0, "0"), done.stderr

    # psql's own view of itself: its command line holds no password, its libpq keeps
    # refusing a server that does not prove it knows the password
    probe = watcher.cli(
        "psql", "-At", "-c", r"\! tr '\0' ' ' < /proc/$PPID/cmdline; echo; echo $PGREQUIREAUTH"
    )
    argv, require_auth = probe.stdout.splitlines()[:2]
    assert probe.returncode == 0, probe.stderr
    assert "psql" in argv and WATCHER_TEST_PASSWORD not in argv
    assert require_auth == "scram-sha-256"

    failed = watcher.cli("psql", "-v", "ON_ERROR_STOP=1", "-c", "select no_such_column")
    assert failed.returncode == 1  # psql's own exit code
    assert "no_such_column" in failed.stderr
    no_secret(done.stdout, done.stderr, failed.stderr)


def test_url_is_a_libpq_url_masked_unless_asked(
    watcher: WatcherEnv, password_database_url: str
) -> None:
    watcher.database_url = password_database_url

    masked = watcher.cli("url")
    shown = watcher.cli("url", "--show-password")

    assert masked.returncode == 0 and shown.returncode == 0, masked.stderr + shown.stderr
    assert masked.stdout.startswith("postgresql://") and "***" in masked.stdout
    no_secret(masked.stdout, masked.stderr)
    url = shown.stdout.strip()
    assert url.startswith("postgresql://") and WATCHER_TEST_PASSWORD in url
    assert "require_auth=scram-sha-256" in url
    # what a user does with it: hand it to psql (any libpq tool)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    done = subprocess.run(
        [str(PSQL), url, "-At", "-c", "select 1"], capture_output=True, text=True, env=env
    )
    assert (done.returncode, done.stdout.strip()) == (0, "1"), done.stderr


@pytest.fixture
def embedded_state() -> Iterator[tuple[Path, dict[str, str]]]:
    """A served embedded PostgreSQL in a world-traversable state dir (it runs unprivileged
    when we are root) and the environment of a user of it (no database URL)."""
    root = Path(tempfile.mkdtemp(prefix="headspace-newcomer-", dir="/tmp"))
    os.chmod(root, 0o755)
    port = pgserver.free_port()
    config = root / "config.yaml"
    config.write_text(f"database:\n  url: null\n  embedded_port: {port}\n")
    (root / "projects").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HEADSPACE_", "PG"))}
    env.update(
        HEADSPACE_CONFIG=str(config),
        HEADSPACE_STATE_DIR=str(root / "state"),
        HEADSPACE_PROJECTS_PATH=str(root / "projects"),
    )
    try:
        setup = subprocess.run(
            [str(CONSOLE_SCRIPT), "setup"], env=env, capture_output=True, text=True
        )
        assert setup.returncode == 0, setup.stderr
        yield root, env
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _serve(env: dict[str, str]) -> subprocess.Popen[bytes]:
    from headspace_watcher.config import load_config

    config = load_config(env=env)
    port = config.database.embedded_port
    proc = subprocess.Popen(
        [sys.executable, "-m", "headspace_watcher.store.embedded", "serve",
         "--state-dir", str(config.state_dir), "--port", str(port)],
        env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    socket_file = pgserver.embedded_socket_file(config.state_dir, port)
    wait_for(lambda: socket_file.exists(), "the embedded server's socket", timeout=60)
    return proc


def _hw(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(CONSOLE_SCRIPT), *args], env=env, capture_output=True, text=True, timeout=60
    )


def test_embedded_down_says_how_to_start_it_then_psql_and_pg_dump_use_its_socket(
    embedded_state: tuple[Path, dict[str, str]],
) -> None:
    root, env = embedded_state
    append(project_dir(root / "projects") / f"{S1}.jsonl", user(S1, "hello"))

    for args in (("run", "--once"), ("psql", "-c", "select 1"), ("url",)):
        done = _hw(env, *args)
        assert done.returncode in (1, 3), (args, done.stderr)
        assert "embedded PostgreSQL" in done.stderr and "not running" in done.stderr
        assert "just run" in done.stderr and "store.embedded serve" in done.stderr
        assert "holding position" not in done.stderr, done.stderr

    server = _serve(env)
    try:
        assert _hw(env, "run", "--once").returncode == 0
        done = _hw(env, "psql", "-At", "-c", "select current_user, count(*) from events")
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "headspace_watcher|2"  # registered + the turn
        url = _hw(env, "url").stdout.strip()
        assert url.startswith("postgresql://headspace_watcher:***@/headspace?host=")
        assert f"state{os.sep}pgsocket".replace("/", "%2F") in url
        dump = _hw(env, "pg-dump", "--table=events", "--data-only", "--inserts")
        assert dump.returncode == 0, dump.stderr
        assert "hello" in dump.stdout
    finally:
        server.terminate()
        server.wait(timeout=60)


# =========================================================================== honest outcomes


@pytest.mark.parametrize("kind", ["missing", "a file"])
def test_run_once_on_a_bad_projects_path_exits_2_naming_it(watcher: WatcherEnv, kind: str) -> None:
    path = watcher.tmp / "nope"
    if kind == "a file":
        path.write_text("not a tree\n")

    done = watcher.cli("run", "--once", HEADSPACE_PROJECTS_PATH=str(path))

    assert done.returncode == 2, done.stderr
    assert str(path) in done.stderr
    assert "HEADSPACE_PROJECTS_PATH" in done.stderr and "file_watcher.projects_path" in done.stderr
    assert ("does not exist" if kind == "missing" else "is not a directory") in done.stderr
    assert "caught up" not in done.stderr


def test_run_waits_for_a_missing_projects_path_and_status_says_so(watcher: WatcherEnv) -> None:
    missing = watcher.tmp / "later"
    proc = watcher.start(HEADSPACE_PROJECTS_PATH=str(missing))

    report = json.loads(
        watcher.cli("status", "--json", HEADSPACE_PROJECTS_PATH=str(missing)).stdout
    )
    plain = watcher.cli("status", HEADSPACE_PROJECTS_PATH=str(missing)).stdout
    missing.mkdir()
    wait_for(
        lambda: (proc.status_file() or {}).get("projects_path_present"),
        "the service to see the path",
        details=proc.log,
    )
    after = json.loads(watcher.cli("status", "--json", HEADSPACE_PROJECTS_PATH=str(missing)).stdout)
    assert proc.stop() == 0

    assert report["projects_path_problem"] == "does not exist"
    assert str(missing) in report["waiting_for"]
    assert "waiting_for" in plain and "HEADSPACE_PROJECTS_PATH" in plain
    assert "waiting_for" not in after


def test_register_refuses_a_bad_uuid_or_payload_and_writes_nothing(
    watcher: WatcherEnv, db_engine
) -> None:  # type: ignore[no-untyped-def]
    bad_uuid = watcher.cli(
        "register", "not-a-uuid", "--project-path", "/p", "--working-directory", "/p"
    )
    empty = watcher.cli("register", S1, "--project-path", "", "--working-directory", "/p")

    for done in (bad_uuid, empty):
        assert done.returncode == 2, done.stderr
        assert "registered" not in done.stdout
        assert "nothing was written" in done.stderr
    assert "UUID" in bad_uuid.stderr
    with db_engine.connect() as conn:
        assert conn.execute(text("select count(*) from sessions")).scalar() == 0
        assert conn.execute(text("select count(*) from rejected_events")).scalar() == 0
    assert count(db_engine) == 0


# =========================================================================== one state dir


def test_status_finds_the_service_started_with_another_state_dir(watcher: WatcherEnv) -> None:
    proc = watcher.start()
    without = {k: v for k, v in watcher.env_vars().items() if k != "HEADSPACE_STATE_DIR"}

    done = subprocess.run(
        [str(CONSOLE_SCRIPT), "status", "--json"], env=without, capture_output=True, text=True
    )
    plain = subprocess.run(
        [str(CONSOLE_SCRIPT), "status"], env=without, capture_output=True, text=True
    )
    assert proc.stop() == 0

    report = json.loads(done.stdout)
    assert (done.returncode, report["state"], report["pid"]) == (0, "healthy", proc.pid)
    assert report["state_dir"] == str(watcher.state_dir)
    assert str(watcher.state_dir) in report["note"]
    assert f"state_dir: {watcher.state_dir}" in plain.stdout


def test_status_names_the_state_dir_it_read_when_stopped(watcher: WatcherEnv) -> None:
    done = watcher.cli("status")
    assert done.returncode == 3
    assert f"state_dir: {watcher.state_dir}" in done.stdout


def test_two_instances_never_share_a_state_dir(watcher: WatcherEnv) -> None:
    first = watcher.start()
    other_tree = watcher.tmp / "other-projects"
    other_tree.mkdir()

    second = watcher.start(ready=False, HEADSPACE_PROJECTS_PATH=str(other_tree))
    assert second.popen.wait(timeout=30) == 4, second.log()
    assert first.popen.poll() is None
    assert first.stop() == 0

    assert f"already watches from state dir {watcher.state_dir}" in second.log()
    assert "HEADSPACE_STATE_DIR" in second.log()


# =========================================================================== paper cuts


def test_global_options_are_accepted_after_the_subcommand(watcher: WatcherEnv) -> None:
    other = watcher.tmp / "other.yaml"
    other.write_text("file_watcher:\n  mode: registered\n")
    env = {k: v for k, v in watcher.env_vars().items() if k != "HEADSPACE_CONFIG"}

    after = subprocess.run(
        [str(CONSOLE_SCRIPT), "check-config", "--config", str(other)],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    before = subprocess.run(
        [str(CONSOLE_SCRIPT), "--config", str(other), "check-config"],
        env=env, capture_output=True, text=True,
    )  # fmt: skip

    assert after.returncode == 0, after.stderr
    assert json.loads(after.stdout)["file_watcher"]["mode"] == "registered"
    assert json.loads(before.stdout) == json.loads(after.stdout)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_help_has_a_description_and_exit_codes(command: str) -> None:
    done = subprocess.run(
        [str(CONSOLE_SCRIPT), command, "--help"], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    _usage, _, rest = done.stdout.partition("\n\n")
    description = rest.split("\n\n")[0]
    assert len(description) > 40, done.stdout
    assert "exit codes:" in done.stdout
    assert "0 " in done.stdout.split("exit codes:")[1] or "own exit code" in done.stdout


def test_piping_to_head_prints_no_broken_pipe(watcher: WatcherEnv) -> None:
    done = subprocess.run(
        f"'{CONSOLE_SCRIPT}' check-config | head -c 1; '{CONSOLE_SCRIPT}' --help | head -c 1",
        shell=True, env=watcher.env_vars(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert "BrokenPipe" not in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert done.stderr == ""


def test_text_status_shows_yes_no_and_a_dash(watcher: WatcherEnv) -> None:
    done = watcher.cli("status")
    fields = dict(
        (key.strip(), value.strip())
        for key, _, value in (row.partition(":") for row in done.stdout.splitlines())
    )
    assert fields["pid"] == "\u2014"
    assert fields["database_reachable"] in ("yes", "no")
    for shown in fields.values():
        assert shown not in ("True", "False", "None")
