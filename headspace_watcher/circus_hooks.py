"""Circus hooks and the log stream named in ``circus.ini``; all of it runs inside circusd.

Why hooks instead of circus's flapping plugin (circus 0.19.0, observed with real circusd, see
``docs/circus.md``): the plugin runs in a separate process and stops a flapping watcher with a
fire-and-forget ``cast("stop")``.  The reap event it reacts to is published from inside the
arbiter's ``manage_watchers`` tick, which holds circus's command lock while it respawns the
process; the stop arrives during that tick, is refused with ``ConflictError`` and, being a
cast, dropped without a trace.  The watcher is respawned forever while the plugin keeps
logging "reached max retry limit" (at INFO, into a closed stdout).  A ``before_spawn`` hook
runs in circusd itself, synchronously, before every spawn: returning False there makes the
watcher stop at once (``Watcher.spawn_processes`` → ``_stop()``), with nothing to race.

* :func:`before_spawn` — crash-loop protection: the start of a watcher is free, then at most
  ``event_system.max_restarts_per_minute`` (config.yaml, default 5) restarts within 60 s; the
  next one is refused, logged at ERROR, and the watcher is left ``stopped`` until
  ``circusctl start NAME`` (a start resets the count).
* :func:`before_start_postgres` — the embedded PostgreSQL is started only when no external
  database is configured, with the state dir and port of the configuration.
* :func:`wait_for_dependents` (``before_stop`` of postgres) — on shutdown, the database goes
  down only after the watchers ordered after it (lower priority) have exited, so the
  service's last batch can still commit.
* :func:`quiet_shutdown` (``before_stop``, also called by the hook above) — when circusd
  itself stops, its once-a-tick process check is stopped first: circus 0.19 keeps firing it
  during the stop, where it collides with the stop's own command lock and tornado prints a
  ``ConflictError`` traceback for every tick the stop takes longer than ``check_delay``.
* :func:`after_reap` — a process exit that circus did not ask for is logged (WARNING).
* :func:`remove_sockets_on_exit` (``after_stop`` of every watcher) — when circusd itself
  stops, its ipc socket files go with it (circus closes its zmq sockets but exits before
  libzmq removes their files).
* :class:`LogFileStream` — circus's size-rotating ``FileStream`` that creates its directory;
  with ``private_dirs`` it also creates the control-socket directory owner-only (0700), and
  with ``circusd_pidfile`` it refuses a second circusd for the same state dir.  Circus builds
  the streams while it reads ``circus.ini``, before it writes its pid file or binds its
  sockets: the only place that runs that early.
* :func:`main` (``python -m headspace_watcher.circus_hooks``, what ``just run`` uses, outside
  circusd): the configured state dir, and circusd run as the terminal's foreground job.

Hooks never raise: circus treats an exception in ``before_start``/``before_spawn`` as a
refusal, and a bug here must not stop a healthy service.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import signal
import stat
import sys
import time
import weakref
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from circus.stream import FileStream

logger = logging.getLogger("headspace_watcher.circus")

DEFAULT_MAX_RESTARTS = 5
DEFAULT_WINDOW_SECONDS = 60.0
OPT_MAX_RESTARTS = "crash_loop.max_restarts"
"""Watcher option in circus.ini overriding ``max_restarts_per_minute`` for that watcher."""
OPT_WINDOW = "crash_loop.window_seconds"
"""Watcher option in circus.ini overriding the 60 s window."""
_STOP_WAIT_MARGIN = 1.0


# --------------------------------------------------------------------------------------------
# Crash-loop protection
# --------------------------------------------------------------------------------------------


@dataclass
class RestartBudget:
    """At most ``max_restarts`` restarts within any ``window`` seconds."""

    max_restarts: int
    window: float
    restarts: deque[float] = field(default_factory=deque)

    def _forget_old(self, now: float) -> None:
        while self.restarts and now - self.restarts[0] >= self.window:
            self.restarts.popleft()

    def allow(self, now: float) -> bool:
        """Record a restart at ``now`` and return True, or return False when over budget."""
        self._forget_old(now)
        if len(self.restarts) >= self.max_restarts:
            return False
        self.restarts.append(now)
        return True

    def used(self, now: float) -> int:
        self._forget_old(now)
        return len(self.restarts)


_BUDGETS: weakref.WeakKeyDictionary[Any, RestartBudget] = weakref.WeakKeyDictionary()


def _watcher_options(watcher: Any) -> dict[str, Any]:
    try:
        return dict(watcher.options())
    except Exception:
        return {}


def _config_max_restarts(env: Mapping[str, str] | None) -> int:
    from headspace_watcher.config import ConfigError, load_config

    try:
        return load_config(env=_env_for(env)).event_system.max_restarts_per_minute
    except ConfigError as exc:
        # The service itself exits 2 on this config; this protection is what stops it.
        logger.warning(
            "config invalid (%s): crash-loop limit falls back to %d restarts per minute",
            exc,
            DEFAULT_MAX_RESTARTS,
        )
        return DEFAULT_MAX_RESTARTS


def restart_limits(watcher: Any) -> tuple[int, float]:
    """``(max_restarts, window_seconds)`` for ``watcher``: its circus.ini options
    ``crash_loop.max_restarts`` / ``crash_loop.window_seconds`` when set, else
    ``event_system.max_restarts_per_minute`` from the configuration and 60 s."""
    options = _watcher_options(watcher)
    if options.get(OPT_MAX_RESTARTS) not in (None, ""):
        max_restarts = int(options[OPT_MAX_RESTARTS])
    else:
        max_restarts = _config_max_restarts(getattr(watcher, "env", None))
    window = float(options.get(OPT_WINDOW) or DEFAULT_WINDOW_SECONDS)
    if max_restarts < 0 or window <= 0:
        raise ValueError(f"bad crash-loop limits: {max_restarts} restarts in {window} s")
    return max_restarts, window


def before_spawn(watcher: Any, arbiter: Any, hook_name: str, **_: Any) -> bool:
    """Allow the spawn, or refuse it (→ circus stops the watcher) when it would be one
    restart too many within the window.

    A spawn while the watcher is ``starting`` (circusd start, ``circusctl start`` or
    ``restart``) is the start itself: it resets the budget and is not counted.  Every other
    spawn is circus replacing a process that exited, i.e. a restart.
    """
    try:
        budget = _BUDGETS.get(watcher)
        if budget is None or watcher.status() == "starting":
            max_restarts, window = restart_limits(watcher)
            _BUDGETS[watcher] = RestartBudget(max_restarts, window)
            return True
        now = time.monotonic()
        if budget.allow(now):
            logger.warning(
                "%s: restarting it (restart %d of at most %d within %g s)",
                watcher.name,
                budget.used(now),
                budget.max_restarts,
                budget.window,
            )
            return True
        logger.error(
            "%s: crash loop: it exited again after %d restarts within %g s "
            "(event_system.max_restarts_per_minute = %d); circus will not restart it, it "
            "stays stopped. Fix the cause (see <state dir>/log/%s.*.log), then: circusctl start %s",
            watcher.name,
            budget.max_restarts,
            budget.window,
            budget.max_restarts,
            watcher.name,
            watcher.name,
        )
        return False
    except Exception:
        logger.exception("%s: crash-loop check failed; allowing the spawn", watcher.name)
        return True


def after_reap(
    watcher: Any,
    arbiter: Any,
    hook_name: str,
    process_pid: int | None = None,
    exit_code: int | None = None,
    **_: Any,
) -> bool:
    """Log a process exit: WARNING when circus did not ask for it (a crash), else INFO."""
    try:
        if watcher.is_stopping() or watcher.is_stopped():
            logger.info("%s: pid %s exited (code %s)", watcher.name, process_pid, exit_code)
        else:
            how = f"was killed by signal {-exit_code}" if (exit_code or 0) < 0 else "exited"
            logger.warning(
                "%s: pid %s %s (code %s) while it was supposed to run",
                watcher.name,
                process_pid,
                how,
                exit_code,
            )
    except Exception:
        logger.exception("after_reap hook failed")
    return True


def remove_sockets_on_exit(watcher: Any, arbiter: Any, hook_name: str, **_: Any) -> bool:
    """``after_stop``: once circusd is shutting down and no watcher runs any more, remove
    the files of its ipc endpoints, so a stopped circus leaves no socket behind (a client
    then learns at once that nothing listens, instead of timing out)."""
    try:
        if not getattr(arbiter, "_stopping", False):
            return True  # `circusctl stop NAME`: circusd keeps running and listening
        if any(not w.is_stopped() for w in getattr(arbiter, "watchers", []) if w is not watcher):
            return True  # the last watcher to stop cleans up
        for endpoint in (arbiter.endpoint, arbiter.pubsub_endpoint, arbiter.stats_endpoint):
            if endpoint and endpoint.startswith("ipc://"):
                path = Path(endpoint[len("ipc://") :])
                with contextlib.suppress(OSError):
                    if stat.S_ISSOCK(path.lstat().st_mode):
                        path.unlink()
    except Exception:
        logger.exception("after_stop hook failed")
    return True


# --------------------------------------------------------------------------------------------
# The embedded PostgreSQL
# --------------------------------------------------------------------------------------------


def _env_for(env: Mapping[str, str] | None) -> dict[str, str]:
    """The environment the service sees: the watcher's (``copy_env`` + ``[env]``) over
    circusd's own."""
    merged = dict(os.environ)
    if env:
        merged.update(env)
    return merged


