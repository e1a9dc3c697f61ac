"""Issue 9, section 1: another local user squats the embedded port to harvest the password.

Real processes throughout: ``headspace-watcher setup``, ``python -m headspace_watcher.store.embedded
serve`` and ``headspace-watcher run --once`` as subprocesses, the embedded PostgreSQL from the
wheel, and a fake server — a plain TCP listener that records every byte and answers the
PostgreSQL start-up with a request for the password in cleartext, as the squatter did.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from pg_servers import ExternalServer
from sqlalchemy import text
from sqlalchemy.engine import make_url
from watcher_helpers import append, conversation, new_uuid, wait_for

from headspace_watcher import circus_hooks
from headspace_watcher.store import embedded as pgserver
from headspace_watcher.store.engine import auth_requirements, make_engine
from headspace_watcher.store.migrate import init_db

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
_SSL_REQUEST, _GSSENC_REQUEST = 80877103, 80877104
_AUTH_CLEARTEXT = b"R" + struct.pack("!II", 8, 3)


class FakePostgres:
    """A squatter on 127.0.0.1:``port``: refuses TLS/GSS, then asks for a cleartext password
    and records whatever the client sends."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.received = bytearray()
        self.connections = 0
        self._lock = threading.Lock()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", port))
        self._sock.listen(16)
        self._sock.settimeout(0.2)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._thread.start()

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.connections += 1
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _recv(self, conn: socket.socket, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = conn.recv(n - len(data))
            if not chunk:
                raise ConnectionError("client went away")
            with self._lock:
                self.received += chunk
            data += chunk
        return data

    def _handle(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        with conn:
            try:
                while True:  # SSLRequest / GSSENCRequest, then the StartupMessage
                    length, code = struct.unpack("!II", self._recv(conn, 8))
                    self._recv(conn, length - 8)
                    if code not in (_SSL_REQUEST, _GSSENC_REQUEST):
                        break
                    conn.sendall(b"N")
                conn.sendall(_AUTH_CLEARTEXT)
                while chunk := conn.recv(65536):  # a PasswordMessage, if the client obeys
                    with self._lock:
                        self.received += chunk
            except (OSError, ConnectionError, struct.error):
                return

    def close(self) -> None:
        self._closed.set()
        self._sock.close()
        self._thread.join(timeout=5)


@pytest.fixture
def root() -> Iterator[Path]:
    """World-traversable (as root, PostgreSQL runs as an unprivileged user)."""
    path = Path(tempfile.mkdtemp(prefix="headspace-sec-", dir="/tmp"))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def squatter() -> Iterator[FakePostgres]:
    fake = FakePostgres(pgserver.free_port())
    try:
        yield fake
    finally:
        fake.close()


def _env(root: Path, port: int, *, tcp: bool = False) -> dict[str, str]:
    config = root / "config.yaml"
    config.write_text(
        f"database:\n  url: null\n  embedded_port: {port}\n  embedded_tcp: {str(tcp).lower()}\n"
        "  connect_timeout_seconds: 2\n"
        "event_system:\n  write_retry_attempts: 1\n  write_retry_delay_ms: 20\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HEADSPACE_", "PG"))}
    env.update(
        HEADSPACE_CONFIG=str(config),
        HEADSPACE_STATE_DIR=str(root / "var"),
        HEADSPACE_PROJECTS_PATH=str(root / "projects"),
    )
    return env


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(VENV_BIN / "headspace-watcher"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def _serve(env: dict[str, str], port: int, *extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "headspace_watcher.store.embedded", "serve",
         "--state-dir", env["HEADSPACE_STATE_DIR"], "--port", str(port), *extra],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _service_conninfo(state: Path, port: int) -> str:
    url = pgserver.embedded_url(state, port)
    return pgserver._libpq_conninfo(url) + "&require_auth=scram-sha-256"


def _wait_served(state: Path, port: int, proc: subprocess.Popen[bytes]) -> None:
    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"serve exited: {proc.stdout and proc.stdout.read()!r}")
        try:
            psycopg.connect(_service_conninfo(state, port), connect_timeout=2).close()
        except (pgserver.PgServerError, psycopg.OperationalError):
            return False
        return True

    wait_for(ready, "the served embedded PostgreSQL", timeout=60)


def _transcript(root: Path, turns: int) -> None:
    session = new_uuid()
    append(root / "projects" / "-home-u-proj" / f"{session}.jsonl", *conversation(session, turns))


def _secrets(state: Path) -> list[bytes]:
    return [
        pgserver.read_password(state).encode(),
        pgserver.read_service_password(state).encode(),
    ]


# --------------------------------------------------------------------------------------------
# The squatted port
# --------------------------------------------------------------------------------------------


