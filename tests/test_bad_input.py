"""The bad input matrix: each row against the real service and a real PostgreSQL.

Every row asserts two things: a clear log line (caplog, or the process's stderr) and the
durable record (a ``rejected_events`` row with its reason, the flagged event, or — for
configuration errors — exit code 2 and a message naming the key and the expected value).
Never a crash, never a silent loss: where lines are involved, each file's checkpoint ends at
its last complete line and ``lines_committed`` equals its number of complete lines.

In-process rows use ``Service(config).run(once=True)``; rows that need a live service, a
privilege drop, a memory measurement or a hang guard run the ``headspace-watcher`` process.
The table in ``docs/reliability.md`` points at these tests.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import Engine, text
from watcher_helpers import wait_for

from headspace_watcher.cli import main as cli_main
from headspace_watcher.config import load_config
from headspace_watcher.service.loop import Service
from headspace_watcher.store.engine import make_engine

CLI = [sys.executable, "-m", "headspace_watcher.cli"]
SECRET = "Wr0ng-S3cret-pw-7f3a"
RAW_TEXT_CAP = 64 * 1024


# ------------------------------------------------------------------------------- helpers


def new_session() -> str:
    return str(uuid.uuid4())


def turn(session: str, text: str = "hello there") -> bytes:
    """A realistic user line (timestamp now, so no inactivity timeout fires mid-test)."""
    obj = {
        "type": "user",
        "sessionId": session,
        "uuid": str(uuid.uuid4()),
        "parentUuid": None,
        "timestamp": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        "cwd": "/home/u/proj",
        "version": "2.1.3",
        "message": {"role": "user", "content": text},
    }
    return json.dumps(obj).encode() + b"\n"


def write(path: Path, data: bytes, mode: str = "ab") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, mode) as f:
        f.write(data)
    return path


def write_config(tmp_path: Path, url: str, projects: Path, **file_watcher: Any) -> Path:
    cfg = {
        "database": {"url": url, "connect_timeout_seconds": 2},
        "file_watcher": {"projects_path": str(projects), **file_watcher},
        "event_system": {"write_retry_attempts": 1, "write_retry_delay_ms": 50},
        "health": {"state_dir": str(tmp_path / "state"), "heartbeat_interval_seconds": 1},
        "logging": {"level": "INFO"},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def child_env(cfg: Path | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HEADSPACE_")}
    if cfg is not None:
        env["HEADSPACE_CONFIG"] = str(cfg)
    return env


def run_once_in_process(cfg: Path) -> int:
    """``run --once`` in this process; the service's signal set-up is undone afterwards."""
    sigs = (signal.SIGTERM, signal.SIGINT, signal.SIGALRM)
    saved = {s: signal.getsignal(s) for s in sigs}
    try:
        return Service(load_config(cfg, env={})).run(once=True)
    finally:
        signal.set_wakeup_fd(-1)
        for s, handler in saved.items():
            signal.signal(s, handler)


