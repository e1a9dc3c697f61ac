"""The bounded line reader: complete lines past a checkpoint, never more than a budget.

Why bounded: a transcript can hold a line of any size and a backlog of any length, and the
service's memory must not follow either. A line over the limit is scanned to its end
keeping only its head (for the rejection); a trailing line without its newline is never
consumed. Why a fingerprint: a path can come to hold other bytes (rewritten, replaced by
another file, a re-used inode); comparing the hash of the bytes just before the checkpoint
tells "same content, keep going" from "read it again as a new generation".
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
    st = os.stat(path)
    return FileIdentity(st.st_ino, st.st_dev, st.st_size)


def content_matches(path: str, offset: int, fingerprint: bytes | None) -> bool:
    """Does the file still hold the bytes that precede ``offset`` (as fingerprinted)?"""
    if offset == 0:
        return True
    if fingerprint is None:
        return False
    span = min(offset, FINGERPRINT_SPAN)
    try:
        with open(path, "rb") as f:
            f.seek(offset - span)
            data = f.read(span)
    except OSError:
        return False
    return len(data) == span and tail_fingerprint(data) == fingerprint


def read_lines(
    path: str,
    start: int,
    inode: int,
    *,
    max_lines: int,
    max_bytes: int,
    max_line: int,
    chunk: int,
    fingerprint: bytes | None = None,
) -> ReadResult:
    """Read complete lines from ``start``; a trailing line without ``\\n`` is left alone.

    Raises FileReplaced when the inode differs, the file is shorter than ``start``, or the
    bytes before ``start`` no longer match ``fingerprint`` (rewritten in place, e.g. by
    ``O_TRUNC`` and longer new content, or a re-used inode), and OSError when the file
    cannot be opened (the caller records and retries later).
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):  # checked before open(): it leaks the fd if it raises
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file", path)
    with open(fd, "rb", buffering=chunk) as f:
        if st.st_ino != inode or st.st_size < start:
            raise FileReplaced(FileIdentity(st.st_ino, st.st_dev, st.st_size))
        if fingerprint is not None and start > 0:
            span = min(start, FINGERPRINT_SPAN)
            f.seek(start - span)
            if tail_fingerprint(f.read(span)) != fingerprint:
                raise FileReplaced(FileIdentity(st.st_ino, st.st_dev, st.st_size))
        f.seek(start)
        lines: list[tuple[int, bytes]] = []
        oversized: list[Oversized] = []
        pos = start
        more = False
        for offset, data, length in _complete_lines(f, start, max_line, chunk):
            if length > max_line:
                oversized.append(Oversized(offset, length, data[:REJECT_HEAD_BYTES]))
            else:
                lines.append((offset, data))
            pos = offset + length + 1
            if len(lines) + len(oversized) >= max_lines or pos - start >= max_bytes:
                more = True
                break
        fingerprint = None
        if pos > 0:
            span = min(pos, FINGERPRINT_SPAN)
            f.seek(pos - span)
            fingerprint = tail_fingerprint(f.read(span))
    return ReadResult(start, pos, lines, oversized, st.st_size, fingerprint, more)


def _complete_lines(
    f: BinaryIO, start: int, max_line: int, chunk: int
) -> Iterator[tuple[int, bytes, int]]:
    """Yield (offset, line, length) per complete line, stopping at a partial one.

    A line longer than one chunk is first scanned to its newline keeping only its first
    REJECT_HEAD_BYTES, so memory stays at a chunk plus that head whatever the line's size:
    over ``max_line`` it is yielded as that head; otherwise it is read back whole at once.
    """
    readline = f.readline
    offset = start
    while True:
        piece = readline(chunk)
        if piece.endswith(b"\n"):
            yield offset, piece[:-1], len(piece) - 1
            offset += len(piece)
            continue
        if len(piece) < chunk:
            return  # EOF: nothing, or a partial line still being written
        head = piece[:REJECT_HEAD_BYTES]
        total = len(piece)
        while not piece.endswith(b"\n"):
            piece = readline(chunk)
            if len(piece) < chunk and not piece.endswith(b"\n"):
                return  # the long line is not complete yet
            total += len(piece)
            if len(head) < REJECT_HEAD_BYTES:
                head += piece[: REJECT_HEAD_BYTES - len(head)]
        length = total - 1
        if length > max_line:
            yield offset, head[:length], length
        else:
            f.seek(offset)
            data = f.read(length)
            if len(data) != length or f.read(1) != b"\n":
                return  # changed under us (truncated/rewritten): the next read decides
            yield offset, data, length
        offset += total


def first_session_id(path: str) -> str | None:
    """Peek at a hint-less file's first lines for its sessionId (registered mode only)."""
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