def test_squatted_embedded_port_gets_nothing_and_ingest_goes_over_the_socket(
    root: Path, squatter: FakePostgres
) -> None:
    port = squatter.port  # taken BEFORE the embedded server and the service start
    env = _env(root, port)
    _transcript(root, 5)
    setup = _cli(env, "setup")
    assert setup.returncode == 0, setup.stderr
    state = root / "var"
    server = _serve(env, port)
    try:
        _wait_served(state, port, server)
        once = _cli(env, "run", "--once")
        assert once.returncode == 0, once.stderr
        with psycopg.connect(_service_conninfo(state, port)) as conn:
            turns = conn.execute(
                "SELECT count(*) FROM events WHERE event_type = 'turn_detected'"
            ).fetchone()
            assert turns == (5,)
            assert conn.execute("SHOW listen_addresses").fetchone() == ("",)
    finally:
        _stop(server)
    assert squatter.connections == 0, "the embedded server is reached over its socket only"
    for secret in _secrets(state):
        assert secret not in squatter.received


def test_tcp_opt_in_on_a_squatted_port_is_a_clear_start_up_error(
    root: Path, squatter: FakePostgres
) -> None:
    port = squatter.port
    env = _env(root, port, tcp=True)
    _transcript(root, 2)
    setup = _cli(env, "setup")
    assert setup.returncode == 0, setup.stderr
    server = _serve(env, port, "--tcp")
    output, _ = server.communicate(timeout=120)
    assert server.returncode == 1, output
    message = output.decode(errors="replace")
    assert f"127.0.0.1:{port} is already in use" in message
    assert "database.embedded_port" in message

    once = _cli(env, "run", "--once")  # the service says why it cannot start
    assert once.returncode != 0
    assert "embedded PostgreSQL is not running" in once.stderr
    assert f"127.0.0.1:{port} is already in use" in once.stderr
    state = root / "var"
    for secret in _secrets(state):
        assert secret not in squatter.received
        assert secret.decode() not in message + once.stderr


def test_circus_hook_refuses_a_squatted_tcp_port_and_leaves_postgres_stopped(
    root: Path, squatter: FakePostgres, caplog: pytest.LogCaptureFixture
) -> None:
    env = _env(root, squatter.port, tcp=True)

    class Watcher:  # what circus hands the hook: name, env, args
        name = "postgres"
        args = "-m headspace_watcher.store.embedded serve"

    Watcher.env = env  # type: ignore[attr-defined]
    with caplog.at_level(logging.ERROR, logger="headspace_watcher.circus"):
        assert circus_hooks.before_start_postgres(Watcher(), None, "before_start") is False
    assert f"127.0.0.1:{squatter.port} is already in use" in caplog.text
    assert "database.embedded_port" in caplog.text
    assert squatter.connections == 0


# --------------------------------------------------------------------------------------------
# The client refuses to hand its password to a server that did not prove it knows it
# --------------------------------------------------------------------------------------------


def test_password_is_never_sent_to_a_server_asking_for_cleartext(squatter: FakePostgres) -> None:
    password = "harvest-me-" + os.urandom(6).hex()
    url = f"postgresql+psycopg://headspace:{password}@127.0.0.1:{squatter.port}/headspace"
    engine = make_engine(url, connect_timeout=5)
    try:
        with pytest.raises(Exception) as caught:
            engine.connect().close()
    finally:
        engine.dispose()
    message = str(caught.value)
    assert 'authentication method requirement "scram-sha-256" failed' in message
    assert "cleartext" in message
    with pytest.raises(psycopg.OperationalError, match="cleartext"):
        ExternalServer(url).connect(connect_timeout=5)
    assert squatter.connections >= 2
    assert password.encode() not in squatter.received


def test_auth_requirements_follow_the_url() -> None:
    assert auth_requirements("postgresql+psycopg://u@h/db") == {}  # no password: none to leak
    assert auth_requirements("postgresql+psycopg://u:p@h/db") == {"require_auth": "scram-sha-256"}
    assert auth_requirements("postgresql+psycopg://u:p@h/db?sslmode=verify-full") == {
        "require_auth": "scram-sha-256",
        "channel_binding": "require",
    }
    assert auth_requirements("postgresql+psycopg://u:p@h/db?require_auth=md5") == {}


# --------------------------------------------------------------------------------------------
# The service's role
# --------------------------------------------------------------------------------------------