def unprivileged_prefix() -> list[str]:
    """As root, file modes only bind once CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH are gone."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: cannot make mode 000 a real fault")
    caps = "-dac_override,-dac_read_search"
    return [setpriv, f"--inh-caps={caps}", "--ambient-caps=-all", f"--bounding-set={caps}", "--"]


class Db:
    """Read-only views of what the service stored."""

    def __init__(self, url: str) -> None:
        self.engine: Engine = make_engine(url)

    def rows(self, sql: str, **params: Any) -> list[Any]:
        with self.engine.connect() as conn:
            return list(conn.execute(text(sql), params).all())

    def rejected(self, path: Path | None = None) -> list[Any]:
        sql = "SELECT source_path, byte_offset, raw_text, raw_length, reason FROM rejected_events"
        if path is None:
            return self.rows(sql + " ORDER BY id")
        return self.rows(sql + " WHERE source_path = :p ORDER BY id", p=str(path))

    def turns(self, session: str | None = None) -> list[dict[str, Any]]:
        sql = "SELECT payload FROM events WHERE event_type = 'turn_detected'"
        if session is None:
            return [r[0] for r in self.rows(sql + " ORDER BY id")]
        return [r[0] for r in self.rows(sql + " AND payload->>'session_uuid' = :s", s=session)]

    def events(self, event_type: str) -> list[dict[str, Any]]:
        sql = "SELECT payload FROM events WHERE event_type = :t ORDER BY id"
        return [r[0] for r in self.rows(sql, t=event_type)]

    def source(self, path: Path) -> tuple[int, int] | None:
        rows = self.rows(
            "SELECT committed_offset, lines_committed FROM sources WHERE path = :p", p=str(path)
        )
        return (rows[0][0], rows[0][1]) if rows else None

    def assert_accounted(self, *paths: Path) -> None:
        """Checkpoint at the last complete line; every complete line counted exactly once."""
        for path in paths:
            data = path.read_bytes()
            assert self.source(path) == (data.rfind(b"\n") + 1, data.count(b"\n")), path
        dup = self.rows(
            "SELECT source_id, source_generation, source_offset, source_seq, count(*) FROM events"
            " WHERE source_id IS NOT NULL GROUP BY 1, 2, 3, 4 HAVING count(*) > 1"
        )
        assert dup == []


@pytest.fixture
def db(database_url: str) -> Iterator[Db]:
    handle = Db(database_url)
    yield handle
    handle.engine.dispose()


@pytest.fixture
def projects(tmp_path: Path) -> Path:
    path = tmp_path / "projects"
    path.mkdir()
    return path


class Live:
    """The real ``headspace-watcher run`` process; stderr goes to a file we can read."""

    def __init__(self, cfg: Path, tmp_path: Path, prefix: list[str] | None = None) -> None:
        self.log_path = tmp_path / f"service-{uuid.uuid4().hex[:6]}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [*(prefix or []), *CLI, "--config", str(cfg), "run"],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=child_env(),
        )

    @property
    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


@pytest.fixture
def live(tmp_path: Path) -> Iterator[Callable[..., Live]]:
    started: list[Live] = []

    def start(cfg: Path, prefix: list[str] | None = None) -> Live:
        service = Live(cfg, tmp_path, prefix)
        started.append(service)
        return service

    yield start
    for service in started:
        service.stop()


def assert_logged(caplog: pytest.LogCaptureFixture, message: str, **fields: Any) -> None:
    for record in caplog.records:
        if message in record.getMessage() and all(
            str(want) in str(getattr(record, key, "")) for key, want in fields.items()
        ):
            return
    raise AssertionError(f"no log record {message!r} with {fields}; got {caplog.text[-3000:]}")


# ------------------------------------------------------------------- lines that are rejected

BAD_LINES = {
    "malformed_json": (b'{"type": "user", "message": {"content": "hi"', "invalid_json"),
    "trailing_garbage": (b'{"type": "user"} trailing', "invalid_json"),
    "json_array": (b'[{"type": "user"}]', "not_an_object: top-level JSON value is array"),
    "json_number": (b"42", "not_an_object: top-level JSON value is number"),
    "json_string": (b'"just a string"', "not_an_object: top-level JSON value is string"),
    "json_null": (b"null", "not_an_object: top-level JSON value is null"),
    "invalid_utf8": (b'{"type": "user", "message": {"content": "caf\xc3("}}', "invalid_utf8"),
    "raw_nul_in_string": (b'{"type": "user", "message": {"content": "a\x00b"}}', "invalid_json"),
    "raw_nul_outside": (b'{"type": "user",\x00 "message": {}}', "invalid_json"),
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_bad_line_is_rejected_once_logged_and_neighbours_flow(
    case: str, tmp_path: Path, projects: Path, database_url: str, db: Db, caplog: Any
) -> None:
    bad, reason = BAD_LINES[case]
    session = new_session()
    before = turn(session, "before")
    path = write(projects / "-home-u-proj" / f"{session}.jsonl", before + bad + b"\n")
    write(path, turn(session, "after"))
    cfg = write_config(tmp_path, database_url, projects)

    with caplog.at_level(logging.INFO):
        assert run_once_in_process(cfg) == 0

    assert_logged(caplog, "rejected", reason=reason, source_path=path)
    rows = db.rejected()
    assert len(rows) == 1
    source_path, offset, raw_text, raw_length, stored_reason = rows[0]
    assert (source_path, offset, raw_length) == (str(path), len(before), len(bad))
    assert stored_reason.startswith(reason)
    assert "\x00" not in raw_text  # storable, and kept for the operator:
    assert raw_text == bad.decode("utf-8", "backslashreplace").replace("\x00", "\\x00")
    assert [t["text"] for t in db.turns(session)] == ["before", "after"]
    db.assert_accounted(path)
    # a second run finds everything accounted for: nothing rejected or stored twice
    assert run_once_in_process(cfg) == 0
    assert len(db.rejected()) == 1
    assert len(db.turns(session)) == 2


def test_nul_escape_is_stored_sanitized_and_flagged_not_rejected(
    tmp_path: Path, projects: Path, database_url: str, db: Db, caplog: Any
) -> None:
    session = new_session()
    line = turn(session, "x").replace(
        b'"content": "x"', b'"content": "nul \\u0000 and \\ud800 end"'
    )
    path = write(projects / "-home-u-proj" / f"{session}.jsonl", line)
    cfg = write_config(tmp_path, database_url, projects)

    with caplog.at_level(logging.INFO):
        assert run_once_in_process(cfg) == 0

    assert_logged(caplog, "unstorable characters", path=path)
    assert db.rejected() == []
    [payload] = db.turns(session)
    assert payload["text"] == "nul \ufffd and \ufffd end"
    assert payload["sanitized"] is True
    db.assert_accounted(path)


def test_100mb_line_is_rejected_once_with_full_length_in_bounded_memory(
    tmp_path: Path, projects: Path, database_url: str, db: Db, live: Any
) -> None:
    """Default 64 MiB limit; the service's peak RSS (its own rusage) stays far below 100 MiB."""
    size = 100 * 1024 * 1024
    session = new_session()
    path = projects / "-home-u-proj" / f"{session}.jsonl"
    before = turn(session, "before")
    write(path, before)
    head = b'{"type": "user", "message": {"content": "'
    with open(path, "ab") as f:
        f.write(head)
        block = b"x" * (1 << 20)
        left = size - len(head)
        while left > 0:
            f.write(block[: min(left, len(block))])
            left -= len(block)
        f.write(b"\n")
    write(path, turn(session, "after"))
    cfg = write_config(tmp_path, database_url, projects)
    assert load_config(cfg, env={}).file_watcher.max_line_bytes == 64 * 1024 * 1024

    service = live(cfg)
    wait_for(lambda: len(db.turns(session)) == 2, "the line after the long one")
    # VmHWM: the peak RSS of this process image only (a child's rusage after fork+exec would
    # also count the parent's pages at fork time)
    status = Path(f"/proc/{service.proc.pid}/status").read_text()
    peak_mib = int(next(x for x in status.splitlines() if x.startswith("VmHWM:")).split()[1]) / 1024
    assert service.stop() == 0
    log = service.output

    assert "line_too_long" in log and "rejected" in log
    [(source_path, offset, raw_text, raw_length, reason)] = db.rejected()
    assert (source_path, offset, raw_length) == (str(path), len(before), size)
    assert reason.startswith(f"line_too_long: {size} bytes > max_line_bytes")
    assert len(raw_text) == RAW_TEXT_CAP and raw_text.startswith(head.decode())
    assert [t["text"] for t in db.turns(session)] == ["before", "after"]
    db.assert_accounted(path)
    print(f"peak RSS (VmHWM) of the service over a 100 MiB line: {peak_mib:.0f} MiB")
    assert peak_mib < 100 * 0.8, f"peak RSS {peak_mib:.0f} MiB: the line was held"


