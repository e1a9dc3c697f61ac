"""Tailer unit tests: ``TreeWatcher`` discovery with real inotify in temp dirs, and
``read_lines`` on real files (partial lines, CRLF, oversized lines, truncation, new inodes)."""

from __future__ import annotations

import os
import shutil
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from watcher_helpers import wait_for

from headspace_watcher.ingest.transcript import parse_line
from headspace_watcher.sources.layout import file_context
from headspace_watcher.sources.reader import (
    REJECT_HEAD_BYTES,
    FileReplaced,
    OutsideTree,
    read_lines,
)
from headspace_watcher.sources.tree import TreeWatcher, WatchChanges

SESSION = "3f2b9c1e-7a4d-4e8b-9c1a-2b3c4d5e6f70"
SESSION_2 = "8e7d6c5b-4a39-4281-9f0e-1d2c3b4a5968"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "projects"
    path.mkdir()
    return path


@pytest.fixture
def make_watcher():  # type: ignore[no-untyped-def]
    made: list[TreeWatcher] = []

    def make(path: Path) -> TreeWatcher:
        w = TreeWatcher(path)
        made.append(w)
        return w

    yield make
    for w in made:
        w.close()


class Collector:
    """Accumulates the watcher's changes across reads until a test's condition holds."""

    def __init__(self, watcher: TreeWatcher) -> None:
        self.watcher = watcher
        self.dirty: set[str] = set()
        self.deleted: set[str] = set()
        self.rescans = 0

    def pump(self) -> WatchChanges:
        changes = self.watcher.read(timeout_ms=20)
        self.dirty |= changes.dirty
        self.deleted |= changes.deleted
        self.rescans += changes.rescan
        return changes

    def until(self, what: str, cond) -> None:  # type: ignore[no-untyped-def]
        def check() -> bool:
            self.pump()
            return bool(cond())

        wait_for(check, what, timeout=5, details=lambda: f"dirty={self.dirty} del={self.deleted}")


def touch(path: Path, data: bytes = b"") -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return str(path)


def read_all(path: Path, start: int = 0, *, max_line: int = 1 << 20, chunk: int = 4096, **kw):  # type: ignore[no-untyped-def]
    return read_lines(
        str(path),
        start,
        os.stat(path).st_ino,
        root=kw.get("root", str(path.parent)),
        max_lines=kw.get("max_lines", 10_000),
        max_bytes=kw.get("max_bytes", 1 << 30),
        max_line=max_line,
        chunk=chunk,
    )


# =========================================================================== discovery


def test_start_discovers_every_transcript_layout_and_nothing_else(root: Path, make_watcher) -> None:
    proj = root / "-home-dev-src-demo"
    want = {
        touch(proj / f"{SESSION}.jsonl", b'{"type":"user"}\n'),
        touch(proj / "agent-a1b2c3.jsonl", b'{"type":"user"}\n'),  # 2.0.x sub-agent
        touch(proj / SESSION / "subagents" / "agent-acompact-946d2b.jsonl", b"{}\n"),  # 2.1.x
        touch(root / "-other-project" / f"{SESSION_2}.jsonl"),  # empty file
    }
    touch(proj / "notes.txt", b"x\n")
    touch(root / "stray.jsonl", b"{}\n")  # directly under the root: not a project file
    touch(proj / SESSION / "tool-results" / "x.jsonl", b"{}\n")
    touch(proj / SESSION / "subagents" / "deeper" / "agent-x.jsonl", b"{}\n")

    w = make_watcher(root)
    found = w.start()

    assert set(found) == want
    assert len(found) == len(want)
    assert w.root_present


def test_project_folders_are_listed_one_at_a_time_and_watched_from_the_start(
    root: Path, make_watcher
) -> None:
    """``watch_tree`` sets every project folder's watch but lists none (a catch-up holds one
    folder's files at a time); a write in a folder not listed yet is still reported, and
    ``list_next`` lists each folder once, sub-agent folders included."""
    a, b = root / "-home-dev-a", root / "-home-dev-b"
    in_a = {touch(a / f"{SESSION}.jsonl"), touch(a / SESSION / "subagents" / "agent-x.jsonl")}
    in_b = {touch(b / f"{SESSION_2}.jsonl")}
    w = make_watcher(root)
    assert w.watch_tree() == []
    assert set(w.unlisted) == {str(a), str(b)}
    c = Collector(w)
    later = touch(b / "agent-late.jsonl", b"{}\n")  # written before its folder is listed
    c.until("the write in the folder not listed yet", lambda: later in c.dirty)
    listed = [set(w.list_next()), set(w.list_next())]
    assert not w.unlisted
    assert sorted(listed, key=len) == sorted([in_b | {later}, in_a], key=len)
    sub = touch(a / SESSION / "subagents" / "agent-y.jsonl", b"{}\n")  # its folder is watched
    c.until("a new sub-agent of a listed folder", lambda: sub in c.dirty)