def test_service_role_is_no_superuser_and_cannot_run_programs_or_create_roles(
    root: Path,
) -> None:
    env = _env(root, pgserver.free_port())
    setup = _cli(env, "setup")
    assert setup.returncode == 0, setup.stderr
    state = root / "var"
    with (
        pgserver.embedded_running(state, pgserver.EMBEDDED_DATABASE) as url,
        psycopg.connect(pgserver._libpq_conninfo(url), autocommit=True) as conn,
    ):
        assert make_url(url).username == pgserver.SERVICE_ROLE
        row = conn.execute(
            "SELECT rolsuper, rolcreaterole, rolcreatedb FROM pg_roles WHERE rolname = current_user"
        ).fetchone()
        assert row == (False, False, False)
        owners = conn.execute(
            "SELECT DISTINCT tableowner FROM pg_tables WHERE schemaname = 'public'"
        ).fetchall()
        assert owners == [(pgserver.SERVICE_ROLE,)]
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("COPY (SELECT 1) TO PROGRAM 'id'")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("CREATE ROLE intruder LOGIN SUPERUSER")
        conn.execute("INSERT INTO projects (path, name) VALUES ('/p', 'p')")  # ingest's needs


def test_setup_upgrades_a_cluster_with_superuser_owned_tables_keeping_rows(root: Path) -> None:
    """A cluster as the previous version left it: tables created by the superuser."""
    port = pgserver.free_port()
    env = _env(root, port)
    state = root / "var"
    password, _ = pgserver._ensure_password(pgserver._password_path(state))
    data_dir = state / "pgdata"
    old = pgserver.PgCluster(root / "old", password=password, data_dir=data_dir)
    with old:
        old.create_database(pgserver.EMBEDDED_DATABASE)
        engine = make_engine(old.url(pgserver.EMBEDDED_DATABASE))
        try:
            init_db(engine)
            with engine.begin() as conn:
                conn.execute(text("INSERT INTO projects (path, name) VALUES ('/old', 'old')"))
        finally:
            engine.dispose()
    marker = state / "pg" / "database-created"
    marker.write_text(pgserver._cluster_identity(data_dir.resolve()) + "\n")  # the old marker

    _transcript(root, 3)
    setup = _cli(env, "setup")
    assert setup.returncode == 0, setup.stderr
    server = _serve(env, port)
    try:
        _wait_served(state, port, server)
        once = _cli(env, "run", "--once")
        assert once.returncode == 0, once.stderr
        with psycopg.connect(_service_conninfo(state, port)) as conn:
            assert conn.execute("SELECT name FROM projects WHERE path = '/old'").fetchone() == (
                "old",
            )
            assert conn.execute(
                "SELECT count(*) FROM events WHERE event_type = 'turn_detected'"
            ).fetchone() == (3,)
            owners = conn.execute(
                "SELECT DISTINCT tableowner FROM pg_tables WHERE schemaname = 'public'"
            ).fetchall()
            assert owners == [(pgserver.SERVICE_ROLE,)]
    finally:
        _stop(server)


# --------------------------------------------------------------------------------------------
# The socket directory
# --------------------------------------------------------------------------------------------


def test_long_state_dir_gets_a_private_socket_dir_and_refuses_a_foreign_one(
    root: Path,
) -> None:
    state = root / ("x" * 90) / "var"
    socket_dir = pgserver.embedded_socket_dir(state, 54329)
    assert socket_dir.parent == Path("/tmp") and socket_dir.name.startswith("headspace-pg-")
    assert socket_dir == pgserver.embedded_socket_dir(state, 54329), "same state dir, same dir"
    try:
        pgserver.ensure_socket_dir(socket_dir, None)
        st = socket_dir.lstat()
        assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.geteuid()
        os.chmod(socket_dir, 0o777)  # e.g. loosened by hand: ours, so tightened again
        pgserver.ensure_socket_dir(socket_dir, None)
        assert stat.S_IMODE(socket_dir.lstat().st_mode) == 0o700
        socket_dir.rmdir()

        socket_dir.symlink_to(root)  # planted in advance by someone else
        with pytest.raises(pgserver.PgServerError, match="not a directory"):
            pgserver.ensure_socket_dir(socket_dir, None)
        socket_dir.unlink()
        if os.geteuid() == 0:
            socket_dir.mkdir(mode=0o700)
            os.chown(socket_dir, 12345, 12345)  # made by another user
            with pytest.raises(pgserver.PgServerError, match="someone else created it"):
                pgserver.ensure_socket_dir(socket_dir, None)
            with pytest.raises(pgserver.PgServerError, match="someone else created it"):
                pgserver.verify_socket_dir(socket_dir, None)
    finally:
        if socket_dir.is_symlink():
            socket_dir.unlink()
        elif socket_dir.exists():
            socket_dir.rmdir()


def test_embedded_tcp_must_be_a_boolean(root: Path) -> None:
    from headspace_watcher.config import ConfigError, load_config

    config = root / "config.yaml"
    config.write_text("database:\n  embedded_tcp: 'yes'\n")
    with pytest.raises(ConfigError, match=r"'database\.embedded_tcp': expected true or false"):
        load_config(config, env={})
    config.write_text("database:\n  embedded_tcp: true\n")
    assert load_config(config, env={}).database.embedded_tcp is True
