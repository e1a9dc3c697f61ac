"""Health reporting: pid file, status file, heartbeat row, and the ``status`` verdict.

The service writes what only it knows (counters, lag, last write) to ``status.json`` in the
state dir and to a heartbeat row in PostgreSQL (for dashboards on other machines). The
``status`` command combines that with what it checks itself: is the pid alive and really a
watcher, and does the database answer now.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import socket
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from headspace_watcher.config import (
    ENV_PROJECTS_PATH,
    ENV_STATE_DIR,
    PROJECT_ROOT,
    Config,
    mask_url,
    redact_text,
)
from headspace_watcher.errors import AnotherInstance
from headspace_watcher.store import Store
from headspace_watcher.store.embedded import database_url

log = logging.getLogger(__name__)

PID_FILE = "headspace-watcher.pid"
LOCK_FILE = "headspace-watcher.lock"
STATUS_FILE = "status.json"
EXIT_HEALTHY, EXIT_DEGRADED, EXIT_STOPPED = 0, 1, 3


def pid_path(state_dir: Path) -> Path:
    return state_dir / PID_FILE


def status_path(state_dir: Path) -> Path:
    return state_dir / STATUS_FILE


def watcher_id(config: Config) -> str:
    return f"{socket.gethostname()}:{config.projects_path}"


class InstanceLocked(AnotherInstance):
    """Another live service holds this state dir (its pid and status files are its own)."""


def lock_instance(state_dir: Path) -> int:
    """Hold this state dir for the process's life (an exclusive ``flock``); return its fd.

    The kernel drops the lock when the process dies, however it dies, so a stale lock
    cannot outlive its owner; a second instance learns at once that the pid and status
    files are not its to write or remove.
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(state_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        pid = read_pid(state_dir)
        raise InstanceLocked(
            f"another headspace-watcher already watches from state dir {state_dir} "
            f"(pid {pid if pid is not None else 'unknown'}); give this one its own "
            "HEADSPACE_STATE_DIR"
        ) from None
    return fd


def write_pid(state_dir: Path, pid: int | None = None) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    _atomic_write(pid_path(state_dir), f"{pid or os.getpid()}\n")


def remove_pid(state_dir: Path) -> None:
    path = pid_path(state_dir)
    with contextlib.suppress(OSError):
        if path.read_text().strip() == str(os.getpid()):
            path.unlink()


def write_status(state_dir: Path, snapshot: dict[str, Any]) -> None:
    _atomic_write(status_path(state_dir), json.dumps(snapshot, indent=1, default=str))


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_pid(state_dir: Path) -> int | None:
    try:
        return int(pid_path(state_dir).read_text().strip())
    except (OSError, ValueError):
        return None


def pid_is_watcher(pid: int) -> bool:
    """Alive AND a headspace-watcher (a recycled pid of another program does not count)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"headspace" in cmdline


def database_reachable(url: str, timeout: int = 3) -> bool:
    store = Store(url, connect_timeout=timeout, pool_size=1, max_overflow=0)
    try:
        return store.ping()
    finally:
        store.close()


def running_state_dirs(checkout: Path = PROJECT_ROOT) -> list[tuple[int, Path]]:
    """``(pid, state dir)`` of every live service started from ``checkout``'s console script,
    found by the lock file each one holds open for its whole life (no pointer file that
    could go stale): the service, however its state dir was chosen, is found."""
    prefix = f"{checkout}/".encode()
    found: list[tuple[int, Path]] = []
    try:
        entries = [e.name for e in os.scandir("/proc") if e.name.isdigit()]
    except OSError:
        return found
    for name in entries:
        try:
            argv = Path(f"/proc/{name}/cmdline").read_bytes().split(b"\0")
            if not any(arg.startswith(prefix) for arg in argv[:2]):
                continue
            for fd in os.listdir(f"/proc/{name}/fd"):
                target = os.readlink(f"/proc/{name}/fd/{fd}")
                if target.endswith(f"/{LOCK_FILE}"):
                    found.append((int(name), Path(target).parent))
        except OSError:  # gone meanwhile, or not ours to look at
            continue
    return found


def _locate(config: Config) -> tuple[Config, dict[str, str]]:
    """The config whose state dir holds the running service, and what to tell the user.

    A state dir chosen explicitly (``HEADSPACE_STATE_DIR``, ``health.state_dir``) is the
    one looked at.  With the default one and nothing running there, a service of this
    checkout running with another state dir is the one reported, saying so; several are
    listed instead, with how to pick one.
    """
    pid = read_pid(config.state_dir)
    if pid is not None and pid_is_watcher(pid):
        return config, {}
    others = sorted({d for _, d in running_state_dirs() if d != config.state_dir})
    explicit = config.state_dir != (PROJECT_ROOT / "var").resolve()
    if len(others) == 1 and not explicit:
        note = (
            f"nothing runs with the default state dir {config.state_dir}; reporting the "
            f"service running with state dir {others[0]}"
        )
        moved = dataclasses.replace(config.health, state_dir=others[0])
        return dataclasses.replace(config, health=moved), {"note": note}
    if others:
        where = ", ".join(str(d) for d in others)
        hint = (
            f"no service in state dir {config.state_dir}, but one runs with {where}: "
            f"{ENV_STATE_DIR}=<that dir> headspace-watcher status"
        )
        return config, {"hint": hint}
    return config, {}


def status(config: Config, *, check_database: bool = True) -> dict[str, Any]:
    """The health dict (also the API for a future ``/health`` endpoint)."""
    config, notes = _locate(config)
    pid = read_pid(config.state_dir)
    running = pid is not None and pid_is_watcher(pid)
    report: dict[str, Any] = {
        "state": "stopped",
        "pid": pid if running else None,
        "started_at": None,
        "uptime_seconds": None,
        "database": _database_label(config),
        "database_reachable": None,
        "last_write_at": None,
        "events_written": 0,
        "failed_writes": 0,
        "rejected": 0,
        "lag_bytes": None,
        "sessions_watched": 0,
        "projects_path": str(config.projects_path),
    }
    if running:
        with contextlib.suppress(OSError, ValueError):
            report.update(json.loads(status_path(config.state_dir).read_text()))
        report["pid"] = pid
        if report.get("started_at"):
            started = datetime.fromisoformat(report["started_at"])
            report["uptime_seconds"] = round((datetime.now(UTC) - started).total_seconds(), 1)
    report["state_dir"] = str(config.state_dir)
    report.update(notes)
    if check_database:
        try:
            url = database_url(config)
        except Exception:
            url = None
        report["database_reachable"] = bool(url) and database_reachable(url)  # type: ignore[arg-type]
    if running:
        stale = _stale(report, config)
        healthy = report.get("state") == "healthy" and report["database_reachable"] is not False
        report["state"] = "healthy" if healthy and not stale else "degraded"
        if stale:
            report["reason"] = "the service has not reported for a while"
        if report.get("projects_path_present") is False:
            problem = report.get("projects_path_problem") or "does not exist"
            report["waiting_for"] = (
                f"the projects path {report['projects_path']} ({problem}): create it, or set "
                f"{ENV_PROJECTS_PATH} / file_watcher.projects_path and restart"
            )
    return report


def _stale(report: dict[str, Any], config: Config) -> bool:
    updated = report.get("updated_at")
    if not updated:
        return True
    age = (datetime.now(UTC) - datetime.fromisoformat(updated)).total_seconds()
    return age > 3 * config.health.heartbeat_interval_seconds + 5


def _database_label(config: Config) -> str:
    if config.database.url:
        return mask_url(config.database.url)
    port = config.database.embedded_port
    return f"embedded PostgreSQL (unix socket in {config.state_dir}, port {port})"


def exit_code(report: dict[str, Any]) -> int:
    return {"healthy": EXIT_HEALTHY, "degraded": EXIT_DEGRADED}.get(report["state"], EXIT_STOPPED)


def _shown(value: Any) -> str:
    """A value for people: yes/no for flags, a dash for "not known", redacted text."""
    if value is True:
        return "yes"
    if value is False:
        return "no"
    if value is None:
        return "\u2014"
    return redact_text(str(value))


def render(report: dict[str, Any]) -> str:
    """The text ``status``; values are redacted, as they may quote a driver's error."""
    keys = [
        "state",
        "pid",
        "started_at",
        "uptime_seconds",
        "database",
        "database_reachable",
        "last_write_at",
        "events_written",
        "failed_writes",
        "rejected",
        "lag_bytes",
        "sessions_watched",
        "files_watched",
        "projects_path",
        "waiting_for",
        "state_dir",
        "last_error",
        "reason",
        "note",
        "hint",
    ]
    return "\n".join(f"{k:>18}: {_shown(report[k])}" for k in keys if k in report)