# ------------------------------------------------------------------------ file system faults


def test_unreadable_file_is_recorded_once_then_ingested_when_readable(
    tmp_path: Path, projects: Path, database_url: str, db: Db, live: Any
) -> None:
    ok_session, locked_session = new_session(), new_session()
    ok = write(projects / "-p" / f"{ok_session}.jsonl", turn(ok_session) + turn(ok_session))
    locked = write(projects / "-p" / f"{locked_session}.jsonl", turn(locked_session, "one"))
    os.chmod(locked, 0)
    cfg = write_config(tmp_path, database_url, projects)

    first = live(cfg, unprivileged_prefix())
    wait_for(lambda: db.rejected(locked), "the unreadable_file row")
    wait_for(lambda: len(db.turns(ok_session)) == 2, "the readable file")
    assert "cannot read transcript" in first.output and "Permission denied" in first.output
    assert first.stop() == 0

    # A restart still unable to read it logs again but adds no second record.
    service = live(cfg, unprivileged_prefix())
    wait_for(lambda: "cannot read transcript" in service.output, "the second run's error")
    with ok.open("ab") as f:  # committed after the attempt to record the error again
        f.write(turn(ok_session))
    wait_for(lambda: len(db.turns(ok_session)) == 3, "a line appended after the restart")
    assert len(db.rejected(locked)) == 1
    if os.geteuid() == 0:  # root here may still write it: a change must not add a second row
        write(locked, turn(locked_session, "two"))
        write(ok, turn(ok_session))  # a barrier: once it is in, `locked` was tried again
        wait_for(lambda: len(db.turns(ok_session)) == 4, "the barrier line after the change")
        assert service.output.count("cannot read transcript") == 1  # logged once per run
        assert len(db.rejected(locked)) == 1

    os.chmod(locked, 0o644)
    os.utime(locked)  # the touch: inotify ATTRIB/MODIFY on the folder watch
    expected = ["one", "two"] if os.geteuid() == 0 else ["one"]
    wait_for(lambda: len(db.turns(locked_session)) == len(expected), "ingest after chmod")

    [(source_path, offset, _raw, raw_length, reason)] = db.rejected()
    assert (source_path, offset, raw_length) == (str(locked), 0, 0)  # offset: the checkpoint
    assert reason.startswith("unreadable_file") and "Permission denied" in reason
    assert sorted(t["text"] for t in db.turns(locked_session)) == expected
    db.assert_accounted(ok, locked)
    assert service.alive()
    assert service.stop() == 0


