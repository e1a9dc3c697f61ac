"""Watching the transcript tree with inotify, and reading complete lines past a checkpoint.

One inotify descriptor watches the projects root and the folders below it that can hold
transcripts (``<project>/``, ``<project>/<uuid>/``, ``<project>/<uuid>/subagents/``). File
writes are reported on their folder's watch, so there is no watch per file. The watcher
only says *which* files may have changed; what to read is decided by comparing the file
with its committed checkpoint, so a lost or coalesced event can never lose a line — at
worst a rescan reads nothing new.

Nothing outside the projects root is ever read: symlinked folders are neither listed nor
watched, and every transcript is opened through ``open_in_tree`` (``O_NOFOLLOW`` plus a check
of the open descriptor's real path), so a symlink planted in the tree, or swapped in for a
folder after discovery, leads to a refusal before a byte is read.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from inotify_simple import INotify
from inotify_simple import flags as F

from headspace_watcher.checkpoints import FINGERPRINT_SPAN, tail_fingerprint

log = logging.getLogger(__name__)

DIR_MASK = (
    F.CREATE
    | F.MODIFY
    | F.CLOSE_WRITE
    | F.MOVED_TO
    | F.MOVED_FROM
    | F.DELETE
    | F.DELETE_SELF
    | F.MOVE_SELF
    | F.ATTRIB
    | F.ONLYDIR
)
# Below the root a folder is watched only if it is a folder itself: IN_DONT_FOLLOW makes a
# symlink swapped in for it between the scan and add_watch fail (ENOTDIR) instead of watching
# whatever it points at. The root may be a symlink: its real path is the trust anchor.
SUBDIR_MASK = DIR_MASK | F.DONT_FOLLOW
ANCESTOR_MASK = F.CREATE | F.MOVED_TO | F.DELETE_SELF | F.MOVE_SELF | F.ONLYDIR
MAX_DIR_DEPTH = 3  # root=0, project=1, <uuid>=2, subagents=3
REJECT_HEAD_BYTES = 64 * 1024


def is_transcript(root: Path, path: Path) -> bool:
    """``<project>/*.jsonl`` or ``<project>/<uuid>/subagents/*.jsonl`` under ``root``."""
    try:
        parts = path.relative_to(root).parts
    except ValueError:
        return False
    if not parts or not parts[-1].endswith(".jsonl"):
        return False
    return len(parts) == 2 or (len(parts) == 4 and parts[2] == "subagents")


@dataclass(slots=True)
class WatchChanges:
    dirty: set[str] = field(default_factory=set)
    deleted: set[str] = field(default_factory=set)
    rescan: bool = False

    def __bool__(self) -> bool:
        return bool(self.dirty or self.deleted or self.rescan)


class TreeWatcher:
    """Discovery of transcript files; see the module docstring."""

    def __init__(self, root: Path) -> None:
        self.root = Path(os.path.abspath(root))
        self._inotify = INotify()
        self._dirs: dict[int, Path] = {}  # wd -> folder inside the tree
        self._ancestor: tuple[int, Path] | None = None  # waiting for the root to appear
        self.watch_limit_reached = False
        self.root_present = False

    def fileno(self) -> int:
        return self._inotify.fileno()

    def close(self) -> None:
        self._inotify.close()

    @property
    def watch_count(self) -> int:
        return len(self._dirs)

    # ------------------------------------------------------------------ set-up
    def start(self) -> list[str]:
        """Watch the tree (or the nearest existing ancestor) and return the files present."""
        if not self.root.is_dir():
            return self._wait_for_root()
        self.root_present = True
        self._drop_ancestor()
        return self._add_tree(self.root, 0)

    def rescan(self) -> list[str]:
        """Every transcript file present now; also re-adds watches (after overflow)."""
        return self.start()

    def _wait_for_root(self) -> list[str]:
        """Watch the nearest existing ancestor; the files present if the root just appeared."""
        self.root_present = False
        probe = self.root.parent
        while not probe.is_dir() and probe != probe.parent:
            probe = probe.parent
        if self._ancestor and self._ancestor[1] == probe:
            return []
        self._drop_ancestor()
        try:
            wd = self._inotify.add_watch(probe, ANCESTOR_MASK)
        except OSError as exc:
            log.warning("cannot watch %s for the projects path: %s", probe, exc.strerror)
            return []
        self._ancestor = (wd, probe)
        log.info("projects path does not exist yet; waiting", extra={"path": str(self.root)})
        if self.root.is_dir():  # appeared between the check and the watch
            return self.start()
        return []

    def _drop_ancestor(self) -> None:
        if self._ancestor is not None:
            with contextlib.suppress(OSError):
                self._inotify.rm_watch(self._ancestor[0])
            self._ancestor = None

    def _add_tree(self, folder: Path, depth: int) -> list[str]:
        found: list[str] = []
        if not self._watch(folder, DIR_MASK if depth == 0 else SUBDIR_MASK):
            return found
        try:
            entries = _list_folder(folder, follow=depth == 0)
        except OSError as exc:
            log.warning("cannot list folder", extra={"path": str(folder), "error": exc.strerror})
            return found
        for entry in entries:
            path = folder / entry.name
            try:
                is_dir = entry.is_dir(follow_symlinks=False)
            except OSError:
                continue
            if is_dir and depth < MAX_DIR_DEPTH and self._wanted_dir(path):
                found.extend(self._add_tree(path, depth + 1))
            elif not is_dir and is_transcript(self.root, path):
                found.append(str(path))
        return found

    def _wanted_dir(self, path: Path) -> bool:
        parts = path.relative_to(self.root).parts
        return len(parts) < 3 or parts[2] == "subagents"

    def _watch(self, folder: Path, mask: int) -> bool:
        try:
            wd = self._inotify.add_watch(folder, mask)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                if not self.watch_limit_reached:
                    log.warning(
                        "inotify watch limit reached (fs.inotify.max_user_watches); "
                        "falling back to periodic rescans",
                        extra={"path": str(folder)},
                    )
                self.watch_limit_reached = True
            elif exc.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                log.warning("cannot watch folder", extra={"path": str(folder), "error": str(exc)})
            return False
        self._dirs[wd] = folder
        return True

    # ------------------------------------------------------------------ events
    def read(self, timeout_ms: int | None = 0) -> WatchChanges:
        """Drain pending inotify events into a set of changes (non-blocking by default)."""
        changes = WatchChanges()
        for ev in self._inotify.read(timeout=timeout_ms):
            self._apply(ev, changes)
        return changes

    def _apply(self, ev: object, changes: WatchChanges) -> None:
        wd, mask, name = ev.wd, ev.mask, ev.name  # type: ignore[attr-defined]
        if mask & F.Q_OVERFLOW:
            log.warning("inotify queue overflow; rescanning the tree")
            changes.rescan = True
            return
        if self._ancestor and wd == self._ancestor[0]:
            if mask & (F.DELETE_SELF | F.MOVE_SELF | F.IGNORED):
                self._ancestor = None
            self._wait_or_start(changes)
            return
        folder = self._dirs.get(wd)
        if folder is None:
            return
        if mask & (F.DELETE_SELF | F.MOVE_SELF | F.IGNORED):
            self._forget(wd, folder, changes)
            return
        if not name:
            return
        path = folder / name
        if mask & F.ISDIR:
            if mask & (F.CREATE | F.MOVED_TO):
                depth = len(path.relative_to(self.root).parts)
                if depth <= MAX_DIR_DEPTH and self._wanted_dir(path):
                    changes.dirty.update(self._add_tree(path, depth))
            return
        if not is_transcript(self.root, path):
            return
        if mask & (F.DELETE | F.MOVED_FROM):
            changes.deleted.add(str(path))
            changes.dirty.discard(str(path))
        else:
            changes.dirty.add(str(path))
            changes.deleted.discard(str(path))

    def _wait_or_start(self, changes: WatchChanges) -> None:
        if self.root.is_dir():
            changes.dirty.update(self.start())
        else:
            changes.dirty.update(self._wait_for_root())

    def _forget(self, wd: int, folder: Path, changes: WatchChanges) -> None:
        self._dirs.pop(wd, None)
        if folder == self.root:
            log.warning("projects path removed; waiting for it to reappear")
            for other in list(self._dirs):
                self._dirs.pop(other, None)
            changes.rescan = True
            changes.dirty.update(self._wait_for_root())


def _list_folder(folder: Path, *, follow: bool) -> list[os.DirEntry[str]]:
    """The folder's entries; below the root through an ``O_NOFOLLOW`` descriptor, so a folder
    replaced by a symlink after its watch was set up is not listed (ELOOP/ENOTDIR)."""
    if follow:
        with os.scandir(folder) as it:
            return list(it)
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        with os.scandir(fd) as it:
            return list(it)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------- reading


class OutsideTree(OSError):
    """The path is a symlink, or resolves outside the projects root: it is never read."""


def open_in_tree(path: str, root: str) -> int:
    """A read-only descriptor of ``path``, refusing anything not inside ``root``'s real path.

    ``O_NOFOLLOW`` refuses a symlink as the last component (``evil.jsonl -> ~/.ssh/id_rsa``);
    the descriptor's own path (``/proc/self/fd``) catches a symlinked folder on the way,
    including one swapped in after discovery. ``O_NONBLOCK``: a FIFO must not block the open.
    Raises OutsideTree (an OSError) for both, before a byte is read.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OutsideTree(errno.ELOOP, "a symlink", path) from None
        raise
    try:
        real = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        os.close(fd)
        raise
    if not real.startswith(os.path.join(os.path.realpath(root), "")):
        os.close(fd)
        raise OutsideTree(errno.EXDEV, "resolves outside the projects root", path)
    return fd


@dataclass(slots=True)
class Oversized:
    offset: int
    length: int  # without the newline
    head: bytes


@dataclass(slots=True)
class ReadResult:
    """Complete lines read from ``start`` up to ``end_offset`` (exclusive)."""

    start: int
    end_offset: int
    lines: list[tuple[int, bytes]]
    oversized: list[Oversized]
    size: int
    fingerprint: bytes | None
    more: bool  # stopped on a limit; more complete lines may follow
    partial: PartialScan | None = None  # the trailing line without its newline, if any

    @property
    def count(self) -> int:
        return len(self.lines) + len(self.oversized)

    def take_lines(self) -> Iterator[tuple[int, bytes]]:
        """Each line once, its bytes dropped from here as it is handed over: a huge line is
        then not kept alive beside its parsed text until the batch commits."""
        lines = self.lines
        for i, item in enumerate(lines):
            lines[i] = (item[0], b"")
            yield item


@dataclass(frozen=True, slots=True)
class FileIdentity:
    inode: int
    device: int
    size: int


class FileReplaced(Exception):
    """The path now holds another file, or a shorter one, than the checkpoint describes."""

    def __init__(self, identity: FileIdentity) -> None:
        super().__init__("file replaced or truncated")
        self.identity = identity


def identity(path: str) -> FileIdentity:
    """The path's own identity: a symlink is not followed (its target is never looked at)."""
    st = os.lstat(path)
    return FileIdentity(st.st_ino, st.st_dev, st.st_size)


def content_matches(path: str, offset: int, fingerprint: bytes | None, *, root: str) -> bool:
    """Does the file still hold the bytes that precede ``offset`` (as fingerprinted)?"""
    if offset == 0:
        return True
    if fingerprint is None:
        return False
    try:
        fd = open_in_tree(path, root)
    except OSError:
        return False
    try:
        return _tail_matches(fd, offset, fingerprint)
    except OSError:
        return False
    finally:
        os.close(fd)


def _tail_fingerprint_at(fd: int, offset: int) -> bytes | None:
    """Fingerprint of the bytes before ``offset`` (``pread``: no buffer filled, position kept)."""
    if offset <= 0:
        return None
    span = min(offset, FINGERPRINT_SPAN)
    data = os.pread(fd, span, offset - span)
    return tail_fingerprint(data) if len(data) == span else None


def _tail_matches(fd: int, offset: int, fingerprint: bytes) -> bool:
    return _tail_fingerprint_at(fd, offset) == fingerprint


def read_lines(
    path: str,
    start: int,
    inode: int,
    *,
    root: str,
    max_lines: int,
    max_bytes: int,
    max_line: int,
    chunk: int,
    fingerprint: bytes | None = None,
    resume: PartialScan | None = None,
) -> ReadResult:
    """Read complete lines from ``start``; a trailing line without ``\\n`` is left alone.

    Raises FileReplaced when the inode differs, the file is shorter than ``start``, or the
    bytes before ``start`` no longer match ``fingerprint`` (rewritten in place, e.g. by
    ``O_TRUNC`` and longer new content, or a re-used inode); OutsideTree when ``path`` is a
    symlink or resolves outside ``root``; OSError when the file cannot be opened (the caller
    records and retries later).

    ``resume`` (the previous result's ``partial``) lets a trailing line that never ends be
    scanned on from where the last read stopped, so each append costs what was appended, not
    the whole line again; it is used only while it still describes this file (same inode,
    line starting at ``start``, file not shorter, bytes before the scanned end unchanged).
    """
    fd = open_in_tree(path, root)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):  # checked before open(): it leaks the fd if it raises
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file", path)
    with open(fd, "rb", buffering=chunk) as f:
        if st.st_ino != inode or st.st_size < start:
            raise FileReplaced(FileIdentity(st.st_ino, st.st_dev, st.st_size))
        if fingerprint is not None and start > 0 and not _tail_matches(fd, start, fingerprint):
            raise FileReplaced(FileIdentity(st.st_ino, st.st_dev, st.st_size))
        scan = _LineScan(start)
        if resume is not None and _resumable(fd, resume, start, st):
            scan.resume(resume)
        f.seek(scan.offset + scan.total)
        lines: list[tuple[int, bytes]] = []
        oversized: list[Oversized] = []
        pos = start
        more = False
        for offset, data, length in _complete_lines(f, max_line, chunk, scan):
            if length > max_line:
                oversized.append(Oversized(offset, length, data[:REJECT_HEAD_BYTES]))
            else:
                lines.append((offset, data))
            pos = offset + length + 1
            if len(lines) + len(oversized) >= max_lines or pos - start >= max_bytes:
                more = True
                break
        partial = None if more else scan.partial(fd, st.st_ino)
        end_fingerprint = _tail_fingerprint_at(fd, pos)
    return ReadResult(start, pos, lines, oversized, st.st_size, end_fingerprint, more, partial)


@dataclass(frozen=True, slots=True)
class PartialScan:
    """How far a trailing line without its newline was scanned (see ``read_lines``)."""

    inode: int
    offset: int  # where the line starts
    scanned: int  # its bytes scanned so far, none of them a newline
    head: bytes  # its first REJECT_HEAD_BYTES, for a rejection if it ends up over-long
    fingerprint: bytes | None  # of the bytes before offset + scanned


def _resumable(fd: int, resume: PartialScan, start: int, st: os.stat_result) -> bool:
    end = resume.offset + resume.scanned
    return (
        resume.inode == st.st_ino
        and resume.offset == start
        and st.st_size >= end
        and resume.fingerprint is not None
        and _tail_matches(fd, end, resume.fingerprint)
    )


@dataclass(slots=True)
class _LineScan:
    """The line being scanned: where it starts, bytes seen so far, and its head."""

    offset: int
    total: int = 0
    head: bytes = b""

    def resume(self, partial: PartialScan) -> None:
        self.offset, self.total, self.head = partial.offset, partial.scanned, partial.head

    def partial(self, fd: int, inode: int) -> PartialScan | None:
        if not self.total:
            return None
        end = self.offset + self.total
        return PartialScan(inode, self.offset, self.total, self.head, _tail_fingerprint_at(fd, end))


def _complete_lines(
    f: BinaryIO, max_line: int, chunk: int, scan: _LineScan
) -> Iterator[tuple[int, bytes, int]]:
    """Yield (offset, line, length) per complete line, stopping at a partial one.

    ``f`` is positioned at ``scan.offset + scan.total``. A line longer than one chunk is first
    scanned to its newline keeping only its first REJECT_HEAD_BYTES, so memory stays at a chunk
    plus that head whatever the line's size: over ``max_line`` it is yielded as that head;
    otherwise it is read back whole at once. A partial line at EOF is left in ``scan``.
    """
    readline = f.readline
    offset, total, head = scan.offset, scan.total, scan.head  # locals: the per-line hot path
    while True:
        piece = readline(chunk)
        if not total and piece.endswith(b"\n"):
            yield offset, piece[:-1], len(piece) - 1
            offset += len(piece)
            continue
        total += len(piece)
        if len(head) < REJECT_HEAD_BYTES:
            head += piece[: REJECT_HEAD_BYTES - len(head)]
        if not piece.endswith(b"\n"):
            if len(piece) < chunk:
                scan.offset, scan.total, scan.head = offset, total, head
                return  # EOF: nothing, or a partial line still being written
            continue
        length = total - 1
        if length > max_line:
            yield offset, head[:length], length
        else:
            f.seek(offset)
            data = f.read(length)
            if len(data) != length or f.read(1) != b"\n":
                scan.offset, scan.total = offset, 0
                return  # changed under us (truncated/rewritten): the next read decides
            yield offset, data, length
        offset += total
        total, head = 0, b""
