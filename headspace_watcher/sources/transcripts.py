"""The transcript tree as a source: every ``*.jsonl`` of ``~/.claude/projects``.

Discovery is ``sources.tree`` (inotify), reading is ``sources.reader`` (bounded, complete
lines only); this module keeps, per file, the checkpoint it was handed by the store and
decides what to read next: fair round robin over the files that may have new bytes, until
the batch's budget is spent. A file whose bytes no longer match its checkpoint (truncated,
replaced) is re-bound or moved to a new generation through ``Checkpoints`` — the source
never moves an offset itself (see the contract in ``sources``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from headspace_watcher.errors import StreamRefused
from headspace_watcher.records import Chunk, FileContext, StreamState
from headspace_watcher.sources import Budget, Checkpoints
from headspace_watcher.sources.layout import file_context, stream_owner
from headspace_watcher.sources.pending import PendingStreams
from headspace_watcher.sources.reader import (
    FileReplaced,
    OutsideTree,
    PartialScan,
    ReadResult,
    complete_end,
    content_matches,
    identity,
    read_lines,
)
from headspace_watcher.sources.tree import TreeWatcher

log = logging.getLogger(__name__)

KIND = "transcript"
RESCAN_INTERVAL_S = 10.0  # only when the inotify watch limit was reached
HELD_RETRY_MAX_S = 300.0
OUTSIDE_TREE_REASON = "outside_tree: symlink or path outside the projects root; not read"
REGISTER_MAX = 500  # new files registered in one transaction
LIST_AHEAD = 500  # pending files below which the next project folder is listed


@dataclass(slots=True)
class TrackedFile:
    path: str
    ctx: FileContext
    source: StreamState
    size: int = 0
    partial: int = 0  # bytes after the last complete line at the last read
    scan: PartialScan | None = None  # how far that trailing line was scanned (go on from there)
    error: str | None = None
    lag_at: tuple[int, int] = (-1, -1)  # (size, checkpoint) that lag_end was measured at
    lag_end: int = 0


@dataclass(slots=True)
class Held:
    """A file whose records the store refused even one by one: skipped until it changes or
    ``retry_at`` passes."""

    reason: str
    retry_at: float
    failures: int
    size: int | None
    due: bool = False  # its retry is under way: read it whatever its size


@dataclass(frozen=True, slots=True)
class ReadLimits:
    max_line: int
    chunk: int


class TranscriptSource:
    """The projects tree; see the module docstring and the contract in ``sources``."""

    name = "transcripts"

    def __init__(
        self,
        root: Path,
        checkpoints: Checkpoints,
        limits: ReadLimits,
        *,
        wanted: Callable[[str, FileContext], bool] | None = None,
        settled: Callable[[FileContext], bool] | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.root = root
        self.checkpoints = checkpoints
        self.limits = limits
        self.watcher = TreeWatcher(root)
        self._root = str(root)
        self._wanted = wanted
        self._settled = settled
        self.files: dict[str, TrackedFile] = {}
        # insertion-ordered: fair round robin; knows whose lines are still unread
        self.dirty = PendingStreams(lambda path: stream_owner(path, self._root))
        self.unwatched: set[str] = set()  # registered mode: files of sessions not monitored
        self._deleted: list[str] = []
        self._closed: list[str] = []
        self._monotonic = monotonic
        self.held: dict[str, Held] = {}
        self._next_rescan = 0.0
        # checkpoints handed over in bulk for files not tracked yet (taken by ``_track``)
        self._known: dict[str, StreamState] = {}

    # ------------------------------------------------------------------ what is new
    def start(self) -> None:
        self._discover(self.watcher.watch_tree())

    def fileno(self) -> int:
        return self.watcher.fileno()

    def drain(self) -> None:
        changes = self.watcher.read(0)
        if changes.rescan:
            self._discover(self.watcher.rescan())
        for path in changes.deleted:
            self._file_deleted(path)
        self._discover(changes.dirty)

    def rescan(self) -> None:
        self._discover(self.watcher.rescan())

    def pending(self) -> bool:
        return bool(self.dirty) or bool(self.watcher.unlisted)

    def mark_all_pending(self) -> None:
        for path in self.files:
            self.dirty.add(path)

    def refilter(self) -> None:
        """Registered mode: drop files of sessions no longer monitored, retry the others."""
        for path, tf in list(self.files.items()):
            if not self._is_wanted(path, tf.ctx):
                self.files.pop(path, None)
                self.dirty.discard(path)
                self.unwatched.add(path)
        self._discover(list(self.unwatched))

    def _discover(self, paths: Iterable[str]) -> None:
        for path in paths:
            self.dirty.add(path)

    # ------------------------------------------------------------------ reading
    def read(self, budget: Budget) -> list[Chunk]:
        """Chunks of complete lines from dirty files, fair round robin, within ``budget``.

        Deletions seen meanwhile are acted on afterwards (``closed_sessions``).
        """
        chunks: list[Chunk] = []
        self._list_ahead()
        self._register_new()
        for path in list(self.dirty):
            if budget.exhausted:
                break
            if self._held_now(path):
                self.dirty.discard(path)
                continue
            chunk = self._read_file(path, budget)
            if chunk is not None:
                chunks.append(chunk)
                budget.spend(chunk)
        for path in self._deleted:
            self._file_deleted(path)
        self._deleted.clear()
        if not self.dirty:  # backlog done: what is still known is of files gone meanwhile
            self._known.clear()
            self.dirty.clear()  # empty already: this frees a backlog's tables
        return chunks

    def _list_ahead(self) -> None:
        """List project folders not listed yet while fewer than ``LIST_AHEAD`` files are
        pending: a backlog's paths are then held a folder or so at a time."""
        while len(self.dirty) < LIST_AHEAD and self.watcher.unlisted:
            self._discover(self.watcher.list_next())

    def _read_file(self, path: str, budget: Budget) -> Chunk | None:
        try:
            tf = self._track(path)
            if tf is None:
                self.dirty.discard(path)
                return None
            res = self._read(tf, budget)
        except StreamRefused as exc:  # its checkpoint row: refused for good
            self.dirty.discard(path)
            if not self.hold(path, str(exc), _default_delay):
                return None
            return Chunk(KIND, path, None, 0, 0, failure=f"file_held: {exc}")
        except FileNotFoundError:
            self.dirty.discard(path)
            self._deleted.append(path)
            return None
        except OutsideTree:
            # a symlink, or a path through one out of the tree: never opened for reading, so
            # no byte of a foreign file (~/.ssh/id_rsa) can reach a row or a log line
            return self._unread(
                path, OUTSIDE_TREE_REASON, "transcript outside the projects root; not read"
            )
        except OSError as exc:
            reason = f"unreadable_file: {exc.strerror or exc}"
            return self._unread(path, reason, "cannot read transcript")
        if res is None:
            return None
        if not res.more:
            self.dirty.discard(path)
        if res.end_offset == tf.source.committed_offset:
            self._forget_if_settled(tf)
            return None
        return Chunk(
            KIND,
            tf.path,
            tf.source,
            res.start,
            res.end_offset,
            res.lines,  # handed over once: ingest drops each line's bytes as it parses it
            res.oversized,
            res.fingerprint,
            tf.ctx,
        )

    def _read(self, tf: TrackedFile, budget: Budget) -> ReadResult | None:
        try:
            res = read_lines(
                tf.path,
                tf.source.committed_offset,
                tf.source.inode,
                root=self._root,
                resume=tf.scan,
                max_lines=budget.lines,
                max_bytes=budget.bytes,
                max_line=self.limits.max_line,
                chunk=self.limits.chunk,
                fingerprint=tf.source.fingerprint,
            )
        except FileReplaced as exc:
            tf.scan = None
            ident = exc.identity
            tf.source = self._reconcile(tf.source, tf.path, ident.inode, ident.device, ident.size)
            return None  # still dirty: read again on the next step with the new state
        tf.error = None
        tf.size = res.size
        tf.partial = 0 if res.more else res.size - res.end_offset
        tf.scan = res.partial
        return res

    def _unread(self, path: str, reason: str, message: str) -> Chunk | None:
        """Log once and leave one content-free record per file and checkpoint; retried when
        the file changes again."""
        self.dirty.discard(path)
        tf = self.files.get(path)
        if tf is not None and tf.error == reason:
            return None
        log.error(message, extra={"path": path, "error": reason})
        if tf is None:  # no checkpoint to key the record by
            return Chunk(KIND, path, None, 0, 0, failure=reason)
        tf.error = reason
        src = tf.source
        return Chunk(KIND, path, src, src.committed_offset, src.committed_offset, failure=reason)

    # ------------------------------------------------------------------ tracking
    def _is_wanted(self, path: str, ctx: FileContext) -> bool:
        return self._wanted is None or self._wanted(path, ctx)

    def _track(self, path: str) -> TrackedFile | None:
        """The file's state, creating/validating its checkpoint; None if not to be read now."""
        tf = self.files.get(path)
        if tf is not None:
            return tf
        ctx = _compact(file_context(path, self.root), path)
        if not self._is_wanted(path, ctx):
            self.unwatched.add(path)
            return None
        self.unwatched.discard(path)
        ident = identity(path)
        state = self._known.pop(path, None)
        if state is None and self._register_new(now=True):  # the next ones, this one first
            state = self._known.pop(path, None)
        if state is None:
            state = self.checkpoints.register(path, ident.inode, ident.device)
        state = self._reconcile(state, path, ident.inode, ident.device, ident.size)
        if state.path == path:
            state.path = path  # one string per file, not one from the row besides
        tf = TrackedFile(path, ctx, state, size=ident.size)
        self.files[path] = tf
        return tf

    def _register_new(self, *, now: bool = False) -> bool:
        """Checkpoints of new dirty files in bulk (a catch-up of a tree): one transaction
        per ``REGISTER_MAX`` files instead of one each in ``_track``; each file stat'ed once.

        Known files are looked up in the same round trip (nothing written for them).
        Ahead of reading by at most ``REGISTER_MAX`` files (unless a file is wanted ``now``),
        so a tree of any size costs that many states in memory, not one per file. True when
        it registered some.
        """
        if self._wanted is not None:  # registered mode: whether to read it is decided first
            return False
        if not now and len(self._known) >= REGISTER_MAX // 2:
            return False  # enough ahead of reading: memory stays flat
        new: list[tuple[str, int, int]] = []
        for path in self.dirty:
            if path in self.files or path in self._known:
                continue
            with contextlib.suppress(OSError):  # gone: ``_track`` finds out
                ident = identity(path)
                new.append((path, ident.inode, ident.device))
            if len(new) >= REGISTER_MAX:
                break
        if len(new) <= 1:
            return False
        self._known.update(self.checkpoints.register_many(new))
        return True

    def _reconcile(
        self, state: StreamState, path: str, inode: int, device: int, size: int
    ) -> StreamState:
        """Same file as the checkpoint describes? Else rebind (same bytes) or new generation."""
        same_inode = (state.inode, state.device) == (inode, device)
        grown = size >= state.committed_offset
        if same_inode and grown and state.fingerprint is None:
            return state  # nothing to compare the bytes with: trust the inode
        if grown and content_matches(
            path, state.committed_offset, state.fingerprint, root=self._root
        ):
            if same_inode:
                return state
            log.info("file replaced by a copy; continuing at checkpoint", extra={"path": path})
            return self.checkpoints.rebind(state, inode, device)
        log.warning(
            "file truncated or replaced; reading it from the start as a new generation",
            extra={"path": path, "checkpoint": state.committed_offset, "size": size},
        )
        return self.checkpoints.new_generation(state, inode, device)

    def forget_settled(self) -> int:
        """Drop the state of every settled file (see ``_forget_if_settled``); how many.

        For after sessions ended: what a tree of years of ended sessions costs in memory
        is then nothing per file, not a tracked file each.
        """
        before = len(self.files)
        for tf in list(self.files.values()):
            self._forget_if_settled(tf)
        forgotten = before - len(self.files)
        if forgotten:
            self.files = dict(self.files)  # a dict never shrinks by deletions
        return forgotten

    def _forget_if_settled(self, tf: TrackedFile) -> None:
        """Forget a file that is caught up (no partial line, checkpoint = its size at the
        last read) and whose session is over (``settled``): its checkpoint is in the store,
        so its next change re-creates it from there (one registration) and reads on."""
        if self._settled is None or tf.path in self.dirty or tf.path in self.held:
            return
        if tf.error is not None or tf.partial or tf.scan is not None:
            return
        if tf.size == tf.source.committed_offset and self._settled(tf.ctx):
            del self.files[tf.path]

    # ------------------------------------------------------------------ after the store
    def committed(self, chunks: list[Chunk]) -> None:
        for c in chunks:
            if c.failure is None and self.held.pop(c.path, None) is not None:
                log.info("held file stored again", extra={"path": c.path})
            if c.failure is None and c.state is not None:
                c.state.committed_offset = c.end
                c.state.fingerprint = c.fingerprint
                c.state.lines_committed += c.count

    def rolled_back(self, chunks: list[Chunk]) -> None:
        for c in chunks:
            tf = self.files.get(c.path)
            if c.failure is not None:  # not recorded after all: record it next time
                if tf is not None:
                    tf.error = None
                self.held.pop(c.path, None)
            self.dirty.add(c.path)

    def reload(self) -> None:
        """Adopt the store's checkpoints of the tracked files (after a reconnect: they may
        have moved meanwhile) and offer every file again. Untracked files need none: they
        are looked up, in bulk, when they are read."""
        self._known.clear()
        states = self.checkpoints.load_many(list(self.files))
        for path, state in states.items():
            tf = self.files.get(path)
            if tf is not None:
                tf.source = state
        self.mark_all_pending()  # what happened while we were away is read again

    def conflicted(self, chunks: list[Chunk]) -> None:
        """Their checkpoints moved under us (or a session ended): re-read them, re-filter."""
        self.reload_from_store(chunks)
        self.refilter()

    def sessions_changed(self) -> int:
        """The tracker's view changed (ends, registrations): re-filter, forget settled files;
        how many were forgotten."""
        if self._wanted is not None:
            self.refilter()
        return self.forget_settled()

    def may_hold(self, session_uuid: str) -> bool:
        """Can a stream not read to its end yet hold lines of ``session_uuid``?"""
        return self.dirty.may_hold(session_uuid)

    def tick(self, now: float) -> float | None:
        """Periodic upkeep: held files due again, rescans once the inotify watch limit was
        reached; when it next wants to be called."""
        self.retry_held(now)
        wants = [r for r in (self.next_held_retry(),) if r is not None]
        if self.watcher.watch_limit_reached:
            if now >= self._next_rescan:
                self._next_rescan = now + RESCAN_INTERVAL_S
                self.rescan()
            wants.append(self._next_rescan)
        return min(wants, default=None)

    def health(self) -> dict[str, Any]:
        """What ``status`` shows of this source."""
        return {
            "files_watched": len(self.files),
            "files_held": len(self.held),
            "projects_path": str(self.root),
            "projects_path_present": self.root_present,
            "projects_path_problem": None if self.root_present else path_problem(self.root),
        }

    def found(self) -> int:
        """Streams known so far (for the ready log line)."""
        return len(self.dirty) + len(self.files)

    def reload_from_store(self, chunks: list[Chunk]) -> None:
        """After a conflict: the checkpoints of these files as the store has them now."""
        for c in chunks:
            fresh = self.checkpoints.load(c.path)
            tf = self.files.get(c.path)
            if fresh is not None and tf is not None:
                tf.source = fresh

    # ------------------------------------------------------------------ held files
    def hold(self, path: str, reason: str, delay_for: Callable[[int], float]) -> bool:
        """Skip ``path`` until it changes or a capped backoff passes; True when the reason
        is new (the caller records it once)."""
        self.dirty.discard(path)
        previous = self.held.get(path)
        failures = previous.failures + 1 if previous else 1
        delay = min(HELD_RETRY_MAX_S, delay_for(failures))
        self.held[path] = Held(reason, self._monotonic() + delay, failures, _size(path))
        if previous is not None and previous.reason == reason:
            return False
        log.error(
            "file held: the database refuses its lines; other files go on",
            extra={"path": path, "error": reason[:300], "retry_in_s": round(delay, 1)},
        )
        return True

    def _held_now(self, path: str) -> bool:
        """Still held: not due for a retry and unchanged since it was held."""
        held = self.held.get(path)
        if held is None or held.due:
            return False
        return self._monotonic() < held.retry_at and _size(path) == held.size

    def retry_held(self, now: float) -> None:
        """Due ones are read again, once: the attempt holds them again, or releases them."""
        for path, held in self.held.items():
            if now >= held.retry_at:
                held.retry_at = math.inf  # once: a new hold sets the next retry
                held.due = True
                self.dirty.add(path)

    def next_held_retry(self) -> float | None:
        return min((h.retry_at for h in self.held.values()), default=None)

    # ------------------------------------------------------------------ deletions
    def _file_deleted(self, path: str) -> None:
        self.dirty.discard(path)
        self._known.pop(path, None)
        self.held.pop(path, None)
        tf = self.files.pop(path, None)
        # a forgotten (settled) file has no state left: its path still names its session
        ctx = tf.ctx if tf is not None else file_context(path, self.root)
        session = ctx.session_hint
        if ctx.subagent_hint is None and session and Path(path).stem == session:
            self._closed.append(session)

    def closed_sessions(self) -> list[str]:
        """Sessions whose own transcript file was deleted since the last call."""
        closed, self._closed = self._closed, []
        return closed

    # ------------------------------------------------------------------ health
    def lag_bytes(self) -> int:
        lag = 0
        for tf in self.files.values():
            if tf.error is not None or tf.path in self.held:
                continue  # not readable now: its bytes are not lag the service can work off
            try:
                size = os.lstat(tf.path).st_size
            except OSError:
                continue
            start = tf.source.committed_offset
            if size == tf.size:
                end = size - tf.partial
            else:  # grown since the last read (e.g. while the database is down)
                if tf.lag_at != (size, start):
                    tf.lag_at, tf.lag_end = (
                        (size, start),
                        complete_end(tf.path, start, size, self._root),
                    )
                end = tf.lag_end
            lag += max(0, end - start)
        return lag

    @property
    def root_present(self) -> bool:
        return self.watcher.root_present

    @property
    def watch_limit_reached(self) -> bool:
        return self.watcher.watch_limit_reached

    def close(self) -> None:
        self.watcher.close()


def _compact(ctx: FileContext, path: str) -> FileContext:
    """``ctx`` sharing the tracked path string instead of holding a second copy of it.

    (Not ``sys.intern``: the interpreter's table of interned strings never shrinks, so a
    catch-up of 10,000 sessions would leave it megabytes larger for good.)"""
    return (
        ctx
        if ctx.path != path or ctx.path is path
        else FileContext(path, ctx.session_hint, ctx.subagent_hint, ctx.project_hint)
    )


def _size(path: str) -> int | None:
    try:
        return os.lstat(path).st_size
    except OSError:
        return None


def _default_delay(failures: int) -> float:
    """Held for its checkpoint row: retried after 2, 4, 8 … s (capped)."""
    return float(2**failures)


def path_problem(path: os.PathLike[str] | str) -> str | None:
    """What is wrong with the projects path ("does not exist", "is not a directory"), or
    None when it is a directory we can list."""
    try:
        with os.scandir(path):
            return None
    except FileNotFoundError:
        return "does not exist"
    except NotADirectoryError:
        return "is not a directory"
    except OSError as exc:
        return f"cannot be read ({exc.strerror})"