def test_folder_deleted_under_the_watcher(
    tmp_path: Path, projects: Path, database_url: str, db: Db, live: Any
) -> None:
    a, b = new_session(), new_session()
    file_a = write(projects / "-proj-a" / f"{a}.jsonl", turn(a))
    file_b = write(projects / "-proj-b" / f"{b}.jsonl", turn(b))
    service = live(write_config(tmp_path, database_url, projects))
    wait_for(lambda: db.turns(a) and db.turns(b), "both projects")

    shutil.rmtree(file_a.parent)  # a project folder vanishes
    write(file_b, turn(b, "still flowing"))
    wait_for(lambda: len(db.turns(b)) == 2, "the other project to keep flowing")
    wait_for(lambda: "session ended" in service.output, "the session end log line")
    [ended] = db.events("session_ended")
    assert (ended["session_uuid"], ended["reason"]) == (a, "closed")

    a2 = new_session()  # the folder comes back with a new session
    file_a2 = write(projects / "-proj-a" / f"{a2}.jsonl", turn(a2, "back"))
    wait_for(lambda: db.turns(a2), "the recreated folder")
    db.assert_accounted(file_b, file_a2)

    shutil.rmtree(projects)  # the whole projects path vanishes, then comes back
    wait_for(lambda: "projects path removed" in service.output, "the root removal log")
    c = new_session()
    file_c = write(projects / "-proj-c" / f"{c}.jsonl", turn(c, "root back"))
    wait_for(lambda: db.turns(c), "the recreated projects path")

    assert service.alive()
    assert "Traceback" not in service.output
    db.assert_accounted(file_c)
    assert db.rejected() == []
    assert [len(db.turns(s)) for s in (a, b, a2, c)] == [1, 2, 1, 1]
    assert service.stop() == 0


