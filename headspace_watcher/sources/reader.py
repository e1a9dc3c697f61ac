"""The bounded line reader: complete lines past a checkpoint, never more than a budget.

Why bounded: a transcript can hold a line of any size and a backlog of any length, and the
service's memory must not follow either. A line over the limit is scanned to its end
keeping only its head (for the rejection); a trailing line without its newline is never
consumed. Why a fingerprint: a path can come to hold other bytes (rewritten, replaced by
another file, a re-used inode); comparing the hash of the bytes just before the checkpoint
tells "same content, keep going" from "read it again as a new generation".

Nothing outside the projects root is ever read: every transcript is opened through
``open_in_tree`` (``O_NOFOLLOW`` plus a check of the open descriptor's real path), so a
symlink planted in the tree, or a folder swapped for one after discovery, is refused before
a byte is read. A trailing line that never ends is scanned on from where the last read
stopped (``PartialScan``), never again from its start.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from headspace_watcher.records import Oversized

REJECT_HEAD_BYTES = 64 * 1024
FINGERPRINT_SPAN = 256


def tail_fingerprint(data: bytes) -> bytes:
    """Hash of the last ``FINGERPRINT_SPAN`` bytes before a checkpoint."""
    return hashlib.sha256(data[-FINGERPRINT_SPAN:]).digest()


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
        inside = real.startswith(_real_root(root))
    except OSError:
        os.close(fd)
        raise
    if not inside:
        os.close(fd)
        raise OutsideTree(errno.EXDEV, "resolves outside the projects root", path)
    return fd


_REAL_ROOTS: dict[str, tuple[int, int, str]] = {}  # root → its directory's (dev, ino), real/
_REAL_ROOTS_MAX = 16


def _real_root(root: str) -> str:
    """``root``'s real path with a trailing separator, resolved again whenever ``root`` names
    another directory than when it was last resolved.

    Why cached: ``realpath`` costs an ``lstat`` per path component, and a catch-up opens
    thousands of files under one root. One ``stat`` of ``root`` proves it still resolves to
    the same directory (device and inode); a root swapped for a symlink elsewhere resolves to
    another one and is resolved afresh, as before. An entry is stored only when the directory
    did not change while it was being resolved.
    """
    before = os.stat(root)
    cached = _REAL_ROOTS.get(root)
    if cached is not None and cached[:2] == (before.st_dev, before.st_ino):
        return cached[2]
    real = os.path.join(os.path.realpath(root), "")
    after = os.stat(real)
    if (after.st_dev, after.st_ino) == (before.st_dev, before.st_ino):
        if len(_REAL_ROOTS) >= _REAL_ROOTS_MAX:
            _REAL_ROOTS.clear()
        _REAL_ROOTS[root] = (before.st_dev, before.st_ino, real)
    return real


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


def first_session_id(path: str, root: str) -> str | None:
    """Peek at a hint-less file's first lines for its sessionId (registered mode only)."""
    try:
        fd = open_in_tree(path, root)  # never a file outside the tree; a FIFO must not block
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


def complete_end(path: str, start: int, size: int, root: str) -> int:
    """Where the last complete line of the first ``size`` bytes ends (after its newline),
    not before ``start``: scanned backwards in blocks, so a status reading costs the
    trailing partial line only."""
    block = 64 * 1024
    try:
        fd = open_in_tree(path, root)
    except OSError:
        return start
    try:
        end = size
        while end > start:
            begin = max(start, end - block)
            data = os.pread(fd, end - begin, begin)
            at = data.rfind(b"\n")
            if at >= 0:
                return begin + at + 1
            end = begin
        return start
    finally:
        os.close(fd)
