"""The watcher process's loop: sources → ingest → store, in one thread.

One loop, no queues: the only buffers are what the sources know may be new and the batch
being written, both bounded. When lines arrive one at a time each is committed at once;
when there is a backlog, the loop keeps building batches up to the configured limits
without waiting. When the database is unreachable the loop keeps watching but stops
advancing (offsets stay at the last commit) and retries on a capped backoff. The loop knows
sources only through their contract (``sources``) and the database only through ``Store``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from headspace_watcher import __version__
from headspace_watcher.config import ENV_PROJECTS_PATH, Config, ConfigError, mask_url, redact_text
from headspace_watcher.errors import (
    AnotherInstance,
    BatchRefused,
    CheckpointConflict,
    WriteAborted,
    WriteFailed,
)
from headspace_watcher.ingest.derive import Deriving
from headspace_watcher.ingest.sessions import SessionTracker
from headspace_watcher.records import Batch, Chunk, FileContext, Rejection
from headspace_watcher.service import health
from headspace_watcher.service.lifecycle import (
    ShutdownDeadline,
    StopSignals,
    fix_mmap_threshold,
    release_free_memory,
)
from headspace_watcher.sources import Budget, Source
from headspace_watcher.sources.reader import first_session_id
from headspace_watcher.sources.transcripts import ReadLimits, TranscriptSource, path_problem
from headspace_watcher.store import Store
from headspace_watcher.store.embedded import database_url
from headspace_watcher.store.retry import RetryPolicy

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_LOCKED = 0, 1, 4
TRIM_AFTER_BYTES = 1 << 20  # ingested since the last release_free_memory()
TRIM_AFTER_FILES = 100  # forgotten at once (their sessions ended)
STATUS_EVERY_S = 1.0
END_ROUND = 500  # sessions ended in one transaction
# Streams in one batch: each costs its state and a session's rows besides its lines, so a
# tree of tiny files would otherwise grow a batch's memory with the files it packs in.
STREAMS_PER_BATCH = 128
_MAX_END_ROUNDS = 1000  # END_ROUND sessions each: a bound, never reached by a real tree


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
        es = config.event_system
        self.batch_lines = fw.batch_max_lines
        self.batch_bytes = fw.batch_max_bytes
        self.retry = RetryPolicy(es.write_retry_attempts, es.write_retry_delay_ms / 1000)
        self.url = database_url(config)
        self.store = Store(
            self.url,
            connect_timeout=config.database.connect_timeout_seconds,
            retry=self.retry,
            clock=clock,
        )
        self.tracker = SessionTracker(fw.inactivity_timeout)
        self.deriving = Deriving(self.tracker, fw.max_line_bytes, clock)
        registered = fw.mode == "registered"
        transcripts = TranscriptSource(
            config.projects_path,
            self.store.checkpoints,
            ReadLimits(fw.max_line_bytes, fw.read_chunk_bytes),
            wanted=self._monitored if registered else None,
            settled=self._settled,
            monotonic=monotonic,
        )
        # the loop knows its sources only by the contract in sources/__init__.py: the hook
        # spool (or any other source) is one more entry here
        self.sources: list[Source] = [transcripts]
        self.signals = StopSignals(es.shutdown_timeout_seconds)
        # the tree's real path: an alias through a symlink is the same tree
        real_root = os.path.realpath(config.projects_path)
        self.lock = self.store.lock(
            f"headspace-watcher:{socket.gethostname()}:{real_root}",
            f"watches {config.projects_path} on {socket.gethostname()} with this database",
        )
        self.started_at = clock()
        self.state = "starting"
        self.db_ready = False
        self.db_failures = 0
        self.db_retry_at = 0.0
        self.last_error: str | None = None
        self._instance_fd: int | None = None  # flock on the state dir: its files are ours
        self._isolate = 0  # batches still to build from one stream each (after a refusal)
        self._next_beat = 0.0
        self._ticks: dict[str, float | None] = {}  # when each source wants its next tick
        self._next_status = 0.0
        self._status_stale = False  # changed since status.json was last written
        self._untrimmed = 0  # bytes ingested since the last release_free_memory()
        self._quiet_floor = 0  # timed-out sessions that still had unread lines, last look
        self.checkpoint_conflicts = 0  # batches refused by the guard (0 in steady state)

    @property
    def stopping(self) -> bool:
        return self.signals.stopping

    # ================================================================== lifecycle
    def run(self, once: bool = False, early_signal: list[int] | None = None) -> int:
        self.signals.install(early_signal)
        fix_mmap_threshold()
        try:
            if once:
                self._require_projects_path()
            # before touching the state dir: its pid and status files may be a live one's
            self._instance_fd = health.lock_instance(self.config.state_dir)
            health.write_pid(self.config.state_dir)
            self._log_ready()
            for source in self.sources:
                source.start()
            self._connect()
            if once:
                return self._run_once()
            self._loop()
            return EXIT_OK
        except AnotherInstance as exc:
            log.error("refusing to start: %s", exc)
            return EXIT_LOCKED
        except ShutdownDeadline:
            log.warning("shutdown deadline reached; uncommitted batch rolled back (will re-read)")
            return EXIT_OK
        finally:
            self._close()

    def _require_projects_path(self) -> None:
        """``--once`` on a tree that is not there would report "caught up" on nothing: a
        mistyped path is an error (``run`` waits for it instead, and says so in status)."""
        problem = path_problem(self.config.projects_path)
        if problem:
            raise ConfigError(
                f"projects path {self.config.projects_path} {problem} (set "
                f"{ENV_PROJECTS_PATH} or file_watcher.projects_path to the directory of "
                "Claude Code's transcripts, e.g. ~/.claude/projects)"
            )

    def _log_ready(self) -> None:
        log.info(
            "headspace-watcher %s starting: config %s, database %s, projects %s, mode %s",
            __version__,
            self.config.source,
            mask_url(self.url),
            self.config.projects_path,
            self.config.file_watcher.mode,
            extra={"pid": os.getpid(), "state_dir": str(self.config.state_dir)},
        )

    def _close(self) -> None:
        self.signals.close()
        self.state = "stopped"
        if self._instance_fd is not None:
            with contextlib.suppress(Exception):
                self._write_status()
        self.lock.release()
        with contextlib.suppress(Exception):
            self.store.close()
        for source in self.sources:
            source.close()
        if self._instance_fd is not None:  # last: the files above are ours until here
            health.remove_pid(self.config.state_dir)
            os.close(self._instance_fd)
            self._instance_fd = None
        log.info(
            "headspace-watcher stopped", extra={"events_written": self.store.metrics.events_written}
        )

    # ================================================================== database
    def _connect(self) -> bool:
        """Schema + single-instance lock + durable state; False leaves us degraded."""
        if self.db_ready:
            return True
        try:
            self.store.init()
            self.lock.acquire()
            self.tracker.load(self.store.load_sessions())
            for source in self.sources:
                source.reload()
        except AnotherInstance as exc:
            if not self.lock.ever_held:
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
                    "streams_found": sum(s.found() for s in self.sources),
                    "sessions_active": self.tracker.active_count,
                },
            )
        self.state = "healthy"
        return True

    def _check_lock(self) -> bool:
        """False (and reconnect soon) when the lock's session was lost: re-taken then."""
        if self.lock.held():
            return True
        log.warning("single-instance lock lost (its connection ended); taking it again")
        self.lock.release()
        self.db_ready = False
        self.db_retry_at = 0.0
        return False

    def _lock_taken_over(self, exc: AnotherInstance) -> None:
        """Another watcher took the lock while ours was lost: write nothing, wait for it."""
        if self.last_error != str(exc):
            log.error("single-instance lock held by another watcher; not writing, waiting")
        self.db_ready = False
        self.db_failures += 1
        self.last_error = str(exc)
        self.db_retry_at = self.monotonic() + self.retry.capped(self.db_failures)
        self.state = "degraded"
        self._write_status()

    def _db_failed(self, exc: BaseException) -> None:
        """Degraded: hold every offset, retry on a capped backoff, on fresh connections
        (a session keeps what it started with, e.g. a database since set read-only)."""
        self.db_ready = False
        self.store.reset_connections()
        self.db_failures += 1
        first = str(exc).splitlines()[0] if str(exc) else ""
        # a driver's message can quote the conninfo, password included
        self.last_error = redact_text(f"{type(exc).__name__}: {first}")
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
            if self._pending():
                if not self._step():
                    return EXIT_FAILED
                continue
            if not self._end_due_sessions():
                return EXIT_FAILED
            if not self._pending():
                break
        self._write_status()
        c = self.deriving.counters
        log.info(
            "caught up",
            extra={"lines": c.lines, "turns": c.turns, "rejected": c.rejected_lines},
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
            if self._pending():
                self._step()
                if not self._pending() and self._untrimmed >= TRIM_AFTER_BYTES:
                    self._untrimmed = 0
                    release_free_memory()  # backlog drained: give its heap back
            else:
                self._end_due_sessions()
            self._tick(now)
            self._maybe_beat(now)
            if self._status_stale:
                self._maybe_status()

    def _pending(self) -> bool:
        return any(source.pending() for source in self.sources)

    def _timeout(self) -> float:
        now = self.monotonic()
        waits = [self._next_beat - now]
        if not self.db_ready:
            waits.append(self.db_retry_at - now)
        elif self._pending():
            return 0.0
        deadline = self.tracker.next_deadline()
        if deadline is not None and self.db_ready:
            waits.append((deadline - self.clock()).total_seconds())
        if self.db_ready:
            waits += [t - now for t in self._ticks.values() if t is not None]
        if self._status_stale:
            waits.append(self._next_status - now)
        return max(0.0, min(waits))

    def _wait(self, timeout: float) -> None:
        """Sleep in poll() on the sources' descriptors + the signal pipe: no CPU while idle."""
        poller = select.poll()
        for source in self.sources:
            fd = source.fileno()
            if fd is not None:
                poller.register(fd, select.POLLIN)
        poller.register(self.signals.wakeup_r, select.POLLIN)
        poller.poll(int(timeout * 1000) + (1 if timeout > 0 else 0))
        self.signals.drain_wakeups()
        for source in self.sources:
            source.drain()
        self._end_closed_sessions()

    # ================================================================== ingest
    def _step(self) -> bool:
        """Read one bounded batch from the sources and write it. False if the DB failed."""
        if not self._check_lock():
            return False
        isolating = self._isolate > 0
        budget = Budget(self.batch_lines, self.batch_bytes, 1 if isolating else STREAMS_PER_BATCH)
        try:
            chunks = [c for source in self.sources for c in source.read(budget)]
        except Exception as exc:  # database errors while registering streams
            self._db_failed(exc)
            return False
        self._end_closed_sessions()
        if not chunks:
            return True
        if isolating:
            self._isolate -= 1
        batch = self.deriving.batch(chunks)
        ended = [] if isolating else self._end_quiet_sessions(batch)
        try:
            result = self.store.write_batch(batch, should_abort=lambda: self.stopping)
        except BatchRefused as exc:
            self._rolled_back(chunks)
            self._refused_batch(chunks, str(exc), isolating)
            return True
        except CheckpointConflict as exc:
            return self._conflict(chunks, exc)
        except Exception as exc:
            self._rolled_back(chunks)
            if not isinstance(exc, WriteFailed | WriteAborted):
                log.exception("unexpected write error; will retry")
            self._db_failed(exc)
            return False
        self._committed(chunks, result.lost)
        if ended:
            self._log_ended(ended, "timeout")
            self._sessions_changed()
        self._maybe_status()
        return True

    def _committed(self, chunks: list[Chunk], lost: set[tuple[str, str]]) -> None:
        for source in self.sources:
            source.committed(chunks)
        self._untrimmed += sum(c.nbytes for c in chunks)
        self.tracker.commit()
        for _kind, session in lost:  # someone else (CLI) decided first: adopt their view
            self.tracker.forget(session)
        if lost:
            self.tracker.load(self.store.load_sessions())
        self.deriving.counters.batches += 1

    def _rolled_back(self, chunks: list[Chunk]) -> None:
        self.tracker.rollback()
        for source in self.sources:
            source.rolled_back(chunks)

    def _refused_batch(self, chunks: list[Chunk], reason: str, isolating: bool) -> None:
        """A batch PostgreSQL refused even line by line: find its stream, hold it, go on.

        Several streams: the next batches take one stream each, so the others are stored
        and only the culprit's own batch fails again. One stream (or while isolating): that
        stream is held, with a durable record, and retried later or when it changes.
        """
        paths = sorted({c.path for c in chunks if c.failure is None})
        if not paths:  # records of unreadable files only: they are made again on a change
            log.error("records refused by the database", extra={"error": reason[:300]})
            return
        if len(paths) > 1 and not isolating:
            log.warning(
                "batch refused by the database; retrying it stream by stream",
                extra={"files": len(paths), "error": reason[:300]},
            )
            self._isolate = len(paths)
            return
        for path in paths:
            for source in self.sources:
                if source.hold(path, reason, self._held_delay):
                    self._record_held(path, reason)

    def _held_delay(self, failures: int) -> float:
        return self.retry.capped(failures) * 2**failures

    def _record_held(self, path: str, reason: str) -> None:
        """One dead-letter row about the file (no stream position: its lines are all stored
        once it is released, so this must not count as a line's rejection)."""
        record = Rejection(f"file_held: {reason}", b"", path, None, 0, None)
        try:
            self.store.write_batch(Batch(rejections=[record]))
        except Exception as exc:
            log.error("cannot record the held file", extra={"path": path, "error": str(exc)[:300]})

    def _conflict(self, chunks: list[Chunk], exc: CheckpointConflict) -> bool:
        log.warning("checkpoint moved under us; reloading", extra={"error": str(exc)})
        self.checkpoint_conflicts += 1
        self._rolled_back(chunks)
        try:
            self.tracker.load(self.store.load_sessions())  # a session may have been ended
            for source in self.sources:
                source.conflicted(chunks)
        except Exception as reload_exc:
            self._db_failed(reload_exc)
            return False
        return True

    # ================================================================== sessions
    def _monitored(self, path: str, ctx: FileContext) -> bool:
        """Registered mode: read only files of sessions registered for monitoring."""
        session = ctx.session_hint or first_session_id(path, str(self.config.projects_path))
        return session is not None and session in self.tracker.monitored()

    def _settled(self, ctx: FileContext) -> bool:
        """A caught-up file whose session is over (or that names none: a 2.0.x sub-agent's)
        needs no state in memory: the source forgets it until it changes again."""
        session = ctx.session_hint
        return session is None or not self.tracker.is_active(session)

    def _end_closed_sessions(self) -> None:
        """A session whose own transcript file was deleted has ended (reason ``closed``)."""
        if not self.db_ready:
            return
        ends = []
        for source in self.sources:
            for session in source.closed_sessions():
                info = self.tracker.get(session)
                if info is not None and info.state == "active":
                    ends.append((session, "closed", self.clock()))
        if ends:
            self._end_sessions(ends)

    def _end_due_sessions(self) -> bool:
        """Every session past its inactivity deadline, ``END_ROUND`` to a transaction."""
        for _ in range(_MAX_END_ROUNDS):
            due = self.tracker.due(self.clock())
            if not due or self.stopping:
                return True
            if not self._end_sessions([(s, "timeout", at) for s, at in due[:END_ROUND]]):
                return False
        return True

    def _end_quiet_sessions(self, batch: Batch) -> list[str]:
        """Add to ``batch`` the ends of up to ``END_ROUND`` timed-out sessions that nothing
        unread can still hold lines of, and that the batch itself does not touch; which.

        A catch-up over years of history then keeps a batch's worth of sessions (and their
        files) in memory, not all of them until the backlog is read, and ends them in the
        transactions it commits anyway. Each is still ended once, after its last line:
        ending one whose lines are still unread would register it again when they are read.
        """
        due = self.tracker.due(self.clock())
        if len(due) <= self._quiet_floor:  # all of them had unread lines at the last look
            return []
        ended: list[str] = []
        for session, at in due:
            if len(ended) == END_ROUND:
                break
            if self.tracker.touched(session) or self._may_hold(session):
                continue
            event, change = self.tracker.end(session, "timeout", at)
            batch.events.append(event)
            batch.sessions.append(change)
            ended.append(session)
        self._quiet_floor = len(due) - len(ended) if len(ended) < END_ROUND else 0
        return ended

    @staticmethod
    def _log_ended(sessions: list[str], reason: str) -> None:
        for session in sessions:
            log.info("session ended", extra={"session_uuid": session, "reason": reason})

    def _may_hold(self, session_uuid: str) -> bool:
        return any(source.may_hold(session_uuid) for source in self.sources)

    def _end_sessions(self, ends: list[tuple[str, str, datetime]]) -> bool:
        batch = Batch()
        for session, reason, at in ends:
            event, change = self.tracker.end(session, reason, at)
            batch.events.append(event)
            batch.sessions.append(change)
        try:
            result = self.store.write_batch(batch, should_abort=lambda: self.stopping)
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
            self.tracker.load(self.store.load_sessions())
        for session, reason, _at in ends:
            self._log_ended([session], reason)
        self._sessions_changed()
        self._maybe_status()
        return True

    # ================================================================== health
    def _maybe_beat(self, now: float) -> None:
        if now < self._next_beat:
            return
        self._next_beat = now + self.config.health.heartbeat_interval_seconds
        if self.config.file_watcher.mode == "registered" and self.db_ready:
            with contextlib.suppress(Exception):
                self.tracker.load(self.store.load_sessions())  # registrations by the CLI
                self._sessions_changed()
        if self.db_ready:
            self._check_lock()
        self._write_status()
        if self.db_ready:
            try:
                self.store.beat(health.watcher_id(self.config), self.snapshot())
            except Exception as exc:
                log.warning("heartbeat failed", extra={"error": str(exc).splitlines()[0][:200]})

    def _maybe_status(self) -> None:
        """Keep status.json fresh after writes without paying for it on every commit: at
        most once a second, and once more after the last change (``_timeout`` wakes the
        loop for it), not only at the next heartbeat."""
        now = self.monotonic()
        if now >= self._next_status:
            self._next_status = now + STATUS_EVERY_S
            self._write_status()
        else:
            self._status_stale = True

    def _sessions_changed(self) -> None:
        if sum(s.sessions_changed() for s in self.sources) >= TRIM_AFTER_FILES:
            release_free_memory()  # what those streams' state held goes back to the OS

    def _tick(self, now: float) -> None:
        for source in self.sources:
            self._ticks[source.name] = source.tick(now)

    def snapshot(self) -> dict[str, Any]:
        m = self.store.metrics
        c = self.deriving.counters
        now = self.clock()
        return {
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
            "checkpoint_conflicts": self.checkpoint_conflicts,
            "lag_bytes": sum(s.lag_bytes() for s in self.sources),
            "sessions_watched": self.tracker.active_count,
            "lines_read": c.lines,
            "turns": c.turns,
            "skipped": c.skipped,
            "last_error": self.last_error,
        } | {k: v for source in self.sources for k, v in source.health().items()}

    def _write_status(self) -> None:
        self._status_stale = False
        try:
            health.write_status(self.config.state_dir, self.snapshot())
        except OSError as exc:
            log.warning("cannot write status file", extra={"error": str(exc)})
