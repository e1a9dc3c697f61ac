"""circus.ini under real circusd: crash-loop protection, owner-only control sockets, the
embedded PostgreSQL skipped for an external database, stop order.

Each circusd runs in its own temporary directory with a copy of the project's circus.ini in
which only the two commands are replaced by small shell scripts (every other setting, hook
and stream is the real one).  Scripts append a line per start to a file, so the tests count
spawns; every wait polls with a deadline.
"""

from __future__ import annotations

import configparser
import contextlib
import itertools
import os
import re
import select
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from circus.client import CircusClient
from watcher_helpers import wait_for

from headspace_watcher import circus_hooks

REPO = Path(__file__).resolve().parents[1]
CIRCUS_INI = REPO / "circus.ini"
BIN = Path(sys.executable).parent
CIRCUSD = BIN / "circusd"
CIRCUSCTL = BIN / "circusctl"
SERVICE = "headspace-watcher"
POSTGRES = "postgres"
MAX_RESTARTS = 5  # event_system.max_restarts_per_minute in the test config
STATE_DIR_VAR = "$(circus.env.HEADSPACE_STATE_DIR)"  # circus.ini's paths follow the state dir

CRASHING_SERVICE = """#!/bin/sh
echo "start $(date +%s.%N) $$" >> "{log}"
exit 1
"""
# On SIGTERM: takes 0.5 s to shut down, then records when it exited.
STABLE_SERVICE = """#!/bin/sh
echo "start $(date +%s.%N) $$" >> "{log}"
trap 'sleep 0.5; echo "exit $(date +%s.%N)" >> "{log}"; exit 0' TERM
while :; do sleep 0.05; done
"""
# Takes longer to stop than circus's check_delay (1 s) tick, by construction.
SLOW_STOP_SERVICE = STABLE_SERVICE.replace("sleep 0.5;", "sleep 1.5;")
FAKE_POSTGRES = """#!/bin/sh
echo "start $(date +%s.%N) $*" >> "{log}"
trap 'echo "int $(date +%s.%N)" >> "{log}"; exit 0' INT
while :; do sleep 0.05; done
"""
EXTERNAL_URL = "postgresql+psycopg://someone:s3cret-pw@127.0.0.1:5999/elsewhere"