_ORIGINAL_ARGS: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()


def _serve_args(original: str, state_dir: Path, port: int, tcp: bool = False) -> str:
    """``original`` plus ``--state-dir``/``--port`` unless circus.ini already gives them,
    and ``--tcp`` when ``database.embedded_tcp`` is on."""
    words = shlex.split(original or "")
    extra: list[str] = []
    if not any(w == "--state-dir" or w.startswith("--state-dir=") for w in words):
        extra += ["--state-dir", str(state_dir)]
    if not any(w == "--port" or w.startswith("--port=") for w in words):
        extra += ["--port", str(port)]
    if tcp and "--tcp" not in words:
        extra.append("--tcp")
    return shlex.join([*words, *extra])


def before_start_postgres(watcher: Any, arbiter: Any, hook_name: str, **_: Any) -> bool:
    """Start the embedded PostgreSQL only when the configuration uses it.

    With ``database.url`` or ``HEADSPACE_DATABASE_URL`` set, return False: circus then leaves
    the watcher ``stopped`` (also on ``circusctl start postgres``).  Otherwise add the
    configuration's state directory and ``database.embedded_port`` to the ``serve`` command,
    so the server listens where the service will connect.  A socket or (with
    ``database.embedded_tcp``) a port already taken is refused here with an ERROR naming it
    and the key to set, and the watcher stays stopped: no crash loop.
    """
    from headspace_watcher.config import (
        DEFAULT_EMBEDDED_PORT,
        ENV_DATABASE_URL,
        ConfigError,
        load_config,
        mask_url,
    )
    from headspace_watcher.store.embedded import PgServerError, check_can_serve, default_state_dir

    try:
        env = _env_for(getattr(watcher, "env", None))
        try:
            config = load_config(env=env)
        except ConfigError as exc:
            if env.get(ENV_DATABASE_URL):
                logger.info(
                    "%s: not started: %s is set (an external database); config: %s",
                    watcher.name,
                    ENV_DATABASE_URL,
                    exc,
                )
                return False
            logger.warning(
                "%s: config invalid (%s); starting the embedded PostgreSQL with defaults",
                watcher.name,
                exc,
            )
            state_dir, port, tcp = default_state_dir(), DEFAULT_EMBEDDED_PORT, False
        else:
            if not config.uses_embedded_database:
                logger.info(
                    "%s: not started: an external database is configured (%s); the embedded "
                    "PostgreSQL is only for database.url = null",
                    watcher.name,
                    mask_url(config.database.url or ""),
                )
                return False
            state_dir, port = config.state_dir, config.database.embedded_port
            tcp = config.database.embedded_tcp
        try:
            check_can_serve(state_dir, port, tcp=tcp)
        except PgServerError as exc:
            logger.error(
                "%s: %s; it stays stopped (fix it, then: circusctl start %s)",
                watcher.name,
                exc,
                watcher.name,
            )
            return False
        original = _ORIGINAL_ARGS.setdefault(watcher, watcher.args or "")
        watcher.args = _serve_args(original, Path(state_dir), port, tcp)
        logger.info(
            "%s: embedded PostgreSQL on its unix socket%s, state dir %s",
            watcher.name,
            f" and 127.0.0.1:{port}" if tcp else "",
            state_dir,
        )
        return True
    except Exception:
        logger.exception("%s: before_start hook failed; starting it as configured", watcher.name)
        return True