def test_symlink_loops_in_the_projects_path(
    tmp_path: Path, projects: Path, database_url: str, db: Db
) -> None:
    session, sub = new_session(), "a1b2c3"
    main = write(projects / "-p" / f"{session}.jsonl", turn(session, "main"))
    agent = write(
        projects / "-p" / session / "subagents" / f"agent-{sub}.jsonl", turn(session, "sub")
    )
    (projects / "loop").symlink_to(".")  # root → root
    (projects / "-p" / "up").symlink_to("..")  # project → its parent
    (projects / "-p" / session / "subagents" / "top").symlink_to("../../..")
    (projects / "-p" / session / "subagents" / "loop.jsonl").symlink_to("..")  # a dir, named .jsonl
    (projects / "-p" / "self.jsonl").symlink_to("self.jsonl")  # ELOOP
    (projects / "-p" / "ping.jsonl").symlink_to("pong.jsonl")
    (projects / "-p" / "pong.jsonl").symlink_to("ping.jsonl")
    cfg = write_config(tmp_path, database_url, projects)

    started = time.monotonic()
    result = subprocess.run(
        [*CLI, "--config", str(cfg), "run", "--once"],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=60,  # a hang fails the test instead of the suite
    )
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started < 30
    assert "caught up" in result.stderr and "Traceback" not in result.stderr
    assert "transcript outside the projects root; not read" in result.stderr
    assert sorted(t["text"] for t in db.turns(session)) == ["main", "sub"]
    db.assert_accounted(main, agent)
    reasons = {Path(r[0]).name: r[4] for r in db.rejected()}
    assert set(reasons) == {"self.jsonl", "ping.jsonl", "pong.jsonl", "loop.jsonl"}
    assert all(r.startswith("outside_tree:") for r in reasons.values())  # symlinks: never opened


@pytest.mark.parametrize("mode", ["all", "registered"])
def test_fifo_and_device_named_jsonl_do_not_block(
    mode: str, tmp_path: Path, projects: Path, database_url: str, db: Db, live: Any
) -> None:
    session = new_session()
    folder = projects / "-p"
    real = write(folder / f"{session}.jsonl", turn(session, "one"))
    os.mkfifo(folder / "x.jsonl")
    (folder / "zero.jsonl").symlink_to("/dev/zero")  # endless bytes, no newline ever
    cfg = write_config(tmp_path, database_url, projects, mode=mode)
    if mode == "registered":
        assert cli_main(["--config", str(cfg), "register", session, "--project-path", "/p",
                         "--working-directory", "/p"]) == 0  # fmt: skip

    service = live(cfg)
    wait_for(lambda: db.turns(session), "the regular file")
    write(real, turn(session, "two"))  # still flowing after meeting the FIFO
    wait_for(lambda: len(db.turns(session)) == 2, "appends after the FIFO")
    assert service.alive()
    db.assert_accounted(real)
    if mode == "all":
        wait_for(lambda: len(db.rejected()) == 2, "both non-regular files recorded")
        reasons = {Path(r[0]).name: r[4] for r in db.rejected()}
        assert set(reasons) == {"x.jsonl", "zero.jsonl"}
        assert "not a regular file" in reasons["x.jsonl"]
        assert reasons["zero.jsonl"].startswith("outside_tree:")  # a symlink: never opened
        assert "cannot read transcript" in service.output
    assert service.stop() == 0


# ------------------------------------------------------------------------- configuration

