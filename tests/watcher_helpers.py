"""Helpers for the tailer, service, session and CLI tests.

Transcript lines shaped like Claude Code's, polling with deadlines (never sleeps as
synchronisation), a per-test watcher set-up (config file, projects tree, state dir) that runs
the service in-process (``run_once``) or as the real console script (``start``/``cli``).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import yaml
from sqlalchemy import Engine, text

from headspace_watcher.config import Config, load_config

REPO_ROOT = Path(__file__).resolve().parents[1]
CONSOLE_SCRIPT = REPO_ROOT / ".venv" / "bin" / "headspace-watcher"
POLL_S = 0.02
T = TypeVar("T")

# Lines default to "a few minutes ago", so a session is not already past the (default,
# 90 min) inactivity timeout; tests that care about time pass their own ``at``.
BASE_TIME = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=5)


# --------------------------------------------------------------------------- polling


def wait_for(
    predicate: Callable[[], T],
    what: str,
    *,
    timeout: float = 15.0,
    details: Callable[[], str] | None = None,
) -> T:
    """Poll ``predicate`` every 20 ms until it returns a truthy value (returned)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            extra = f"\n{details()}" if details else ""
            raise AssertionError(f"timed out after {timeout}s waiting for {what}{extra}")
        time.sleep(POLL_S)  # poll interval, bounded by the deadline


# --------------------------------------------------------------------------- lines


def new_uuid() -> str:
    return str(uuid.uuid4())


def iso(at: datetime) -> str:
    return at.astimezone(UTC).isoformat().replace("+00:00", "Z")


def line(obj: Any) -> bytes:
    return (json.dumps(obj, ensure_ascii=False) + "\n").encode()


def message_line(
    kind: str,
    session: str,
    content: Any,
    *,
    at: datetime = BASE_TIME,
    msg_uuid: str | None = None,
    cwd: str = "/home/dev/src/demo",
    **extra: Any,
) -> bytes:
    """A ``user`` or ``assistant`` line; ``content`` is a string or a list of blocks."""
    message: dict[str, Any] = {"role": "user" if kind == "user" else "assistant"}
    message["content"] = content
    obj = {
        "type": kind,
        "sessionId": session,
        "uuid": msg_uuid or new_uuid(),
        "parentUuid": None,
        "timestamp": iso(at),
        "cwd": cwd,
        "version": "2.1.29",
        "gitBranch": "main",
        "isSidechain": False,
        "message": message,
    }
    obj.update(extra)
    return line(obj)


def user(session: str, text_value: str, **kw: Any) -> bytes:
    return message_line("user", session, text_value, **kw)


def assistant(session: str, text_value: str, **kw: Any) -> bytes:
    return message_line("assistant", session, [{"type": "text", "text": text_value}], **kw)


def other(session: str, kind: str = "progress", *, at: datetime = BASE_TIME) -> bytes:
    return line({"type": kind, "sessionId": session, "timestamp": iso(at), "data": {"n": 1}})


def append(path: Path, *chunks: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab") as f:
        for chunk in chunks:
            f.write(chunk)


def conversation(session: str, n: int, *, start: datetime = BASE_TIME, **kw: Any) -> list[bytes]:
    """``n`` alternating user/assistant turns, one second apart."""
    return [
        (user if i % 2 == 0 else assistant)(
            session, f"turn {i} of {session[:8]}", at=start + timedelta(seconds=i), **kw
        )
        for i in range(n)
    ]


# --------------------------------------------------------------------------- database


def scalar(engine: Engine, sql: str, **params: Any) -> Any:
    with engine.connect() as conn:
        return conn.execute(text(sql), params).scalar()


def rows(engine: Engine, sql: str, **params: Any) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(text(sql), params).all())


def count(engine: Engine, event_type: str | None = None) -> int:
    if event_type is None:
        return int(scalar(engine, "SELECT count(*) FROM events"))
    return int(scalar(engine, "SELECT count(*) FROM events WHERE event_type = :t", t=event_type))