def quiet_shutdown(watcher: Any, arbiter: Any, hook_name: str, **_: Any) -> bool:
    """``before_stop``: during circusd's own shutdown, stop its periodic process check (it
    would only find the arbiter busy stopping, and log that as a traceback)."""
    try:
        if getattr(arbiter, "_stopping", False):
            caller = getattr(getattr(arbiter, "ctrl", None), "caller", None)
            if caller is not None:
                caller.stop()
    except Exception:
        logger.exception("%s: before_stop hook failed", watcher.name)
    return True


def wait_for_dependents(watcher: Any, arbiter: Any, hook_name: str, **_: Any) -> bool:
    """``before_stop``: wait until the watchers ordered after this one (lower priority) that
    are stopping too have no live process, at most their ``graceful_timeout`` + 1 s.

    Circus signals all watchers of a shutdown at once (lowest priority first, without waiting);
    this keeps PostgreSQL up while headspace-watcher finishes or rolls back its last batch.
    Blocks circusd's loop for that long, which is fine during a stop.  A watcher stopped on
    its own (``circusctl stop postgres``) waits for nothing.
    """
    quiet_shutdown(watcher, arbiter, hook_name)
    try:
        dependents = [
            w
            for w in getattr(arbiter, "watchers", [])
            if w is not watcher and w.priority < watcher.priority and w.is_stopping()
        ]
        if not dependents:
            return True
        deadline = time.monotonic() + max(w.graceful_timeout for w in dependents)
        deadline += _STOP_WAIT_MARGIN
        while time.monotonic() < deadline:
            alive = [p for w in dependents for p in list(w.processes.values()) if p.is_alive()]
            if not alive:
                return True
            time.sleep(0.05)
        logger.warning(
            "%s: stopping it although %s still run",
            watcher.name,
            ", ".join(w.name for w in dependents),
        )
    except Exception:
        logger.exception("%s: before_stop hook failed", watcher.name)
    return True