BASE_CONFIG = "database:\n  url: postgresql+psycopg://u@127.0.0.1:1/db\n"
CONFIG_ERRORS = {
    "unknown_key": (
        "file_watcher:\n  projects_pth: /tmp\n",
        ["'file_watcher.projects_pth' is unknown", "expected one of", "projects_path"],
    ),
    "unknown_section": ("databse:\n  url: null\n", ["'databse' is unknown", "database"]),
    "wrong_type": (
        "event_system:\n  write_retry_attempts: three\n",
        ["'event_system.write_retry_attempts'", "expected an integer from 0 to 20", "'three'"],
    ),
    "bool_for_int": (
        "file_watcher:\n  batch_max_lines: true\n",
        ["'file_watcher.batch_max_lines'", "expected an integer from 1 to 1000000"],
    ),
    "section_not_mapping": (
        "event_system: 5\n",
        ["'event_system'", "expected a mapping", "got 5"],
    ),
    "out_of_range": (
        "file_watcher:\n  max_line_bytes: 10\n",
        ["'file_watcher.max_line_bytes'", "expected an integer from 1024 to", "got 10"],
    ),
    "bad_enum": (
        "file_watcher:\n  mode: sometimes\n",
        ["'file_watcher.mode'", "expected one of: all, registered", "'sometimes'"],
    ),
    "bad_log_level": ("logging:\n  level: LOUD\n", ["'logging.level'", "INFO", "'LOUD'"]),
    "bad_url_scheme": (
        f"database:\n  url: mysql://u:{SECRET}@h/db\n",
        ["'database.url'", "expected a postgresql URL", "mysql://u:***@h/db"],
    ),
    "unparseable_url": (
        "database:\n  url: 'not a url'\n",
        ["'database.url'", "expected a SQLAlchemy URL"],
    ),
    "invalid_yaml": (
        "file_watcher:\n  mode: [all\n",
        ["is not valid YAML", "line 4, column 9"],
    ),
    "not_a_mapping": ("- a\n- b\n", ["expected a mapping at top level"]),
}


def _config_case(case: str, tmp_path: Path) -> tuple[Path, list[str]]:
    body, expected = CONFIG_ERRORS[case]
    path = tmp_path / "config.yaml"
    path.write_text(body if body.startswith(("database", "databse", "- ")) else BASE_CONFIG + body)
    return path, expected


@pytest.mark.parametrize("command", ["check-config", "run", "run --once"])
@pytest.mark.parametrize("case", sorted(CONFIG_ERRORS))
def test_config_error_exits_2_naming_key_and_expectation(
    case: str, command: str, tmp_path: Path, capsys: Any
) -> None:
    path, expected = _config_case(case, tmp_path)

    code = cli_main(["--config", str(path), *command.split()])

    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("headspace-watcher: ")
    assert err.count("\n") == 1 or case == "invalid_yaml", err  # YAML adds its snippet
    for fragment in expected:
        assert fragment in err, (fragment, err)
    assert SECRET not in err


def test_config_error_from_the_environment_and_missing_file(tmp_path: Path) -> None:
    """The real process: exit 2 and one clear line, for a bad env override and a missing file."""
    env = child_env(tmp_path / "nope.yaml")
    result = subprocess.run([*CLI, "run"], capture_output=True, text=True, env=env, timeout=30)
    assert result.returncode == 2
    assert f"config file {tmp_path / 'nope.yaml'} does not exist" in result.stderr
    assert "HEADSPACE_CONFIG" in result.stderr

    (tmp_path / "ok.yaml").write_text("")
    env = child_env(tmp_path / "ok.yaml")
    env["HEADSPACE_DATABASE_URL"] = f"sqlite://u:{SECRET}@/x"
    for command in (["check-config"], ["run", "--once"]):
        result = subprocess.run(
            [*CLI, *command], capture_output=True, text=True, env=env, timeout=30
        )
        assert result.returncode == 2, result
        assert "'database.url': expected a postgresql URL" in result.stderr
        assert SECRET not in result.stdout + result.stderr