def table_counts(engine: Engine) -> dict[str, int]:
    tables = ("events", "rejected_events", "sources", "sessions", "projects", "agents")
    return {t: int(scalar(engine, f"SELECT count(*) FROM {t}")) for t in tables}


def turn_texts(engine: Engine, session: str | None = None) -> list[str]:
    sql = "SELECT payload->>'text' FROM events WHERE event_type = 'turn_detected'"
    if session is not None:
        sql += " AND payload->>'session_uuid' = :s"
    sql += " ORDER BY source_id, source_generation, source_offset"
    return [r[0] for r in rows(engine, sql, s=session)]


def source_row(engine: Engine, path: Path) -> Any:
    found = rows(engine, "SELECT * FROM sources WHERE path = :p", p=str(path))
    return found[0] if found else None


def session_events(engine: Engine, session: str, event_type: str) -> list[dict[str, Any]]:
    return [
        r[0]
        for r in rows(
            engine,
            "SELECT payload FROM events WHERE event_type = :t AND payload->>'session_uuid' = :s "
            "ORDER BY id",
            t=event_type,
            s=session,
        )
    ]


# --------------------------------------------------------------------------- secrets

WATCHER_TEST_PASSWORD = "Pw-9f3kLq-not-for-logs"
WATCHER_TEST_ROLE = "headspace_pw_user"


def create_password_role(server: Any, dbname: str) -> str:
    """A login role with a password on ``server`` (created once); the URL of ``dbname`` as it."""
    from sqlalchemy.engine import make_url

    with server.connect("postgres") as conn:
        exists = conn.execute(
            "SELECT 1 FROM pg_roles WHERE rolname = %s", (WATCHER_TEST_ROLE,)
        ).fetchone()
        if not exists:
            conn.execute(
                f"CREATE ROLE {WATCHER_TEST_ROLE} LOGIN SUPERUSER "
                f"PASSWORD '{WATCHER_TEST_PASSWORD}'"
            )
    url = make_url(server.url(dbname)).set(
        username=WATCHER_TEST_ROLE, password=WATCHER_TEST_PASSWORD
    )
    return url.render_as_string(hide_password=False)


# --------------------------------------------------------------------------- the watcher

TEST_CONFIG: dict[str, Any] = {
    "database": {"connect_timeout_seconds": 2},
    "file_watcher": {
        "mode": "all",
        "inactivity_timeout": 5400,
        "max_line_bytes": 256 * 1024,
        "read_chunk_bytes": 4096,
        "batch_max_lines": 500,
        "batch_max_bytes": 1024 * 1024,
    },
    "event_system": {
        "write_retry_attempts": 1,
        "write_retry_delay_ms": 20,
        "max_restarts_per_minute": 5,
        "shutdown_timeout_seconds": 2,
    },
    "health": {"heartbeat_interval_seconds": 1},
    "logging": {"level": "INFO"},
}


def _merged(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def run_service_once(config: Config, clock: Callable[[], datetime] | None = None) -> Any:
    """``Service(config).run(once=True)`` in this process; returns the service (``.exit_code``).

    The service installs signal handlers and a wakeup fd for its own process; they are put
    back afterwards so pytest keeps its own.
    """
    from headspace_watcher.service.loop import Service

    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGALRM)}
    old_fd = signal.set_wakeup_fd(-1)
    service = Service(config) if clock is None else Service(config, clock=clock)
    try:
        service.exit_code = service.run(once=True)
    finally:
        signal.set_wakeup_fd(old_fd)
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    return service


