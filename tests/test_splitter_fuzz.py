"""Property tests for the line splitter (``tailer.read_lines``) over arbitrary bytes.

A real file in a temp directory, arbitrary small chunk sizes and line limits, read again and
again from the returned ``end_offset`` with arbitrary per-call limits, the file growing between
reads at arbitrary split points (mid-line included). What must hold:

* the consumed lines, each plus ``\\n``, concatenate to exactly the file's prefix up to its
  last ``\\n`` — nothing lost, nothing twice, nothing reordered;
* a trailing partial line is never consumed;
* a line longer than ``max_line`` comes back once, as ``Oversized`` with its exact length and
  a head that is a prefix of the line (never the newline, never more than the cap);
* offsets are exact: each line at the byte where it starts, ``end_offset`` right after the last;
* every complete line, fed to ``transcript.parse_line``, is exactly one of turn/skip/reject.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from headspace_watcher.ingest.transcript import parse_line
from headspace_watcher.sources.layout import file_context
from headspace_watcher.sources.reader import REJECT_HEAD_BYTES, PartialScan, ReadResult, read_lines

pytestmark = pytest.mark.filterwarnings("ignore:line buffering:RuntimeWarning")
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ROOT = "/home/u/.claude/projects"
TMP = tempfile.gettempdir()  # the temp files' "projects root"
CTX = file_context(f"{ROOT}/-home-u-p/0b7a6d3e-1c2f-4a5b-9c8d-7e6f5a4b3c2d.jsonl", ROOT)

# Bytes with plenty of newlines (and the characters that matter to the parser) so lines of
# every length, empty ones included, show up; plus raw arbitrary bytes.
_piece = st.sampled_from(
    [b"\n", b"\n", b"\n\n", b"\r\n", b"{", b"}", b'"', b"\\", b"\x00", b"\xff", b" ", b"a" * 7]
)
file_bytes = st.lists(st.binary(max_size=12) | _piece, max_size=40).map(b"".join)
limits = st.fixed_dictionaries({"max_lines": st.integers(1, 6), "max_bytes": st.integers(1, 80)})


@contextlib.contextmanager
def temp_file() -> Iterator[str]:
    fd, path = tempfile.mkstemp(prefix="splitter-", suffix=".jsonl")
    os.close(fd)
    try:
        yield path
    finally:
        os.unlink(path)


def append(path: str, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


def check_result(res: ReadResult, start: int, content: bytes, max_line: int) -> list[bytes]:
    """Check one read against the bytes on disk; return its lines (in file order)."""
    assert res.start == start
    items: list[tuple[int, int, bytes, bool]] = [
        (offset, len(data), data, False) for offset, data in res.lines
    ] + [(o.offset, o.length, o.head, True) for o in res.oversized]
    items.sort()
    pos = start
    consumed: list[bytes] = []
    for offset, length, data, is_oversized in items:
        assert offset == pos, "lines must be contiguous from the checkpoint"
        line = content[offset : offset + length]
        assert content[offset + length : offset + length + 1] == b"\n", "a complete line"
        assert b"\n" not in line
        if is_oversized:
            assert length > max_line
            assert data == line[:REJECT_HEAD_BYTES], "head: a prefix of the line, no newline"
        else:
            assert length <= max_line
            assert data == line
        consumed.append(line)
        pos = offset + length + 1
    assert res.end_offset == pos
    assert res.count == len(items)
    return consumed


def drain(
    path: str,
    start: int,
    inode: int,
    max_line: int,
    chunk: int,
    lim: dict[str, int],
    resume: PartialScan | None = None,
) -> tuple[int, list[bytes], PartialScan | None]:
    """Read from ``start`` until a read consumes nothing; (offset, lines, partial scan)."""
    content = open(path, "rb").read()  # noqa: SIM115 - one-shot read of a small file
    offset = start
    lines: list[bytes] = []
    for _ in range(len(content) + 2):  # each productive read consumes >= 1 byte
        res = read_lines(
            path, offset, inode, root=TMP, max_line=max_line, chunk=chunk, resume=resume, **lim
        )
        resume = res.partial
        got = check_result(res, offset, content, max_line)
        assert res.count <= lim["max_lines"]
        if res.count > 1:
            # the byte limit is only ever overshot by the line that crossed it
            last = max([o for o, _ in res.lines] + [o.offset for o in res.oversized])
            assert last - offset < lim["max_bytes"]
        lines.extend(got)
        offset = res.end_offset
        if res.count == 0:
            assert not res.more
            return offset, lines, resume
    raise AssertionError("read_lines never stopped")


def expected_lines(content: bytes) -> list[bytes]:
    return content[: content.rfind(b"\n") + 1].split(b"\n")[:-1]


@FUZZ
@given(
    content=file_bytes,
    chunk=st.integers(1, 24),
    max_line=st.integers(0, 30),
    lim=limits,
)
def test_reading_a_file_consumes_exactly_its_complete_lines(
    content: bytes, chunk: int, max_line: int, lim: dict[str, int]
) -> None:
    with temp_file() as path:
        append(path, content)
        inode = os.stat(path).st_ino

        end, lines, _ = drain(path, 0, inode, max_line, chunk, lim)

        complete = content.rfind(b"\n") + 1
        assert end == complete, "stops right after the last newline: partial line left"
        assert b"".join(line + b"\n" for line in lines) == content[:complete]
        assert lines == expected_lines(content)


@FUZZ
@given(
    content=file_bytes,
    data=st.data(),
    chunk=st.integers(1, 24),
    max_line=st.integers(0, 30),
)
def test_reading_a_growing_file_never_loses_or_repeats_a_byte(
    content: bytes, data: st.DataObject, chunk: int, max_line: int
) -> None:
    cuts = sorted(data.draw(st.lists(st.integers(0, len(content)), max_size=6)))
    pieces = [content[a:b] for a, b in zip([0, *cuts], [*cuts, len(content)], strict=True)]
    with temp_file() as path:
        inode = os.stat(path).st_ino
        offset = 0
        resume: PartialScan | None = None  # carried from read to read, as the service does
        lines: list[bytes] = []
        written = b""
        for piece in pieces:
            append(path, piece)
            written += piece
            lim = data.draw(limits)
            # sometimes only one bounded read before the next append, sometimes a full drain
            if data.draw(st.booleans()):
                res = read_lines(
                    path, offset, inode, root=TMP, max_line=max_line, chunk=chunk,
                    resume=resume, **lim,
                )  # fmt: skip
                lines.extend(check_result(res, offset, written, max_line))
                offset, resume = res.end_offset, res.partial
            else:
                offset, got, resume = drain(path, offset, inode, max_line, chunk, lim, resume)
                lines.extend(got)
            assert offset <= written.rfind(b"\n") + 1, "never past the last complete line"
        offset, got, _ = drain(path, offset, inode, max_line, chunk, data.draw(limits), resume)
        lines.extend(got)

        complete = content.rfind(b"\n") + 1
        assert offset == complete
        assert b"".join(line + b"\n" for line in lines) == content[:complete]
        for line in lines:  # every complete line is exactly one of turn/skip/reject
            outcome = parse_line(line, CTX)
            assert outcome.kind in {"turn", "skip", "reject"}
            assert (outcome.kind == "reject") == (outcome.reason is not None)
            assert (outcome.kind == "turn") == (outcome.payload is not None)


@settings(max_examples=40, deadline=None)
@given(
    prefix=st.integers(0, 3),
    long_length=st.integers(REJECT_HEAD_BYTES - 2, REJECT_HEAD_BYTES + 300),
    chunk=st.sampled_from([1 << 10, 4096, 65536, 70000]),
    terminated=st.booleans(),
)
def test_oversized_lines_are_reported_once_with_their_exact_length(
    prefix: int, long_length: int, chunk: int, terminated: bool
) -> None:
    """Lines around the head cap, bigger and smaller than the chunk, complete or not."""
    max_line = 4096
    long_line = bytes(i % 251 for i in range(long_length)).replace(b"\n", b"N")
    content = b"x\n" * prefix + long_line + (b"\n" + b"after\n" if terminated else b"")
    with temp_file() as path:
        append(path, content)
        res = read_lines(
            path,
            0,
            os.stat(path).st_ino,
            max_lines=100,
            max_bytes=1 << 30,
            root=TMP,
            max_line=max_line,
            chunk=chunk,
        )
        check_result(res, 0, content, max_line)
        assert [o.length for o in res.oversized] == ([long_length] if terminated else [])
        assert len(res.lines) == prefix + (1 if terminated else 0)
        assert res.end_offset == content.rfind(b"\n") + 1


@FUZZ
@given(content=file_bytes, tail=st.binary(min_size=1, max_size=40).filter(lambda b: b"\n" not in b))
def test_a_trailing_partial_line_is_never_consumed(content: bytes, tail: bytes) -> None:
    body = content if content.endswith(b"\n") or not content else content + b"\n"
    with temp_file() as path:
        append(path, body + tail)
        end, lines, _ = drain(
            path, 0, os.stat(path).st_ino, 16, 5, {"max_lines": 3, "max_bytes": 20}
        )
        assert end == len(body)
        assert b"".join(line + b"\n" for line in lines) == body
        append(path, b"\n")  # the line completes: now it is read, once, whole
        end2, more, _ = drain(
            path, end, os.stat(path).st_ino, 1 << 20, 5, {"max_lines": 3, "max_bytes": 20}
        )
        assert more == [tail]
        assert end2 == len(body) + len(tail) + 1


def test_non_regular_files_raise_without_blocking_or_leaking_a_descriptor(tmp_path: Any) -> None:
    """A FIFO (no writer: a plain open would block), a directory, a character device."""
    fifo = tmp_path / "x.jsonl"
    os.mkfifo(fifo)
    before = len(os.listdir("/proc/self/fd"))
    for path in (fifo, tmp_path, "/dev/zero"):
        for _ in range(20):
            with pytest.raises(OSError, match="not a regular file"):
                read_lines(str(path), 0, 0, root="/", max_lines=1, max_bytes=1, max_line=8, chunk=4)
    assert len(os.listdir("/proc/self/fd")) == before
