"""The watcher process: config → tailer → parser → validation → writer, in one thread.

One loop, no queues: the only buffers are the set of files that may have new bytes and the
batch being written, both bounded. When lines arrive one at a time each is committed at
once; when there is a backlog, the loop keeps building batches up to the configured limits
without waiting on inotify. When the database is unreachable the loop keeps watching but
stops advancing (offsets stay at the last commit) and retries on a capped backoff.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import os
import select
import signal
import socket
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

import psycopg
from sqlalchemy import Engine

from headspace_watcher import __version__, health
from headspace_watcher.checkpoints import PREFETCH_MAX, CheckpointStore, SourceState
from headspace_watcher.config import Config, mask_url
from headspace_watcher.db import init_db, make_engine
from headspace_watcher.events import Event, Rejection, SourcePosition
from headspace_watcher.retry import RetryPolicy, describe, is_transient
from headspace_watcher.sessions import SessionTracker
from headspace_watcher.tailer import (
    FileReplaced,
    ReadResult,
    TreeWatcher,
    content_matches,
    identity,
    read_lines,
)
from headspace_watcher.transcript import FileContext, file_context, parse_line
from headspace_watcher.writer import (
    Batch,
    BatchRefused,
    CheckpointConflict,
    EventWriter,
    SourceAdvance,
    WriteAborted,
    WriteFailed,
)

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_CONFIG, EXIT_LOCKED = 0, 1, 2, 4
RESCAN_INTERVAL_S = 10.0  # only when the inotify watch limit was reached
# source_seq of an unreadable-file record: its position is the checkpoint the read failed at,
# set apart from the lines' own sequence numbers (0 and 1) at that offset.
UNREADABLE_SEQ = -1
HELD_RETRY_MAX_S = 300.0
TRIM_AFTER_BYTES = 1 << 20  # ingested since the last malloc_trim (see _release_free_memory)
_LOCK_NAMESPACE = 0x4853  # "HS"


class ShutdownDeadline(BaseException):
    """Raised in the main thread when a graceful stop overruns its time budget."""


@dataclass(slots=True)
class TrackedFile:
    path: str
    ctx: FileContext
    source: SourceState
    size: int = 0
    partial: int = 0  # bytes after the last complete line at the last read
    error: str | None = None


@dataclass(slots=True)
class Counters:
    lines: int = 0
    turns: int = 0
    skipped: int = 0
    rejected_lines: int = 0
    batches: int = 0


@dataclass(slots=True)
class _Held:
    """A file whose own batch PostgreSQL refused: skipped until it changes or ``retry_at``."""

    reason: str
    retry_at: float
    failures: int
    size: int | None
    due: bool = False  # its retry is under way: read it whatever its size


@dataclass(slots=True)
class _Pending:
    """What a batch will change in memory once (and only if) it commits."""

    files: list[tuple[TrackedFile, ReadResult]] = field(default_factory=list)
    lines: int = 0
    bytes: int = 0


def _utcnow() -> datetime:
    return datetime.now(UTC)


class Service:
    """See the module docstring. ``run()`` returns the process exit code."""

    def __init__(
        self,
        config: Config,
        *,
        clock: Callable[[], datetime] = _utcnow,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.clock = clock
        self.monotonic = monotonic
        fw = config.file_watcher
        self.limits = {
            "max_lines": fw["batch_max_lines"],
            "max_bytes": fw["batch_max_bytes"],
            "max_line": fw["max_line_bytes"],
            "chunk": fw["read_chunk_bytes"],
        }
        es = config.event_system
        self.retry = RetryPolicy(es["write_retry_attempts"], es["write_retry_delay_ms"] / 1000)
        self.url = config.resolved_database_url()
        self.engine: Engine = make_engine(
            self.url, connect_timeout=config.raw["database"]["connect_timeout_seconds"]
        )
        self.writer = EventWriter(self.engine, retry=self.retry, clock=clock)
        self.checkpoints = CheckpointStore(self.engine)
        self.tracker = SessionTracker(fw["inactivity_timeout"])
        self.watcher = TreeWatcher(config.projects_path)
        self.files: dict[str, TrackedFile] = {}
        self.dirty: dict[str, None] = {}  # insertion-ordered set: fair round robin
        self.unwatched: set[str] = set()  # registered mode: files of sessions not monitored
        self.counters = Counters()
        self.started_at = clock()
        self.state = "starting"
        self.db_ready = False
        self.db_failures = 0
        self.db_retry_at = 0.0
        self.last_error: str | None = None
        self.stopping = False
        self._refused = False  # another watcher holds the lock: leave its pid/status files
        self._lock_conn: psycopg.Connection[Any] | None = None
        self._had_lock = False  # once held, losing it to another watcher is waited out
        self._instance_fd: int | None = None  # flock on the state dir (health.lock_instance)
        self.held: dict[str, _Held] = {}
        self._isolate = 0  # batches still to build from one file each (after a refusal)
        self._wakeup_r, self._wakeup_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._next_beat = 0.0
        self._next_rescan = 0.0
        self._next_status = 0.0
        self._deleted: list[str] = []
        self._untrimmed = 0  # bytes ingested since the last _release_free_memory()

    # ================================================================== lifecycle
    def run(self, once: bool = False, early_signal: list[int] | None = None) -> int:
        """``early_signal``: stop signals caught before this object existed (start-up)."""
        self._install_signals()
        if early_signal:
            self._on_stop_signal(early_signal[0], None)
        try:
            self._lock_state_dir()
            health.write_pid(self.config.state_dir)
            self._log_ready()
            self._discover(self.watcher.start())
            self._connect()
            if once:
                return self._run_once()
            self._loop()
            return EXIT_OK
        except _AnotherWatcher as exc:
            log.error("refusing to start: %s", exc)
            self._refused = True
            return EXIT_LOCKED
        except ShutdownDeadline:
            log.warning("shutdown deadline reached; uncommitted batch rolled back (will re-read)")
            return EXIT_OK
        finally:
            self._close()

    def _lock_state_dir(self) -> None:
        """Before touching the state dir: its pid and status files may be a live one's."""
        try:
            self._instance_fd = health.lock_instance(self.config.state_dir)
        except health.InstanceLocked as exc:
            raise _AnotherWatcher(str(exc)) from None

    def _log_ready(self) -> None:
        log.info(
            "headspace-watcher %s starting: config %s, database %s, projects %s, mode %s",
            __version__,
            self.config.source,
            mask_url(self.url),
            self.config.projects_path,
            self.config.file_watcher["mode"],
            extra={"pid": os.getpid(), "state_dir": str(self.config.state_dir)},
        )

    def _close(self) -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)
        with contextlib.suppress(ValueError):
            signal.set_wakeup_fd(-1)
        self.state = "stopped"
        if not self._refused:
            with contextlib.suppress(Exception):
                self._write_status()
        self._drop_lock()
        with contextlib.suppress(Exception):
            self.engine.dispose()
        self.watcher.close()
        for fd in (self._wakeup_r, self._wakeup_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        if self._instance_fd is not None:  # last: the files above are ours until here
            health.remove_pid(self.config.state_dir)
            os.close(self._instance_fd)
            self._instance_fd = None
        log.info(
            "headspace-watcher stopped",
            extra={"events_written": self.writer.metrics.events_written},
        )

    # ================================================================== signals
    def _install_signals(self) -> None:
        signal.set_wakeup_fd(self._wakeup_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGTERM, self._on_stop_signal)
        signal.signal(signal.SIGINT, self._on_stop_signal)
        signal.signal(signal.SIGALRM, self._on_deadline)

    def _on_stop_signal(self, signum: int, _frame: FrameType | None) -> None:
        if self.stopping:
            return
        self.stopping = True
        budget = self.config.event_system["shutdown_timeout_seconds"]
        log.info("received %s; stopping", signal.Signals(signum).name)
        signal.setitimer(signal.ITIMER_REAL, max(0.2, budget - 0.5))

    def _on_deadline(self, _signum: int, _frame: FrameType | None) -> None:
        if self.stopping:
            raise ShutdownDeadline()

    # ================================================================== database
    def _connect(self) -> bool:
        """Schema + single-instance lock + durable state; False leaves us degraded."""
        if self.db_ready:
            return True
        try:
            init_db(self.engine)
            self._ensure_lock()
            self.tracker.load(self.engine)
            states = self.checkpoints.load_all()
            for tf in self.files.values():
                if tf.path in states:
                    tf.source = states[tf.path]
        except _AnotherWatcher as exc:
            if not self._had_lock:
                raise  # at start-up: refuse, the other one is the service
            self._lock_taken_over(exc)
            return False
        except Exception as exc:
            self._db_failed(exc)
            return False
        self.db_ready = True
        self.db_failures = 0
        if self.state != "healthy":
            log.info(
                "ready: database reachable; ingesting",
                extra={
                    "database": mask_url(self.url),
                    "transcripts_found": len(self.dirty) + len(self.files),
                    "sessions_active": self.tracker.active_count,
                },
            )
        self.state = "healthy"
        self._mark_all_dirty()
        return True

    def _ensure_lock(self) -> None:
        """One watcher per host and projects tree: a second one refuses to start.

        The advisory lock lives on a connection of its own, taken out of the pool for the
        process's life: back in the pool its session (and the lock) would live on, and the
        next try to take it would fail against ourselves. The key is the tree's real path, so
        an alias through a symlink is the same tree.
        """
        if self._lock_held():
            return
        self._drop_lock()
        pooled = self.engine.raw_connection()
        conn = pooled.driver_connection
        assert isinstance(conn, psycopg.Connection)
        pooled.detach()  # closing it now really ends the session, and the lock with it
        try:
            conn.rollback()
            conn.autocommit = True
            row = conn.execute(
                "SELECT pg_try_advisory_lock(%s, hashtext(%s))", (_LOCK_NAMESPACE, self._lock_key())
            ).fetchone()
        except BaseException:
            conn.close()
            raise
        if not row or not row[0]:
            conn.close()
            raise _AnotherWatcher(
                f"another headspace-watcher already watches {self.config.projects_path} "
                f"on {socket.gethostname()} with this database"
            )
        self._lock_conn = conn
        self._had_lock = True

    def _lock_key(self) -> str:
        real = os.path.realpath(self.config.projects_path)
        return f"headspace-watcher:{socket.gethostname()}:{real}"

    def _lock_held(self) -> bool:
        """Is the lock's session still ours? A look at its socket, no round trip: a session
        that was terminated or lost has sent its FATAL message or closed, so it is readable.
        Only then a query tells (an idle session may also have sent a parameter update)."""
        conn = self._lock_conn
        if conn is None or conn.closed:
            return False
        try:
            readable, _, _ = select.select([conn.fileno()], [], [], 0)
        except (OSError, ValueError, psycopg.Error):
            return False
        if not readable:
            return True
        try:
            conn.execute("SELECT 1")
        except psycopg.Error:
            return False
        return True

    def _check_lock(self) -> bool:
        """False (and reconnect soon) when the lock's session was lost: re-taken then."""
        if self._lock_held():
            return True
        log.warning("single-instance lock lost (its connection ended); taking it again")
        self._drop_lock()
        self.db_ready = False
        self.db_retry_at = 0.0
        return False

    def _lock_taken_over(self, exc: _AnotherWatcher) -> None:
        """Another watcher took the lock while ours was lost: write nothing, wait for it."""
        if self.last_error != str(exc):
            log.error("single-instance lock held by another watcher; not writing, waiting")
        self.db_ready = False
        self.db_failures += 1
        self.last_error = str(exc)
        self.db_retry_at = self.monotonic() + self.retry.capped(self.db_failures)
        self.state = "degraded"
        self._write_status()

    def _drop_lock(self) -> None:
        if self._lock_conn is not None:
            with contextlib.suppress(Exception):
                self._lock_conn.close()
            self._lock_conn = None

    def _db_failed(self, exc: BaseException) -> None:
        """Degraded: hold every offset, retry on a capped backoff, on fresh connections
        (a session keeps what it started with, e.g. a database since set read-only)."""
        self.db_ready = False
        with contextlib.suppress(Exception):
            self.engine.dispose()
        self.db_failures += 1
        self.last_error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        delay = self.retry.capped(self.db_failures)
        self.db_retry_at = self.monotonic() + delay
        if self.state != "degraded":
            log.error(
                "database unavailable; holding position and retrying",
                extra={"error": self.last_error[:300], "retry_in_s": round(delay, 2)},
            )
        self.state = "degraded"
        self._write_status()

    # ================================================================== main loops
    def _run_once(self) -> int:
        while not self.stopping:
            if not self.db_ready and not self._connect():
                log.error("database unreachable; --once cannot finish")
                return EXIT_FAILED
            if self.dirty:
                if not self._step():
                    return EXIT_FAILED
                continue
            if not self._end_due_sessions():
                return EXIT_FAILED
            if not self.dirty:
                break
        self._write_status()
        log.info(
            "caught up",
            extra={
                "lines": self.counters.lines,
                "turns": self.counters.turns,
                "rejected": self.counters.rejected_lines,
            },
        )
        return EXIT_OK

    def _loop(self) -> None:
        while not self.stopping:
            self._wait(self._timeout())
            if self.stopping:
                break
            now = self.monotonic()
            if not self.db_ready and (now < self.db_retry_at or not self._connect()):
                self._maybe_beat(now)
                continue
            if self.dirty:
                self._step()
                if not self.dirty and self._untrimmed >= TRIM_AFTER_BYTES:
                    self._untrimmed = 0
                    _release_free_memory()  # backlog drained: give its heap back
            else:
                self._end_due_sessions()
            self._maybe_rescan(now)
            self._retry_held(now)
            self._maybe_beat(now)

    def _timeout(self) -> float | None:
        now = self.monotonic()
        waits = [self._next_beat - now]
        if not self.db_ready:
            waits.append(self.db_retry_at - now)
        elif self.dirty:
            return 0.0
        deadline = self.tracker.next_deadline()
        if deadline is not None and self.db_ready:
            waits.append((deadline - self.clock()).total_seconds())
        if self.watcher.watch_limit_reached:
            waits.append(self._next_rescan - now)
        if self.held and self.db_ready:
            waits.append(min(h.retry_at for h in self.held.values()) - now)
        return max(0.0, min(waits))

    def _wait(self, timeout: float | None) -> None:
        """Sleep in poll() on inotify + the signal wakeup pipe: no CPU while idle."""
        poller = select.poll()
        poller.register(self.watcher.fileno(), select.POLLIN)
        poller.register(self._wakeup_r, select.POLLIN)
        ms = None if timeout is None else int(timeout * 1000) + (1 if timeout > 0 else 0)
        poller.poll(ms)
        with contextlib.suppress(OSError):
            os.read(self._wakeup_r, 512)
        changes = self.watcher.read(0)
        if changes.rescan:
            self._discover(self.watcher.rescan())
        for path in changes.deleted:
            self._file_deleted(path)
        self._discover(changes.dirty)

    def _maybe_beat(self, now: float) -> None:
        if now < self._next_beat:
            return
        self._next_beat = now + self.config.raw["health"]["heartbeat_interval_seconds"]
        if self.config.file_watcher["mode"] == "registered" and self.db_ready:
            with contextlib.suppress(Exception):
                self.tracker.load(self.engine)
                self._drop_unmonitored()
                self._discover(list(self.unwatched))
        if self.db_ready:
            self._check_lock()
        self._write_status()
        if self.db_ready:
            try:
                health.beat(self.engine, self.config, self.snapshot())
            except Exception as exc:
                log.warning("heartbeat failed", extra={"error": str(exc).splitlines()[0][:200]})

    def _drop_unmonitored(self) -> None:
        """Registered mode: stop reading files of sessions unregistered since (after a load)."""
        if self.config.file_watcher["mode"] != "registered":
            return
        for path, tf in list(self.files.items()):
            if not self._wanted(path, tf.ctx):
                self.files.pop(path, None)
                self.dirty.pop(path, None)
                self.unwatched.add(path)

    def _maybe_status(self) -> None:
        """Keep status.json fresh after writes without paying for it on every commit."""
        now = self.monotonic()
        if now >= self._next_status:
            self._next_status = now + 1.0
            self._write_status()

    def _maybe_rescan(self, now: float) -> None:
        if self.watcher.watch_limit_reached and now >= self._next_rescan:
            self._next_rescan = now + RESCAN_INTERVAL_S
            self._discover(self.watcher.rescan())

    # ================================================================== discovery
    def _discover(self, paths: Any) -> None:
        for path in paths:
            self.dirty[path] = None

    def _mark_all_dirty(self) -> None:
        for path in self.files:
            self.dirty[path] = None

    def _flush_deleted(self) -> None:
        """Deletions seen while building a batch are acted on once it is out of the way."""
        deleted, self._deleted = self._deleted, []
        for path in deleted:
            self._file_deleted(path)

    def _file_deleted(self, path: str) -> None:
        self.dirty.pop(path, None)
        self.held.pop(path, None)
        tf = self.files.pop(path, None)
        if tf is None or not self.db_ready:
            return
        session = tf.ctx.session_hint
        if tf.ctx.subagent_hint is None and session and Path(path).stem == session:
            info = self.tracker.get(session)
            if info is not None and info.state == "active":
                self._end_sessions([(session, "closed", self.clock())])

    def _track(self, path: str) -> TrackedFile | None:
        """The file's state, creating/validating its checkpoint; None if not to be read now."""
        tf = self.files.get(path)
        if tf is not None:
            return tf
        ctx = file_context(path, self.config.projects_path)
        if not self._wanted(path, ctx):
            self.unwatched.add(path)
            return None
        self.unwatched.discard(path)
        ident = identity(path)
        state = self.checkpoints.register(path, ident.inode, ident.device)
        state = self._reconcile(state, path, ident.inode, ident.device, ident.size)
        tf = TrackedFile(path, ctx, state, size=ident.size)
        self.files[path] = tf
        return tf

    def _prefetch_sources(self) -> None:
        """Register the checkpoints of many new files in one transaction (a catch-up of a
        tree), instead of one transaction each in ``_track``."""
        if self.config.file_watcher["mode"] != "all":
            return
        new: list[tuple[str, int, int]] = []
        for path in self.dirty:
            if path not in self.files and not self.checkpoints.prefetched(path):
                with contextlib.suppress(OSError):
                    ident = identity(path)
                    new.append((path, ident.inode, ident.device))
                if len(new) >= PREFETCH_MAX:
                    break
        if len(new) > 1:
            try:
                self.checkpoints.prefetch(new)
            except Exception as exc:
                if is_transient(exc):
                    raise
                # one of them is refused: register them one by one instead (_track_or_hold)
                log.warning("prefetch of new files refused", extra={"error": describe(exc)})

    def _wanted(self, path: str, ctx: FileContext) -> bool:
        if self.config.file_watcher["mode"] != "registered":
            return True
        session = ctx.session_hint or _first_session_id(path)
        return session is not None and session in self.tracker.monitored()

    def _reconcile(
        self, state: SourceState, path: str, inode: int, device: int, size: int
    ) -> SourceState:
        """Same file as the checkpoint describes? Else rebind (same bytes) or new generation."""
        same_inode = (state.inode, state.device) == (inode, device)
        grown = size >= state.committed_offset
        if same_inode and grown and state.fingerprint is None:
            return state  # nothing to compare the bytes with: trust the inode
        if grown and content_matches(path, state.committed_offset, state.fingerprint):
            if same_inode:
                return state
            log.info("file replaced by a copy; continuing at checkpoint", extra={"path": path})
            return self.checkpoints.rebind(state, inode, device)
        log.warning(
            "file truncated or replaced; reading it from the start as a new generation",
            extra={"path": path, "checkpoint": state.committed_offset, "size": size},
        )
        return self.checkpoints.new_generation(state, inode, device)

    # ================================================================== ingest
    def _step(self) -> bool:
        """Build one bounded batch from dirty files and write it. False if the DB failed."""
        try:
            return self._build_and_write()
        finally:
            self._flush_deleted()

    def _build_and_write(self) -> bool:
        if not self._check_lock():
            return False
        isolating = self._isolate > 0
        try:
            batch, pending = self._build_batch(one_file=isolating)
        except Exception as exc:  # database errors while registering sources
            self.tracker.rollback()
            self._db_failed(exc)
            return False
        if not batch:
            return True
        if isolating:
            self._isolate -= 1
        try:
            result = self.writer.write_batch(batch, should_abort=lambda: self.stopping)
        except BatchRefused as exc:
            self._rollback(pending)
            self._refused_batch(pending, str(exc), isolating)
            return True
        except CheckpointConflict as exc:
            log.warning("checkpoint moved under us; reloading", extra={"error": str(exc)})
            self._rollback(pending)
            try:
                self._reload_checkpoints(pending)
                self.tracker.load(self.engine)  # a session may have been ended (unregister)
            except Exception as reload_exc:
                self._db_failed(reload_exc)
                return False
            self._drop_unmonitored()
            return True
        except Exception as exc:
            self._rollback(pending)
            if not isinstance(exc, WriteFailed | WriteAborted):
                log.exception("unexpected write error; will retry")
            self._db_failed(exc)
            return False
        self._committed(pending, result.lost)
        self._maybe_status()
        return True

    def _refused_batch(self, pending: _Pending, reason: str, isolating: bool) -> None:
        """A batch PostgreSQL refused even line by line: find its file, hold it, go on.

        Several files: the next batches take one file each, so the others are stored and
        only the culprit's own batch fails again. One file (or while isolating): that file
        is held, with a durable record, and retried later or when it changes.
        """
        files = [tf for tf, _res in pending.files]
        if not files:  # records of unreadable files only: they are made again on a change
            log.error("records refused by the database", extra={"error": reason[:300]})
            return
        if len(files) > 1 and not isolating:
            log.warning(
                "batch refused by the database; retrying it file by file",
                extra={"files": len(files), "error": reason[:300]},
            )
            self._isolate = len(files)
            return
        for tf in files:
            self._hold(tf.path, reason)

    def _hold(self, path: str, reason: str) -> None:
        """Skip ``path`` until it changes or a capped backoff passes; record it once."""
        self.dirty.pop(path, None)
        previous = self.held.get(path)
        failures = previous.failures + 1 if previous else 1
        delay = min(HELD_RETRY_MAX_S, self.retry.capped(failures) * 2**failures)
        try:
            size: int | None = os.stat(path).st_size
        except OSError:
            size = None
        self.held[path] = _Held(reason, self.monotonic() + delay, failures, size)
        if previous is not None and previous.reason == reason:
            return
        log.error(
            "file held: the database refuses its lines; other files go on",
            extra={"path": path, "error": reason[:300], "retry_in_s": round(delay, 1)},
        )
        # no source position: the record is about the file, not one of its lines (those are
        # all stored once the file is released), so it must not count as a line's rejection
        record = Rejection(f"file_held: {reason}", b"", path, None, 0, None)
        try:
            self.writer.write_batch(Batch(rejections=[record]))
        except Exception as exc:
            log.error("cannot record the held file", extra={"path": path, "error": str(exc)[:300]})

    def _held_now(self, path: str) -> bool:
        """Still held: not due for a retry and unchanged since it was held."""
        held = self.held.get(path)
        if held is None or held.due:
            return False
        try:
            size: int | None = os.stat(path).st_size
        except OSError:
            size = None
        return self.monotonic() < held.retry_at and size == held.size

    def _retry_held(self, now: float) -> None:
        """Due ones are read again, once: the attempt holds them again, or releases them."""
        for path, held in self.held.items():
            if now >= held.retry_at:
                held.retry_at = math.inf  # once: a new hold sets the next retry
                held.due = True
                self.dirty[path] = None

    def _build_batch(self, one_file: bool = False) -> tuple[Batch, _Pending]:
        batch = Batch()
        pending = _Pending()
        self._prefetch_sources()
        for path in list(self.dirty):
            if (
                pending.lines >= self.limits["max_lines"]
                or pending.bytes >= self.limits["max_bytes"]
                or (one_file and pending.files)
            ):
                break
            if self._held_now(path):
                self.dirty.pop(path, None)
                continue
            try:
                tf = self._track_or_hold(path)
                if tf is None:
                    self.dirty.pop(path, None)
                    continue
                res = self._read(tf, pending)
            except FileNotFoundError:
                self.dirty.pop(path, None)
                self._deleted.append(path)
                continue
            except OSError as exc:
                self._unreadable(path, exc, batch)
                continue
            if res is None:
                continue
            if not res.more:
                self.dirty.pop(path, None)
            if res.end_offset == tf.source.committed_offset:
                continue
            self._to_events(tf, res, batch)
            pending.files.append((tf, res))
            pending.lines += res.count
            pending.bytes += res.end_offset - res.start
        return batch, pending

    def _read(self, tf: TrackedFile, pending: _Pending) -> ReadResult | None:
        try:
            res = read_lines(
                tf.path,
                tf.source.committed_offset,
                tf.source.inode,
                max_lines=self.limits["max_lines"] - pending.lines,
                max_bytes=self.limits["max_bytes"] - pending.bytes,
                max_line=self.limits["max_line"],
                chunk=self.limits["chunk"],
                fingerprint=tf.source.fingerprint,
            )
        except FileReplaced as exc:
            ident = exc.identity
            tf.source = self._reconcile(tf.source, tf.path, ident.inode, ident.device, ident.size)
            return None  # still dirty: read again on the next step with the new state
        tf.error = None
        tf.size = res.size
        tf.partial = 0 if res.more else res.size - res.end_offset
        return res

    def _to_events(self, tf: TrackedFile, res: ReadResult, batch: Batch) -> None:
        src = tf.source
        now = self.clock()
        for offset, raw in res.lines:
            out = parse_line(raw, tf.ctx)
            self.counters.lines += 1
            pos = SourcePosition(src.source_id, src.generation, offset, 0)
            if out.kind == "reject":
                self.counters.rejected_lines += 1
                batch.rejections.append(
                    Rejection(out.reason or "rejected", raw, tf.path, offset, len(raw), pos)
                )
                continue
            seq = 0
            if out.session_uuid and (out.kind == "turn" or out.timestamp is not None):
                at = min(out.timestamp, now) if out.timestamp else now
                reg, change = self.tracker.observe(
                    out.session_uuid, at, out.project_path, out.project_path, pos
                )
                batch.sessions.append(change)
                if reg is not None:
                    batch.events.append(reg)
                    seq = 1
            if out.kind == "turn" and out.payload is not None:
                self.counters.turns += 1
                if out.payload.get("sanitized"):
                    log.warning(
                        "unstorable characters (NUL or lone surrogate) replaced by U+FFFD",
                        extra={"path": tf.path, "offset": offset},
                    )
                ts = out.timestamp or datetime.fromisoformat(out.payload["turn_timestamp"])
                batch.events.append(
                    Event(
                        "turn_detected",
                        out.payload,
                        ts,
                        project_path=out.project_path,
                        agent_key=out.session_uuid,
                        position=SourcePosition(src.source_id, src.generation, offset, seq),
                    )
                )
            else:
                self.counters.skipped += 1
        for over in res.oversized:
            self.counters.lines += 1
            self.counters.rejected_lines += 1
            batch.rejections.append(
                Rejection(
                    f"line_too_long: {over.length} bytes > max_line_bytes "
                    f"{self.limits['max_line']}",
                    over.head,
                    tf.path,
                    over.offset,
                    over.length,
                    SourcePosition(src.source_id, src.generation, over.offset, 0),
                )
            )
        batch.advances.append(
            SourceAdvance(
                src.source_id, src.generation, res.start, res.end_offset, res.count, res.fingerprint
            )
        )

    def _track_or_hold(self, path: str) -> TrackedFile | None:
        """``_track``, holding the file when PostgreSQL refuses its checkpoint row for good."""
        try:
            return self._track(path)
        except Exception as exc:
            if is_transient(exc) or isinstance(exc, OSError):
                raise
            self._hold(path, describe(exc))
            return None

    def _committed(self, pending: _Pending, lost: set[tuple[str, str]]) -> None:
        for tf, res in pending.files:
            if self.held.pop(tf.path, None) is not None:
                log.info("held file stored again", extra={"path": tf.path})
            tf.source.committed_offset = res.end_offset
            tf.source.fingerprint = res.fingerprint
            tf.source.lines_committed += res.count
        self._untrimmed += pending.bytes
        self.tracker.commit()
        for _kind, session in lost:  # someone else (CLI) decided first: adopt their view
            self.tracker.forget(session)
        if lost:
            self.tracker.load(self.engine)
        self.counters.batches += 1

    def _rollback(self, pending: _Pending) -> None:
        self.tracker.rollback()
        for tf, _res in pending.files:
            self.dirty[tf.path] = None

    def _reload_checkpoints(self, pending: _Pending) -> None:
        for tf, _res in pending.files:
            fresh = self.checkpoints.load(tf.path)
            if fresh is not None:
                tf.source = fresh

    def _unreadable(self, path: str, exc: OSError, batch: Batch) -> None:
        """Log once and leave a durable record; retried when the file changes again."""
        self.dirty.pop(path, None)
        reason = f"unreadable_file: {exc.strerror or exc}"
        tf = self.files.get(path)
        if tf is not None and tf.error == reason:
            return
        if tf is not None:
            tf.error = reason
        log.error("cannot read transcript", extra={"path": path, "error": reason})
        position = None
        if tf is not None:  # one record per file and checkpoint, across restarts too
            src = tf.source
            position = SourcePosition(
                src.source_id, src.generation, src.committed_offset, UNREADABLE_SEQ
            )
        batch.rejections.append(Rejection(reason, b"", path, None, 0, position))

    # ================================================================== sessions
    def _end_due_sessions(self) -> bool:
        due = self.tracker.due(self.clock())
        if not due:
            return True
        return self._end_sessions([(s, "timeout", at) for s, at in due[:500]])

    def _end_sessions(self, ends: list[tuple[str, str, datetime]]) -> bool:
        batch = Batch()
        for session, reason, at in ends:
            event, change = self.tracker.end(session, reason, at)
            batch.events.append(event)
            batch.sessions.append(change)
        try:
            result = self.writer.write_batch(batch, should_abort=lambda: self.stopping)
        except (WriteFailed, WriteAborted) as exc:
            self.tracker.rollback()
            self._db_failed(exc)
            return False
        except BatchRefused as exc:  # not retried: the next load decides again
            self.tracker.rollback()
            log.error("cannot end sessions", extra={"error": str(exc)[:300]})
            for session, _reason, _at in ends:
                self.tracker.forget(session)
            return True
        self.tracker.commit()
        if result.lost:
            self.tracker.load(self.engine)
        for session, reason, _at in ends:
            log.info("session ended", extra={"session_uuid": session, "reason": reason})
        return True

    # ================================================================== health
    def lag_bytes(self) -> int:
        lag = 0
        for tf in self.files.values():
            try:
                size = os.stat(tf.path).st_size
            except OSError:
                continue
            partial = tf.partial if size == tf.size else 0
            lag += max(0, size - tf.source.committed_offset - partial)
        return lag

    def snapshot(self) -> dict[str, Any]:
        m = self.writer.metrics
        now = self.clock()
        return {
            "service_state": self.state,
            "state": self.state,
            "pid": os.getpid(),
            "version": __version__,
            "started_at": self.started_at.isoformat(),
            "uptime_seconds": round((now - self.started_at).total_seconds(), 1),
            "updated_at": now.isoformat(),
            "database": mask_url(self.url),
            "database_reachable": self.db_ready,
            "last_write_at": m.last_write_at.isoformat() if m.last_write_at else None,
            "events_written": m.events_written,
            "failed_writes": m.failed_writes,
            "rejected": m.rejected,
            "duplicates_skipped": m.duplicates,
            "lag_bytes": self.lag_bytes(),
            "sessions_watched": self.tracker.active_count,
            "files_watched": len(self.files),
            "files_held": len(self.held),
            "lines_read": self.counters.lines,
            "turns": self.counters.turns,
            "skipped": self.counters.skipped,
            "projects_path": str(self.config.projects_path),
            "projects_path_present": self.watcher.root_present,
            "last_error": self.last_error,
        }

    def _write_status(self) -> None:
        try:
            health.write_status(self.config.state_dir, self.snapshot())
        except OSError as exc:
            log.warning("cannot write status file", extra={"error": str(exc)})


class _AnotherWatcher(Exception):
    pass


_MALLOC_TRIM: Any = None


def _release_free_memory() -> None:
    """Return freed heap pages to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    glibc keeps what a backlog's batches freed (its trim threshold grows with the largest
    buffers seen), ~10 MB after a catch-up that the idle service would otherwise hold forever.
    """
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        try:
            _MALLOC_TRIM = ctypes.CDLL(None).malloc_trim
        except (OSError, AttributeError):
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


def _first_session_id(path: str) -> str | None:
    """Peek at a hint-less file's first lines for its sessionId (registered mode only)."""
    import json

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # a FIFO must not block
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            return None
        with open(fd, "rb") as f:
            for _ in range(20):
                line = f.readline(1 << 20)
                if not line.endswith(b"\n"):
                    return None
                with contextlib.suppress(ValueError):
                    sid = json.loads(line).get("sessionId")
                    if isinstance(sid, str) and sid:
                        return sid
    except (OSError, AttributeError):
        return None
    return None