@dataclass
class WatcherProcess:
    """A real ``headspace-watcher run`` subprocess."""

    popen: subprocess.Popen[bytes]
    log_path: Path
    state_dir: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-6000:]
        except OSError:
            return ""

    def status_file(self) -> dict[str, Any] | None:
        try:
            return json.loads((self.state_dir / "status.json").read_text())
        except (OSError, ValueError):
            return None

    def wait_ready(self, timeout: float = 20.0) -> dict[str, Any]:
        """Until the service reports healthy (watches set up, database connected)."""

        def ready() -> dict[str, Any] | None:
            if self.popen.poll() is not None:
                raise AssertionError(f"watcher exited with {self.popen.returncode}:\n{self.log()}")
            st = self.status_file()
            if st and st.get("pid") == self.pid and st.get("state") == "healthy":
                return st
            return None

        return wait_for(ready, "the watcher to report healthy", timeout=timeout, details=self.log)

    def stop(self, timeout: float = 15.0) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired as exc:
                self.popen.kill()
                self.popen.wait(timeout=10)
                raise AssertionError(
                    f"watcher ignored SIGTERM for {timeout}s:\n{self.log()}"
                ) from exc
        return self.popen.returncode


@dataclass
class WatcherEnv:
    """One test's watcher set-up: config file, projects tree, state dir, database URL."""

    tmp: Path
    database_url: str
    root: Path
    state_dir: Path
    config_path: Path
    overrides: dict[str, Any] = field(default_factory=dict)
    processes: list[WatcherProcess] = field(default_factory=list)

    @classmethod
    def create(cls, tmp: Path, database_url: str) -> WatcherEnv:
        tmp = tmp.resolve()
        env = cls(
            tmp=tmp,
            database_url=database_url,
            root=tmp / "projects",
            state_dir=tmp / "state",
            config_path=tmp / "config.yaml",
        )
        env.root.mkdir()
        env.configure()
        return env

    def configure(self, **sections: dict[str, Any]) -> None:
        """(Re)write the config file: the test defaults plus these section overrides."""
        for key, value in sections.items():
            self.overrides[key] = {**self.overrides.get(key, {}), **value}
        self.config_path.write_text(yaml.safe_dump(_merged(TEST_CONFIG, self.overrides)))

    @property
    def max_line_bytes(self) -> int:
        return self.config().file_watcher.max_line_bytes

    def env_vars(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("HEADSPACE_")}
        env.update(
            HEADSPACE_CONFIG=str(self.config_path),
            HEADSPACE_DATABASE_URL=self.database_url,
            HEADSPACE_PROJECTS_PATH=str(self.root),
            HEADSPACE_STATE_DIR=str(self.state_dir),
        )
        env.update(extra)
        return env

    def config(self, **extra: str) -> Config:
        return load_config(self.config_path, env=self.env_vars(**extra))

    def run_once(self, clock: Callable[[], datetime] | None = None, **extra: str) -> Any:
        service = run_service_once(self.config(**extra), clock)
        assert service.exit_code == 0, f"run --once exited {service.exit_code}"
        return service

    def status_file(self) -> dict[str, Any]:
        """``status.json`` as the last run left it (the contract's counters)."""
        return json.loads((self.state_dir / "status.json").read_text())

    @staticmethod
    def command() -> list[str]:
        if CONSOLE_SCRIPT.exists():
            return [str(CONSOLE_SCRIPT)]
        return [sys.executable, "-m", "headspace_watcher.cli"]

    def cli(
        self, *args: str, timeout: float = 60.0, **extra: str
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.command(), *args],
            env=self.env_vars(**extra),
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.tmp,
            check=False,
        )

    def start(self, *, ready: bool = True, **extra: str) -> WatcherProcess:
        log_path = self.tmp / f"watcher-{len(self.processes)}.log"
        with open(log_path, "wb") as log:
            popen = subprocess.Popen(
                [*self.command(), "run"],
                env=self.env_vars(**extra),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.tmp,
            )
        proc = WatcherProcess(popen, log_path, self.state_dir)
        self.processes.append(proc)
        if ready:
            proc.wait_ready()
        return proc

    def close(self) -> None:
        for proc in self.processes:
            with contextlib.suppress(Exception):
                proc.stop(timeout=10)
            if proc.popen.poll() is None:
                proc.popen.kill()
                proc.popen.wait(timeout=10)


def project_dir(root: Path, name: str = "-home-dev-src-demo") -> Path:
    path = root / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def lines_of(chunks: Iterable[bytes]) -> bytes:
    return b"".join(chunks)