# --------------------------------------------------------------------------------------------
# Log files and the control-socket directory
# --------------------------------------------------------------------------------------------


def ensure_private_dir(path: Path | str) -> Path:
    """Create ``path`` (and parents) with mode 0700, or tighten it to 0700 if it is ours.

    Refuses (SystemExit, so circusd does not start) when it belongs to another user: whoever
    owns the directory of circusd's control socket can control every process it runs.
    """
    path = Path(path)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.stat()
    if st.st_uid != os.geteuid():
        raise SystemExit(
            f"{path} belongs to uid {st.st_uid}, not to us (uid {os.geteuid()}): refusing to "
            "put circusd's control sockets there"
        )
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(path, 0o700)
    return path


_UNSET_STATE_DIR = "$(circus.env."


def _require_substituted(*paths: str) -> None:
    """circus leaves ``$(circus.env.X)`` as it is when X is unset: refuse to create a
    directory literally named so, and say what to set."""
    if any(_UNSET_STATE_DIR in p.lower() for p in paths if p):
        raise SystemExit(
            "circusd: HEADSPACE_STATE_DIR is not set; circus.ini puts its sockets and logs "
            "in the state dir. Start it with `just run`, or set HEADSPACE_STATE_DIR "
            "(systemd: Environment=) to the state dir (health.state_dir, default var/ in "
            "the checkout)"
        )


def _is_circusd(pid: int) -> bool:
    try:
        return b"circusd" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def refuse_second_circusd(pidfile: Path | str) -> None:
    """SystemExit naming the live circusd when ``pidfile`` belongs to another running
    circusd; a pid file of a dead one (or of a recycled pid) is removed, so circus's own
    check does not call it "stale" and give up."""
    pidfile = Path(pidfile)
    try:
        pid = int(pidfile.read_text().strip() or 0)
    except (OSError, ValueError):
        return
    if pid == os.getpid() or pid <= 0:
        return  # a reload of this circusd
    if _is_circusd(pid):
        endpoint = pidfile.parent / "endpoint"
        raise SystemExit(
            f"circusd: another circusd (pid {pid}) already runs for this state dir "
            f"({pidfile.parent.parent}); `just status` shows it. Stop it first (Ctrl-C in its "
            f"terminal, or: circusctl --endpoint ipc://{endpoint} quit), or give this one its "
            "own HEADSPACE_STATE_DIR"
        )
    with contextlib.suppress(OSError):
        pidfile.unlink()