class Circus:
    """One circusd in ``root`` running the test copy of circus.ini."""

    def __init__(
        self,
        root: Path,
        service_script: str,
        env_extra: dict[str, str],
        state_dir: Path | None = None,
    ) -> None:
        self.root = root
        self.var = state_dir or root / "var"
        self.endpoint = f"ipc://{self.var / 'circus' / 'endpoint'}"
        self.log_path = root / "circusd.log"
        self.service_log = root / "service.starts"
        self.postgres_log = root / "postgres.starts"
        service = root / "service.sh"
        service.write_text(service_script.format(log=self.service_log))
        postgres = root / "postgres.sh"
        postgres.write_text(FAKE_POSTGRES.format(log=self.postgres_log))
        for script in (service, postgres):
            script.chmod(0o755)
        config = root / "config.yaml"
        config.write_text(
            "database:\n  url: null\n"
            f"event_system:\n  max_restarts_per_minute: {MAX_RESTARTS}\n"
            "  shutdown_timeout_seconds: 2\n"
        )
        self.ini = write_test_ini(root / "circus.ini", service=service, postgres=postgres)
        self.check_delay = float(read_ini()["circus"]["check_delay"])
        env = {k: v for k, v in os.environ.items() if not k.startswith("HEADSPACE_")}
        env.update(
            HEADSPACE_CONFIG=str(config),
            HEADSPACE_STATE_DIR=str(self.var),
            PWD=str(root),
            **env_extra,
        )
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [str(CIRCUSD), "circus.ini"],
            cwd=root,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.client: CircusClient | None = None

    # -- control ---------------------------------------------------------------------------

    def call(self, command: str, **props: Any) -> dict[str, Any]:
        if self.client is None:
            self.client = CircusClient(endpoint=self.endpoint, timeout=5)
        return self.client.send_message(command, **props)

    def wait_ready(self) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"circusd exited {self.proc.returncode}:\n{self.log()}")
            if not (self.var / "circus" / "endpoint").exists():
                return False
            # Watchers start in priority order: once the service ran, postgres's start
            # (and its hook) is over.
            return self.call("status")["status"] == "ok" and self.service_starts()

        wait_for(ready, "circusd to answer on its control socket", timeout=30)

    def status(self, name: str) -> str:
        return self.call("status", name=name)["status"]

    def circusctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(CIRCUSCTL), "--endpoint", self.endpoint, "--timeout", "10", *args],
            capture_output=True,
            text=True,
            timeout=30,
        )

    # -- observation -----------------------------------------------------------------------

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    @staticmethod
    def lines(path: Path, kind: str) -> list[list[str]]:
        try:
            lines = path.read_text().splitlines()
        except FileNotFoundError:
            return []
        return [line.split()[1:] for line in lines if line.split()[:1] == [kind]]

    def service_starts(self) -> list[float]:
        return [float(f[0]) for f in self.lines(self.service_log, "start")]

    def tree(self) -> list[psutil.Process]:
        """circusd and every process it spawned (children run in their own sessions)."""
        try:
            top = psutil.Process(self.proc.pid)
            return [top, *top.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def stop(self) -> None:
        procs = self.tree()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        for proc in procs:  # anything circusd left behind
            with contextlib.suppress(psutil.Error):
                proc.kill()
        if self.client is not None:
            self.client.stop()
        self._log.close()


def read_ini() -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser()
    parser.read(CIRCUS_INI)
    return parser


def write_test_ini(path: Path, *, service: Path, postgres: Path) -> Path:
    """The project's circus.ini with the two commands replaced, nothing else."""
    parser = read_ini()
    parser[f"watcher:{POSTGRES}"]["cmd"] = str(postgres)
    parser[f"watcher:{POSTGRES}"]["args"] = "serve"
    parser[f"watcher:{SERVICE}"]["cmd"] = str(service)
    parser[f"watcher:{SERVICE}"]["args"] = "run"
    with path.open("w") as fh:
        parser.write(fh)
    return path


@contextlib.contextmanager
def running_circus(
    root: Path,
    service_script: str,
    env_extra: dict[str, str] | None = None,
    state_dir: Path | None = None,
) -> Iterator[Circus]:
    circus = Circus(root, service_script, env_extra or {}, state_dir)
    try:
        circus.wait_ready()
        yield circus
    finally:
        circus.stop()


@pytest.fixture(scope="module")
def external_db(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Circus]:
    """An external database configured; the service crashes at once on every start."""
    root = tmp_path_factory.mktemp("circus-external")
    with running_circus(root, CRASHING_SERVICE, {"HEADSPACE_DATABASE_URL": EXTERNAL_URL}) as c:
        yield c


@pytest.fixture(scope="module")
def embedded_db(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Circus]:
    """The embedded database (fake); a service that keeps running."""
    root = tmp_path_factory.mktemp("circus-embedded")
    (root / "var" / "circus").mkdir(parents=True)
    (root / "var" / "circus").chmod(0o755)  # circusd must tighten this
    with running_circus(root, STABLE_SERVICE) as c:
        yield c


# --------------------------------------------------------------------------------------------
# circus.ini itself
# --------------------------------------------------------------------------------------------


def test_ini_uses_only_owner_only_unix_sockets() -> None:
    text = CIRCUS_INI.read_text()
    assert "tcp://" not in text and "udp://" not in text
    ini = read_ini()
    circus = ini["circus"]
    private = f"{STATE_DIR_VAR}/circus"
    for key in ("endpoint", "pubsub_endpoint", "stats_endpoint"):
        assert circus.get(key, f"ipc://{private}/").startswith(f"ipc://{private}/"), key
    assert circus["pidfile"] == f"{private}/circusd.pid"
    assert circus["multicast_endpoint"].strip() == ""  # no UDP autodiscovery listener
    assert "httpd" not in circus or circus["httpd"].lower() in ("false", "0")
    for name in (POSTGRES, SERVICE):
        section = ini[f"watcher:{name}"]
        assert section["stdout_stream.private_dirs"] == private
        assert section["stdout_stream.filename"].startswith(f"{STATE_DIR_VAR}/log/")
        assert section["stderr_stream.filename"].startswith(f"{STATE_DIR_VAR}/log/")
        assert section["hooks.before_spawn"] == "headspace_watcher.circus_hooks.before_spawn"
    assert ini[f"watcher:{POSTGRES}"]["stop_signal"] == "INT"
    assert ini[f"watcher:{SERVICE}"]["stop_signal"] == "TERM"
    assert float(ini[f"watcher:{SERVICE}"]["graceful_timeout"]) == 2
    assert int(ini[f"watcher:{POSTGRES}"]["priority"]) > int(ini[f"watcher:{SERVICE}"]["priority"])
    assert not [s for s in ini.sections() if s.startswith("plugin:")]


# --------------------------------------------------------------------------------------------
# Real circusd
# --------------------------------------------------------------------------------------------


def test_crash_loop_stopped_after_five_restarts_then_started_again(external_db: Circus) -> None:
    c = external_db
    wait_for(lambda: c.service_starts(), "the first start of the service", timeout=20)
    wait_for(lambda: c.status(SERVICE) == "stopped", "circus to give up on the service", timeout=40)
    starts = c.service_starts()
    assert len(starts) == 1 + MAX_RESTARTS, starts
    assert starts[-1] - starts[0] < 60
    # each crash respawned within the PRD's 5 s (circus's tick: check_delay)
    assert max(b - a for a, b in itertools.pairwise(starts)) < 5

    # and it stays stopped: no spawn during several of circus's ticks
    observe_until = time.monotonic() + 3 * c.check_delay + 0.5
    while time.monotonic() < observe_until:
        assert len(c.service_starts()) == 1 + MAX_RESTARTS
        assert c.status(SERVICE) == "stopped"
        time.sleep(0.1)

    errors = [line for line in c.log().splitlines() if "[ERROR]" in line]
    assert any(f"{SERVICE}: crash loop" in line for line in errors), c.log()

    out = c.circusctl("status")
    assert out.returncode == 0, out.stderr
    assert f"{SERVICE}: stopped" in out.stdout.splitlines()

    out = c.circusctl("start", SERVICE)
    assert out.returncode == 0, out.stdout + out.stderr
    wait_for(
        lambda: len(c.service_starts()) > 1 + MAX_RESTARTS, "a start after `start`", timeout=10
    )
    # The budget starts afresh: again 5 restarts, then stopped.
    wait_for(
        lambda: c.status(SERVICE) == "stopped", "the second crash loop to be stopped", timeout=40
    )
    assert len(c.service_starts()) == 2 * (1 + MAX_RESTARTS)
    assert sum(f"{SERVICE}: crash loop" in line for line in c.log().splitlines()) == 2


def test_postgres_not_started_with_external_database(external_db: Circus) -> None:
    c = external_db
    assert c.status(POSTGRES) == "stopped"
    assert not c.postgres_log.exists()
    assert re.search(r"postgres: not started: an external database", c.log())
    assert "s3cret-pw" not in c.log()
    out = c.circusctl("status", POSTGRES)
    assert out.stdout.strip() == "stopped"


def test_embedded_postgres_started_with_configured_port_and_state_dir(embedded_db: Circus) -> None:
    c = embedded_db
    assert c.status(POSTGRES) == "active"
    line = wait_for(
        lambda: c.postgres_log.exists() and c.postgres_log.read_text(), "pg", timeout=10
    )
    assert f"serve --state-dir {c.var.resolve()} --port 54329" in line
    assert c.status(SERVICE) == "active"


def test_control_socket_dir_is_owner_only_and_no_network_port(embedded_db: Circus) -> None:
    c = embedded_db
    control = c.var / "circus"
    assert stat.S_IMODE(control.stat().st_mode) == 0o700
    assert control.stat().st_uid == os.geteuid()
    assert stat.S_ISSOCK((control / "endpoint").stat().st_mode)
    out = c.circusctl("status")
    assert out.returncode == 0 and f"{SERVICE}: active" in out.stdout, out
    inet = []
    for proc in c.tree():
        with contextlib.suppress(psutil.NoSuchProcess):
            inet += [(proc.pid, conn) for conn in proc.net_connections(kind="inet")]
    assert inet == [], inet  # neither TCP nor UDP (autodiscovery) sockets
    logs = c.var / "log"
    assert (logs / "headspace-watcher.out.log").exists()
    assert (logs / "postgres.err.log").exists()


def test_shutdown_stops_postgres_after_the_service(tmp_path: Path) -> None:
    with running_circus(tmp_path, STABLE_SERVICE) as c:
        wait_for(lambda: c.service_starts() and c.postgres_log.exists(), "both started", timeout=10)
        c.proc.send_signal(signal.SIGINT)  # what Ctrl-C in `just run` does
        assert c.proc.wait(timeout=30) == 0
        service_exit = [float(f[0]) for f in c.lines(c.service_log, "exit")]
        postgres_int = [float(f[0]) for f in c.lines(c.postgres_log, "int")]
        assert len(service_exit) == 1 and len(postgres_int) == 1, c.log()
        assert postgres_int[0] >= service_exit[0]
        # a stopped circus leaves no socket (nor pid file) behind
        assert sorted(p.name for p in (c.var / "circus").iterdir()) == [], c.log()


def test_logs_sockets_and_pid_file_follow_the_state_dir(tmp_path: Path) -> None:
    state = tmp_path / "elsewhere" / "state"
    with running_circus(tmp_path, STABLE_SERVICE, state_dir=state) as c:
        assert stat.S_ISSOCK((state / "circus" / "endpoint").stat().st_mode)
        assert int((state / "circus" / "circusd.pid").read_text()) == c.proc.pid
        wait_for(
            lambda: (state / "log" / "headspace-watcher.out.log").exists(), "the log", timeout=10
        )
        assert (state / "log" / "postgres.err.log").exists()
        assert not (tmp_path / "var").exists()  # nothing relative to circusd's cwd


def test_circusd_without_a_state_dir_refuses_clearly(tmp_path: Path) -> None:
    write_test_ini(tmp_path / "circus.ini", service=Path("/bin/true"), postgres=Path("/bin/true"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("HEADSPACE_")}
    done = subprocess.run(
        [str(CIRCUSD), "circus.ini"], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert done.returncode != 0
    assert "HEADSPACE_STATE_DIR is not set" in done.stdout + done.stderr
    assert "just run" in done.stdout + done.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["circus.ini"]  # no "$(circus.env…" dir


def test_a_second_circusd_for_the_same_state_dir_is_refused_clearly(
    embedded_db: Circus,
) -> None:
    c = embedded_db
    env = {k: v for k, v in os.environ.items() if not k.startswith("HEADSPACE_")}
    env.update(HEADSPACE_STATE_DIR=str(c.var), HEADSPACE_CONFIG=str(c.root / "config.yaml"))
    second = subprocess.run(
        [str(CIRCUSD), "circus.ini"], cwd=c.root, env=env, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    out = second.stdout + second.stderr
    assert second.returncode != 0
    assert f"another circusd (pid {c.proc.pid}) already runs for this state dir" in out, out
    assert "stale" not in out
    assert c.status(SERVICE) == "active"  # the first one keeps its sockets and processes
    assert int((c.var / "circus" / "circusd.pid").read_text()) == c.proc.pid


JUSTFILE_RUN = """run:
    exec {python} -m headspace_watcher.circus_hooks circusd circus.ini
"""


@pytest.mark.skipif(shutil.which("just") is None, reason="needs just")
def test_ctrl_c_in_a_terminal_stops_just_run_cleanly_with_exit_0(tmp_path: Path) -> None:
    """`just run`'s recipe line under real `just` in a pseudo-terminal: Ctrl-C reaches
    circusd once, circus stops everything, and just exits 0 without "interrupted"."""
    import pty

    script = tmp_path / "service.sh"
    # its stop outlasts a tick of circus's process check (circus then raced its own stop)
    script.write_text(SLOW_STOP_SERVICE.format(log=tmp_path / "service.starts"))
    postgres = tmp_path / "postgres.sh"
    postgres.write_text(FAKE_POSTGRES.format(log=tmp_path / "postgres.starts"))
    for path in (script, postgres):
        path.chmod(0o755)
    (tmp_path / "config.yaml").write_text("database:\n  url: null\n")
    write_test_ini(tmp_path / "circus.ini", service=script, postgres=postgres)
    (tmp_path / "Justfile").write_text(JUSTFILE_RUN.format(python=sys.executable))
    env = {k: v for k, v in os.environ.items() if not k.startswith("HEADSPACE_")}
    env.update(
        HEADSPACE_STATE_DIR=str(tmp_path / "var"), HEADSPACE_CONFIG=str(tmp_path / "config.yaml")
    )
    pid, fd = pty.fork()
    if pid == 0:  # pragma: no cover - the child execs
        os.chdir(tmp_path)
        os.execvpe("just", ["just", "run"], env)
    output = bytearray()

    def read_some() -> bool:
        with contextlib.suppress(OSError):
            ready, _, _ = select.select([fd], [], [], 0.1)
            if ready:
                output.extend(os.read(fd, 65536))
        return b"headspace-watcher started" in output

    try:
        wait_for(read_some, "circusd to start both watchers", timeout=30)
        os.write(fd, b"\x03")  # Ctrl-C
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            read_some()
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
        else:
            raise AssertionError(f"just run did not stop:\n{output.decode(errors='replace')}")
        for _ in range(20):  # what is still buffered in the terminal
            with contextlib.suppress(OSError):
                if not select.select([fd], [], [], 0.05)[0] or not os.read(fd, 65536):
                    break
    finally:
        with contextlib.suppress(ProcessLookupError, ChildProcessError):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(fd)
    text = output.decode(errors="replace")
    assert os.waitstatus_to_exitcode(status) == 0, text
    assert "interrupted" not in text and "Traceback" not in text, text
    assert text.count("Got signal SIG_INT") == 1, text
    assert [p.name for p in (tmp_path / "var" / "circus").iterdir()] == [], text


def test_just_status_while_stopped_is_one_friendly_line_per_part(tmp_path: Path) -> None:
    if shutil.which("just") is None:
        pytest.skip("needs just")
    config = tmp_path / "config.yaml"
    config.write_text(
        "database:\n  url: postgresql+psycopg://u:p@127.0.0.1:9/x\n  connect_timeout_seconds: 1\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("HEADSPACE_")}
    env.update(HEADSPACE_STATE_DIR=str(tmp_path / "state"), HEADSPACE_CONFIG=str(config))
    done = subprocess.run(
        ["just", "status"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    out = done.stdout + done.stderr
    assert done.returncode == 3, out
    assert f"circus: not running (no control socket {tmp_path / 'state'}/circus/endpoint)" in out
    assert "Timed out" not in out and "usage:" not in out.lower(), out
    assert "state: stopped" in out and "error: recipe" not in out


# --------------------------------------------------------------------------------------------
# The hooks, directly
# --------------------------------------------------------------------------------------------


class FakeWatcher:
    def __init__(self, name: str, env: dict[str, str], args: str = "", **options: Any) -> None:
        self.name = name
        self.env = env
        self.args = args
        self._status = "stopped"
        self._options = options

    def status(self) -> str:
        return self._status

    def options(self) -> list[tuple[str, Any]]:
        return list(self._options.items())


def _config(tmp_path: Path, max_restarts: int = 5) -> dict[str, str]:
    config = tmp_path / "config.yaml"
    config.write_text(f"event_system:\n  max_restarts_per_minute: {max_restarts}\n")
    return {"HEADSPACE_CONFIG": str(config), "HEADSPACE_STATE_DIR": str(tmp_path / "var")}


def test_before_start_postgres_hook(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HEADSPACE_DATABASE_URL", raising=False)
    env = _config(tmp_path)
    watcher = FakeWatcher(POSTGRES, env, args="-m headspace_watcher.store.embedded serve")
    assert circus_hooks.before_start_postgres(watcher, None, "before_start") is True
    expected = (
        f"-m headspace_watcher.store.embedded serve --state-dir {tmp_path / 'var'} --port 54329"
    )
    assert watcher.args == expected
    assert circus_hooks.before_start_postgres(watcher, None, "before_start") is True
    assert watcher.args == expected  # not appended twice

    external = FakeWatcher(POSTGRES, {**env, "HEADSPACE_DATABASE_URL": EXTERNAL_URL})
    assert circus_hooks.before_start_postgres(external, None, "before_start") is False


def test_before_spawn_hook_budget(tmp_path: Path) -> None:
    watcher = FakeWatcher(SERVICE, _config(tmp_path, max_restarts=3))
    watcher._status = "starting"
    assert circus_hooks.before_spawn(watcher, None, "before_spawn")  # the start: free
    watcher._status = "active"
    assert [circus_hooks.before_spawn(watcher, None, "before_spawn") for _ in range(4)] == [
        True,
        True,
        True,
        False,
    ]
    watcher._status = "starting"  # circusctl start: a fresh budget
    assert circus_hooks.before_spawn(watcher, None, "before_spawn")
    watcher._status = "active"
    assert circus_hooks.before_spawn(watcher, None, "before_spawn")

    override = FakeWatcher(SERVICE, _config(tmp_path), **{circus_hooks.OPT_MAX_RESTARTS: "1"})
    override._status = "starting"
    assert circus_hooks.before_spawn(override, None, "before_spawn")
    override._status = "active"
    assert circus_hooks.before_spawn(override, None, "before_spawn")
    assert not circus_hooks.before_spawn(override, None, "before_spawn")


def test_restart_budget_window() -> None:
    budget = circus_hooks.RestartBudget(max_restarts=5, window=60)
    assert all(budget.allow(t) for t in (0, 10, 20, 30, 40))
    assert not budget.allow(59.9)
    assert budget.allow(60.0)  # the restart at 0 s has left the window
    assert not budget.allow(60.5)


def test_private_dir_tightened(tmp_path: Path) -> None:
    loose = tmp_path / "a" / "circus"
    loose.mkdir(parents=True, mode=0o755)
    loose.chmod(0o755)
    circus_hooks.ensure_private_dir(loose)
    assert stat.S_IMODE(loose.stat().st_mode) == 0o700
    fresh = tmp_path / "b" / "circus"
    stream = circus_hooks.LogFileStream(
        filename=str(tmp_path / "log" / "x.log"), max_bytes="100", private_dirs=str(fresh)
    )
    try:
        assert stat.S_IMODE(fresh.stat().st_mode) == 0o700
        assert (tmp_path / "log" / "x.log").exists()
    finally:
        stream.close()