def test_files_and_folders_created_after_start_are_reported(root: Path, make_watcher) -> None:
    w = make_watcher(root)
    assert w.start() == []
    c = Collector(w)

    proj = root / "-home-dev-new"
    proj.mkdir()
    session = touch(proj / f"{SESSION}.jsonl")
    c.until("the new session file", lambda: session in c.dirty)

    agent20 = touch(proj / "agent-0a1b2c.jsonl", b"{}\n")
    sub = proj / SESSION / "subagents"
    sub.mkdir(parents=True)
    agent21 = touch(sub / "agent-aprompt_suggestion-dcd338.jsonl", b"{}\n")
    c.until("both sub-agent layouts", lambda: {agent20, agent21} <= c.dirty)

    c.dirty.clear()
    with open(session, "ab") as f:
        f.write(b'{"type":"user"}\n')
    c.until("the append to the session file", lambda: session in c.dirty)
    assert not c.deleted


def test_project_folder_moved_in_with_rename_is_discovered(
    root: Path, tmp_path: Path, make_watcher
) -> None:
    w = make_watcher(root)
    w.start()
    c = Collector(w)
    outside = tmp_path / "staging" / "-home-dev-moved"
    files = {
        touch(outside / f"{SESSION}.jsonl", b"{}\n"),
        touch(outside / SESSION / "subagents" / "agent-a881341.jsonl", b"{}\n"),
    }

    os.rename(outside, root / "-home-dev-moved")

    moved = {f.replace(str(outside), str(root / "-home-dev-moved")) for f in files}
    c.until("the files of the moved-in project", lambda: moved <= c.dirty)
    # the moved-in folders are watched: a new file inside is seen too
    later = touch(root / "-home-dev-moved" / SESSION / "subagents" / "agent-later.jsonl")
    c.until("a file created inside the moved-in tree", lambda: later in c.dirty)


def test_deleted_and_moved_out_files_are_reported_as_deleted(
    root: Path, tmp_path: Path, make_watcher
) -> None:
    proj = root / "-home-dev-demo"
    gone = touch(proj / f"{SESSION}.jsonl", b"{}\n")
    moved = touch(proj / f"{SESSION_2}.jsonl", b"{}\n")
    w = make_watcher(root)
    assert len(w.start()) == 2
    c = Collector(w)

    os.unlink(gone)
    os.rename(moved, tmp_path / "elsewhere.jsonl")

    c.until("both removals", lambda: {gone, moved} <= c.deleted)
    assert not ({gone, moved} & c.dirty)


def test_removed_project_folder_drops_its_watches(root: Path, make_watcher) -> None:
    proj = root / "-home-dev-demo"
    path = touch(proj / SESSION / "subagents" / "agent-a1.jsonl", b"{}\n")
    w = make_watcher(root)
    w.start()
    assert w.watch_count == 4  # root, project, <uuid>, subagents
    c = Collector(w)

    shutil.rmtree(proj)

    c.until("the deletion and the dropped watches", lambda: w.watch_count == 1)
    assert path in c.deleted


def test_missing_projects_path_is_awaited_then_watched(tmp_path: Path, make_watcher) -> None:
    root = tmp_path / "home" / ".claude" / "projects"  # its parents are missing too
    w = make_watcher(root)
    assert w.start() == []
    assert not w.root_present
    c = Collector(w)

    (tmp_path / "home").mkdir()
    (tmp_path / "home" / ".claude").mkdir()
    root.mkdir()
    c.until("the projects path to be watched", lambda: w.root_present)

    session = touch(root / "-home-dev-demo" / f"{SESSION}.jsonl", b"{}\n")
    c.until("a session created in the late projects path", lambda: session in c.dirty)


def test_projects_path_created_with_files_in_one_go(tmp_path: Path, make_watcher) -> None:
    root = tmp_path / "a" / "projects"
    w = make_watcher(root)
    assert w.start() == []
    c = Collector(w)
    staging = tmp_path / "staging"
    session = touch(staging / "projects" / "-p" / f"{SESSION}.jsonl", b"{}\n")

    os.rename(staging, tmp_path / "a")  # the whole missing parent appears at once

    want = session.replace(str(staging), str(tmp_path / "a"))
    c.until("the file inside the projects path that appeared", lambda: want in c.dirty)