class LogFileStream(FileStream):
    """circus's ``FileStream`` (size rotation with ``max_bytes`` / ``backup_count``) that
    creates the directory of its file (0700 when new).

    ``private_dirs`` (whitespace-separated) are created owner-only as well: circus builds
    stream objects while it loads circus.ini, before it binds its ipc endpoints, so this is
    where the control-socket directory is made 0700 in time.  ``circusd_pidfile``: refuse
    to start while another circusd runs for it (:func:`refuse_second_circusd`).
    """

    def __init__(
        self,
        filename: str | None = None,
        max_bytes: int | str = 0,
        backup_count: int | str = 0,
        time_format: str | None = None,
        private_dirs: str = "",
        circusd_pidfile: str = "",
        **kwargs: Any,
    ) -> None:
        _require_substituted(filename or "", private_dirs, circusd_pidfile)
        for directory in private_dirs.split():
            ensure_private_dir(directory)
        if circusd_pidfile:
            refuse_second_circusd(circusd_pidfile)
        if filename:
            Path(filename).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        super().__init__(
            filename=filename,
            max_bytes=max_bytes,
            backup_count=backup_count,
            time_format=time_format,
            **kwargs,
        )


# --------------------------------------------------------------------------------------------
# `just run`: the state dir, and circusd as the terminal's foreground job
# --------------------------------------------------------------------------------------------


def configured_state_dir() -> Path:
    """The state dir of the configuration (``HEADSPACE_STATE_DIR``, ``health.state_dir``,
    default ``var/``), the one ``just run`` hands to circusd."""
    from headspace_watcher.config import load_config

    return load_config().state_dir


def _controlling_tty() -> int | None:
    """Our terminal, when we are its foreground job (an interactive ``just run``)."""
    try:
        fd = os.open("/dev/tty", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if os.tcgetpgrp(fd) == os.getpgrp():
            return fd
    except OSError:
        pass
    os.close(fd)
    return None


def _hand_terminal(fd: int, pgrp: int) -> None:
    """Make ``pgrp`` the terminal's foreground job (SIGTTOU ignored: we may be in the
    background by then)."""
    previous = signal.signal(signal.SIGTTOU, signal.SIG_IGN)
    try:
        os.tcsetpgrp(fd, pgrp)
    finally:
        signal.signal(signal.SIGTTOU, previous)


def run_circusd(circusd: str, args: Sequence[str]) -> int:
    """Run circusd so that Ctrl-C reaches circusd alone, once.

    In a terminal, Ctrl-C signals the whole foreground job: ``just``, which then ends with
    "error: interrupted by SIGINT" (exit 130) whatever circusd does, and forwards the signal
    to circusd a second time (a second stop while the first runs: circus's ConflictError
    traceback).  So circusd gets its own process group and the terminal; we wait for it
    outside the foreground job, then hand the terminal back and return circusd's code.
    Without a terminal (systemd, tests) circusd simply replaces this process.
    """
    argv = [circusd, *args]
    tty = _controlling_tty()
    if tty is None:
        os.execv(circusd, argv)
    own = os.getpgrp()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child execs at once
        try:
            os.setpgid(0, 0)
            _hand_terminal(tty, os.getpgrp())
            os.close(tty)
            os.execv(circusd, argv)
        finally:
            os._exit(127)
    with contextlib.suppress(OSError):
        os.setpgid(pid, pid)  # also here: no window in which circusd is in our group
    for forwarded in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(forwarded, lambda signum, _frame: os.kill(pid, signum))
    try:
        while True:
            try:
                _, wait_status = os.waitpid(pid, 0)
                break
            except InterruptedError:
                continue
    finally:
        with contextlib.suppress(OSError):
            _hand_terminal(tty, own)
        os.close(tty)
    return os.waitstatus_to_exitcode(wait_status)


def main(argv: Sequence[str] | None = None) -> int:
    """``state-dir``: print the configured state dir; ``circusd ARGS``: :func:`run_circusd`
    with the circusd next to this interpreter."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["state-dir"]:
        from headspace_watcher.config import ConfigError

        try:
            print(configured_state_dir())
        except ConfigError as exc:
            print(f"headspace-watcher: {exc}", file=sys.stderr)
            return 2
        return 0
    if args[:1] == ["circusd"]:
        return run_circusd(str(Path(sys.executable).parent / "circusd"), args[1:])
    print(
        "usage: python -m headspace_watcher.circus_hooks state-dir | circusd ARGS…", file=sys.stderr
    )
    return 2


if __name__ == "__main__":
    sys.exit(main())