# ------------------------------------------------------------------- wrong database password


@pytest.fixture(scope="module")
def password_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A server with password (scram-sha-256) auth: the session cluster trusts everyone."""
    from headspace_watcher.store.embedded import PgCluster, PgServerError

    base = tmp_path_factory.mktemp("pwcluster")
    for parent in (base, *base.parents):  # the server may run as another user
        if parent == Path("/tmp") or parent == Path("/"):
            break
        os.chmod(parent, 0o755)
    cluster = PgCluster(base / "c", password="superuser-pw")
    try:
        cluster.start()
    except PgServerError as exc:
        pytest.skip(f"cannot start a password-protected PostgreSQL: {exc}")
    with cluster.connect() as conn:
        conn.execute("CREATE ROLE hsw_app LOGIN PASSWORD 'the-right-one'")
        conn.execute("CREATE DATABASE hsw OWNER hsw_app")
    try:
        yield cluster
    finally:
        cluster.destroy()


def _wrong_password_url(cluster: Any) -> str:
    return f"postgresql+psycopg://hsw_app:{SECRET}@127.0.0.1:{cluster.port}/hsw"


def _auth_failures(cluster: Any) -> int:
    """Connection attempts the server refused (its own log: one FATAL line each)."""
    text = Path(cluster.log_file).read_text(errors="replace")
    return text.count('password authentication failed for user "hsw_app"')


def test_wrong_password_run_once_fails_clearly(
    password_cluster: Any, tmp_path: Path, projects: Path
) -> None:
    session = new_session()
    write(projects / "-p" / f"{session}.jsonl", turn(session))
    cfg = write_config(tmp_path, _wrong_password_url(password_cluster), projects)

    result = subprocess.run(
        [*CLI, "--config", str(cfg), "run", "--once"],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=60,
    )

    assert result.returncode == 1
    assert "password authentication failed" in result.stderr
    assert "database unreachable; --once cannot finish" in result.stderr
    assert "hsw_app:***@" in result.stderr  # the URL is shown, masked
    leaked = [result.stdout, result.stderr] + [
        p.read_text() for p in (tmp_path / "state").rglob("*") if p.is_file()
    ]
    assert not any(SECRET in s for s in leaked)


def test_wrong_password_live_service_stays_up_degraded(
    password_cluster: Any, tmp_path: Path, projects: Path, live: Any, capsys: Any
) -> None:
    session = new_session()
    write(projects / "-p" / f"{session}.jsonl", turn(session))
    cfg = write_config(tmp_path, _wrong_password_url(password_cluster), projects)

    service = live(cfg)
    status_file = tmp_path / "state" / "status.json"
    wait_for(status_file.exists, "status.json")
    wait_for(lambda: "password authentication failed" in service.output, "the auth error")
    seen = _auth_failures(password_cluster)
    wait_for(
        lambda: _auth_failures(password_cluster) >= seen + 2,
        "two more retry rounds refused by the server",
        details=lambda: service.output,
    )
    status = subprocess.run(
        [*CLI, "--config", str(cfg), "status", "--json"],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=60,
    )
    report = json.loads(status.stdout)
    capsys.readouterr()
    check_code = cli_main(["--config", str(cfg), "check-config"])
    check = capsys.readouterr()

    assert service.alive()
    assert status.returncode == 1
    assert report["state"] == "degraded" and report["database_reachable"] is False
    assert report["pid"] == service.proc.pid
    assert "password authentication failed" in (report.get("last_error") or "")
    assert "database unavailable; holding position and retrying" in service.output
    assert check_code == 0 and "hsw_app:***@" in check.out
    assert service.stop() == 0
    everything = [service.output, status.stdout, status.stderr, check.out, check.err] + [
        p.read_text(errors="replace") for p in (tmp_path / "state").rglob("*") if p.is_file()
    ]
    assert not any(SECRET in s for s in everything)