# =========================================================================== read_lines


def test_partial_trailing_line_is_left_alone_then_read_when_completed(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    path.write_bytes(b'{"a":1}\n{"b":')

    first = read_all(path)
    assert first.lines == [(0, b'{"a":1}')]
    assert first.end_offset == 8
    assert first.size == 13
    assert not first.more

    again = read_all(path, first.end_offset)
    assert again.lines == [] and again.end_offset == 8  # still incomplete: untouched

    with open(path, "ab") as f:
        f.write(b"2}\n")
    second = read_all(path, first.end_offset)
    assert second.lines == [(8, b'{"b":2}')]
    assert second.end_offset == 16


def test_partial_line_longer_than_a_chunk_waits(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    body = b'{"t":"' + b"x" * 10_000 + b'"}'
    path.write_bytes(b"{}\n" + body)

    res = read_all(path, chunk=4096)
    assert res.lines == [(0, b"{}")]
    assert res.oversized == []
    assert res.end_offset == 3

    with open(path, "ab") as f:
        f.write(b"\n")
    res = read_all(path, 3, chunk=4096)
    assert res.lines == [(3, body)]
    assert res.end_offset == len(body) + 4


def test_crlf_lines_keep_exact_offsets_and_parse(tmp_path: Path) -> None:
    path = tmp_path / f"{SESSION}.jsonl"
    one = b'{"type":"user","sessionId":"s","message":{"content":"hi"}}'
    two = b'{"type":"system"}'
    path.write_bytes(one + b"\r\n" + two + b"\r\n" + b"{}\r")

    res = read_all(path)
    assert res.lines == [(0, one + b"\r"), (len(one) + 2, two + b"\r")]
    assert res.end_offset == len(one) + len(two) + 4  # the trailing "{}\r" is not complete
    ctx = file_context(path, tmp_path)
    assert [parse_line(raw, ctx).kind for _, raw in res.lines] == ["turn", "skip"]


def test_line_over_max_line_is_returned_as_oversized_with_bounded_head(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    huge = b'{"t":"' + b"y" * (100 * 1024 - 8) + b'"}'
    assert len(huge) == 100 * 1024
    path.write_bytes(b'{"a":1}\n' + huge + b"\n" + b'{"b":2}\n')

    res = read_all(path, max_line=1024, chunk=4096)

    assert res.lines == [(0, b'{"a":1}'), (8 + len(huge) + 1, b'{"b":2}')]
    assert len(res.oversized) == 1
    over = res.oversized[0]
    assert over.offset == 8
    assert over.length == 100 * 1024
    assert 0 < len(over.head) <= REJECT_HEAD_BYTES
    assert len(over.head) < over.length
    assert huge.startswith(over.head)
    assert res.end_offset == path.stat().st_size
    assert res.count == 3


def test_oversized_line_is_read_in_bounded_memory(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    size = 8 * 1024 * 1024
    with open(path, "wb") as f:
        f.write(b'{"t":"')
        for _ in range(size // 65536):
            f.write(b"z" * 65536)
        f.write(b'"}\n')

    tracemalloc.start()
    try:
        res = read_all(path, max_line=1024, chunk=4096)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert res.oversized[0].length == size + 8
    assert res.lines == []
    assert peak < 512 * 1024, f"peak {peak} bytes while reading an {size}-byte line"


def test_oversized_line_without_newline_yet_is_not_consumed(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    path.write_bytes(b"{}\n" + b"q" * 50_000)

    res = read_all(path, max_line=1024, chunk=4096)

    assert res.lines == [(0, b"{}")]
    assert res.oversized == []
    assert res.end_offset == 3


def test_limits_stop_the_read_and_say_more(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    path.write_bytes(b"".join(b'{"n":%d}\n' % i for i in range(10)))

    res = read_all(path, max_lines=4)
    assert [o for o, _ in res.lines] == [0, 8, 16, 24]
    assert res.more
    rest = read_all(path, res.end_offset)
    assert len(rest.lines) == 6
    assert not rest.more
    assert rest.end_offset == path.stat().st_size


def test_truncation_below_checkpoint_raises_file_replaced(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    path.write_bytes(b'{"a":1}\n{"b":2}\n{"c":3}\n')
    done = read_all(path)
    inode = path.stat().st_ino

    with open(path, "r+b") as f:
        f.truncate(8)

    with pytest.raises(FileReplaced) as info:
        read_lines(
            str(path), done.end_offset, inode, root=str(tmp_path), max_lines=10, max_bytes=1 << 20,
            max_line=1 << 20, chunk=4096,
        )  # fmt: skip
    assert info.value.identity.size == 8
    assert info.value.identity.inode == inode


def test_new_inode_at_the_same_path_raises_file_replaced(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    path.write_bytes(b'{"a":1}\n')
    old_inode = path.stat().st_ino
    tmp = tmp_path / "new.jsonl"
    tmp.write_bytes(b'{"a":1}\n{"b":2}\n')

    os.replace(tmp, path)

    new_inode = path.stat().st_ino
    assert new_inode != old_inode
    with pytest.raises(FileReplaced) as info:
        read_lines(
            str(path), 0, old_inode, root=str(tmp_path), max_lines=10, max_bytes=1 << 20,
            max_line=1 << 20, chunk=4096,
        )  # fmt: skip
    assert info.value.identity.inode == new_inode
    assert info.value.identity.size == 16


def test_projects_path_appearing_while_the_watch_is_set_up_loses_no_file(
    tmp_path: Path, make_watcher
) -> None:
    """The root is missing at the first check but present (with a file) by the time the
    ancestor watch is in place: that file must still be reported."""
    root = tmp_path / "projects"
    session = touch(root / "-p" / f"{SESSION}.jsonl", b"{}\n")
    checks = {"n": 0}

    class AppearsLate(type(Path())):  # type: ignore[misc]
        def is_dir(self) -> bool:  # type: ignore[override]
            if str(self) == str(root):
                checks["n"] += 1
                if checks["n"] == 1:
                    return False  # as if it did not exist yet at the first check
            return super().is_dir()

    w = make_watcher(root)
    w.root = AppearsLate(root)

    assert w.start() == [session]
    assert w.root_present


@pytest.mark.parametrize("chunk", [4096, 1 << 20])
def test_line_of_exactly_max_line_is_kept_and_one_more_byte_is_oversized(
    tmp_path: Path, chunk: int
) -> None:
    max_line = 10_000  # longer than a 4 KiB chunk: the multi-chunk path
    fits = b"a" * max_line
    over = b"b" * (max_line + 1)
    path = tmp_path / "s.jsonl"
    path.write_bytes(fits + b"\n" + over + b"\n" + b"{}\n")

    res = read_all(path, max_line=max_line, chunk=chunk)

    assert res.lines == [(0, fits), (2 * max_line + 3, b"{}")]
    assert [(o.offset, o.length) for o in res.oversized] == [(max_line + 1, max_line + 1)]
    assert over.startswith(res.oversized[0].head)
    assert res.end_offset == path.stat().st_size


def _rchar() -> int:
    """Bytes this thread has read through read(2)/pread(2) so far (the kernel's count)."""
    with open("/proc/thread-self/io") as f:
        return int(next(x for x in f if x.startswith("rchar:")).split()[1])


@pytest.mark.parametrize("chunk", [4096, 1 << 20])  # the line grows past a chunk / stays in one
def test_a_never_ending_line_costs_reads_proportional_to_its_appends(
    tmp_path: Path, chunk: int
) -> None:
    """200 appends to a line without its newline: each read scans on from where the last one
    stopped (issue 9: it rescanned the whole line, O(n²) bytes; here O(n))."""
    path = tmp_path / "s.jsonl"
    path.write_bytes(b"{}\n" + b'{"t":"')
    inode = path.stat().st_ino
    append_size, appends = 4096, 200
    resume = None
    read = 0
    for i in range(appends):
        with open(path, "ab") as f:
            f.write(bytes([97 + i % 26]) * append_size)
        before = _rchar()
        res = read_lines(
            str(path), 3, inode, root=str(tmp_path), max_lines=100, max_bytes=1 << 30,
            max_line=1 << 30, chunk=chunk, resume=resume,
        )  # fmt: skip
        read += _rchar() - before
        assert (res.lines, res.end_offset) == ([], 3)
        resume = res.partial
    size = path.stat().st_size
    # O(n): each read scans its append plus fingerprints; a rescan would read ~100x the line
    assert read < 2 * size, f"{read} bytes read for a {size}-byte file over {appends} appends"

    with open(path, "ab") as f:
        f.write(b'"}\n{}\n')
    res = read_lines(
        str(path), 3, inode, root=str(tmp_path), max_lines=100, max_bytes=1 << 30,
        max_line=1 << 30, chunk=chunk, resume=resume,
    )  # fmt: skip
    assert res.lines == [(3, path.read_bytes()[3:-4]), (size + 3, b"{}")]
    assert res.partial is None


def test_a_resumed_over_long_line_is_rejected_with_its_head_and_full_length(
    tmp_path: Path,
) -> None:
    path = tmp_path / "s.jsonl"
    body = bytes(range(32, 127)) * 2000  # 190,000 bytes, no newline
    path.write_bytes(body[:70_000])
    inode = path.stat().st_ino
    first = read_all(path, max_line=100_000)
    assert first.partial is not None and first.partial.scanned == 70_000
    with open(path, "ab") as f:
        f.write(body[70_000:] + b"\n")
    res = read_lines(
        str(path), 0, inode, root=str(tmp_path), max_lines=10, max_bytes=1 << 30,
        max_line=100_000, chunk=4096, resume=first.partial,
    )  # fmt: skip
    [over] = res.oversized
    assert (over.offset, over.length, over.head) == (0, len(body), body[:REJECT_HEAD_BYTES])
    assert res.end_offset == len(body) + 1


def test_a_partial_line_rewritten_in_place_is_scanned_again_from_its_start(
    tmp_path: Path,
) -> None:
    """The remembered scan is only trusted while the bytes before its end are unchanged: a
    rewrite (same inode, not shorter) that puts a newline inside the scanned part is found."""
    path = tmp_path / "s.jsonl"
    path.write_bytes(b"{}\n" + b"a" * 10_000)
    inode = path.stat().st_ino
    first = read_all(path, 3)
    assert first.partial is not None
    with open(path, "r+b") as f:
        f.write(b"{}\n" + b"b" * 5_000 + b"\n" + b"c" * 6_000)
    res = read_lines(
        str(path), 3, inode, root=str(tmp_path), max_lines=10, max_bytes=1 << 30,
        max_line=1 << 20, chunk=4096, resume=first.partial,
    )  # fmt: skip
    assert res.lines == [(3, b"b" * 5_000)]
    assert res.partial is not None and res.partial.offset == 5_004


def test_a_symlinked_transcript_or_folder_is_not_opened(tmp_path: Path) -> None:
    root = tmp_path / "projects"
    secret = tmp_path / "secret.jsonl"
    secret.write_bytes(b'{"k":"secret"}\n')
    (root / "-p").mkdir(parents=True)
    (root / "-p" / "evil.jsonl").symlink_to(secret)
    (root / "-linked").symlink_to(tmp_path, target_is_directory=True)
    for path in (root / "-p" / "evil.jsonl", root / "-linked" / "secret.jsonl"):
        with pytest.raises(OutsideTree):
            read_lines(
                str(path), 0, secret.stat().st_ino, root=str(root), max_lines=10,
                max_bytes=1 << 20, max_line=1 << 20, chunk=4096,
            )  # fmt: skip


def test_a_symlinked_folder_is_neither_listed_nor_watched(root: Path, make_watcher) -> None:
    outside = root.parent / "outside"
    touch(outside / f"{SESSION}.jsonl", b"{}\n")
    (root / "-linked").symlink_to(outside, target_is_directory=True)
    w = make_watcher(root)
    assert w.start() == []
    assert w.watch_count == 1  # the root only
    w._add_tree(root / "-linked", 1)  # as if it had been a folder at the scan
    assert w.watch_count == 1


def test_the_service_scans_a_never_ending_line_once_over_many_appends(
    watcher: Any, db_engine: Any
) -> None:
    """The real service: 200 appends to a line that never ends, each followed by a complete
    line in another file as a barrier (both are read in the same round). The service's read(2)
    bytes (``/proc/<pid>/io``) stay proportional to the bytes appended."""
    from watcher_helpers import new_uuid, project_dir, turn_texts, user

    folder = project_dir(watcher.root)
    barrier_session = new_uuid()
    partial = folder / f"{new_uuid()}.jsonl"
    partial.write_bytes(b'{"type":"user","message":{"content":"')
    barrier = folder / f"{barrier_session}.jsonl"
    barrier.write_bytes(b"")
    service = watcher.start()

    def rchar() -> int:
        io = Path(f"/proc/{service.pid}/io").read_text()
        return int(next(x for x in io.splitlines() if x.startswith("rchar:")).split()[1])

    before = rchar()
    appends = 200
    for i in range(appends):
        with open(partial, "ab") as f:
            f.write(b"x" * 4096)
        with open(barrier, "ab") as f:
            f.write(user(barrier_session, f"barrier {i}"))
        wait_for(lambda i=i: len(turn_texts(db_engine, barrier_session)) == i + 1, "the barrier")
    read = rchar() - before
    size = partial.stat().st_size + barrier.stat().st_size
    assert service.popen.poll() is None
    assert read < 4 * size, f"the service read {read} bytes over {appends} appends of {size}"
    assert service.stop() == 0
