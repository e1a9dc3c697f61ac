"""Files outside the watched tree are never read (issue 9, section 3).

Each case runs the real console script against a real PostgreSQL: a symlink inside the tree
that points at a secret outside it, a symlinked project folder, and a folder swapped for a
symlink after its file was discovered. The secret must appear in no row, log line or status
file; the symlinked file is one content-free ``rejected_events`` row (across restarts); the
files beside it are stored and the service keeps running.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

from sqlalchemy import Engine
from watcher_helpers import new_uuid, project_dir, rows, turn_texts, user, wait_for

from headspace_watcher.sources.reader import (
    OutsideTree,
    content_matches,
    first_session_id,
    open_in_tree,
)

SECRET = "S3CRET-id_rsa-7c1e-do-not-store"
REASON_PREFIX = "outside_tree:"


def secret_file(folder: Path, session: str) -> Path:
    """A file outside the tree that would be stored if read: a valid turn and a bad line."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "id_rsa"
    path.write_bytes(user(session, SECRET) + f"-----BEGIN KEY----- {SECRET}\n".encode())
    return path


def rejected(engine: Engine) -> list[Any]:
    return rows(
        engine,
        "SELECT source_path, raw_text, raw_length, reason, source_seq FROM rejected_events "
        "ORDER BY id",
    )


def assert_secret_nowhere(engine: Engine, *texts: str) -> None:
    leaked = rows(
        engine,
        "SELECT 'events' FROM events WHERE payload::text LIKE :s "
        "UNION ALL SELECT 'rejected' FROM rejected_events "
        "WHERE concat(raw_text, reason, details::text) LIKE :s",
        s=f"%{SECRET}%",
    )
    assert leaked == []
    for text in texts:
        assert SECRET not in text


def test_symlinked_file_to_outside_is_one_contentless_rejection_across_restarts(
    watcher: Any, db_engine: Engine, tmp_path: Path
) -> None:
    good = new_uuid()
    folder = project_dir(watcher.root)
    good_file = folder / f"{good}.jsonl"
    good_file.write_bytes(user(good, "beside the bad one"))
    target = secret_file(tmp_path / "home" / ".ssh", new_uuid())
    evil = folder / f"{new_uuid()}.jsonl"
    evil.symlink_to(target)

    first = watcher.start()
    wait_for(lambda: rejected(db_engine), "the outside_tree row", details=first.log)
    wait_for(lambda: turn_texts(db_engine, good) == ["beside the bad one"], "the good file")
    assert first.stop() == 0

    with target.open("ab") as f:  # the target grows: still never read
        f.write(user(good, SECRET))
    second = watcher.start()
    good_file.write_bytes(good_file.read_bytes() + user(good, "after the restart"))
    wait_for(lambda: len(turn_texts(db_engine, good)) == 2, "a line after the restart")
    assert second.popen.poll() is None

    [(path, raw_text, raw_length, reason, seq)] = rejected(db_engine)
    assert (path, raw_text, raw_length, seq) == (str(evil), "", 0, -1)
    assert reason.startswith(REASON_PREFIX) and "not read" in reason
    log = first.log() + second.log()
    assert "transcript outside the projects root; not read" in log and str(evil) in log
    status = (watcher.state_dir / "status.json").read_text()
    assert_secret_nowhere(db_engine, log, status)
    assert second.stop() == 0


def test_symlinked_project_folder_pointing_outside_is_not_read(
    watcher: Any, db_engine: Engine, tmp_path: Path
) -> None:
    outside = tmp_path / "elsewhere"
    sessions = [new_uuid(), new_uuid()]
    for session in sessions:  # transcripts that would be stored if the folder were followed
        secret_file(outside, session).rename(outside / f"{session}.jsonl")
    (watcher.root / "-before-start").symlink_to(outside, target_is_directory=True)
    good = new_uuid()
    good_file = project_dir(watcher.root) / f"{good}.jsonl"
    good_file.write_bytes(user(good, "one"))

    service = watcher.start()
    wait_for(lambda: turn_texts(db_engine, good) == ["one"], "the good file")
    (watcher.root / "-while-running").symlink_to(outside, target_is_directory=True)
    for session in sessions:  # appends inside the linked folder: no watch may report them
        with (outside / f"{session}.jsonl").open("ab") as f:
            f.write(user(session, SECRET))
    good_file.write_bytes(good_file.read_bytes() + user(good, "two"))
    wait_for(lambda: turn_texts(db_engine, good) == ["one", "two"], "the good file again")
    assert service.popen.poll() is None
    assert service.stop() == 0
    once = watcher.cli("run", "--once")  # a fresh discovery: still not followed
    assert once.returncode == 0, once.stderr

    assert rejected(db_engine) == []
    assert rows(db_engine, "SELECT path FROM sources") == [(str(good_file),)]
    assert_secret_nowhere(db_engine, service.log(), once.stderr)


def test_folder_swapped_for_a_symlink_after_discovery_is_not_read(
    watcher: Any, db_engine: Engine, tmp_path: Path
) -> None:
    """The service is stopped (SIGSTOP) between an append and its read; meanwhile the
    project folder is moved away and a symlink to a decoy with a same-named file takes its
    place. On SIGCONT the queued MODIFY names the old path, which now leads outside."""
    session, good = new_uuid(), new_uuid()
    folder = project_dir(watcher.root, "-victim")
    tracked = folder / f"{session}.jsonl"
    tracked.write_bytes(user(session, "first"))
    good_file = project_dir(watcher.root, "-other") / f"{good}.jsonl"
    good_file.write_bytes(user(good, "one"))
    decoy = tmp_path / "decoy"
    secret_file(decoy, session).rename(decoy / tracked.name)

    service = watcher.start()
    wait_for(lambda: turn_texts(db_engine, session) == ["first"], "the tracked file")
    os.kill(service.pid, signal.SIGSTOP)
    try:
        with tracked.open("ab") as f:
            f.write(user(session, "second"))
        folder.rename(tmp_path / "moved-away")
        folder.symlink_to(decoy, target_is_directory=True)
    finally:
        os.kill(service.pid, signal.SIGCONT)

    wait_for(lambda: rejected(db_engine), "the outside_tree row", details=service.log)
    good_file.write_bytes(good_file.read_bytes() + user(good, "two"))
    wait_for(lambda: turn_texts(db_engine, good) == ["one", "two"], "the other project")

    [(path, raw_text, _length, reason, _seq)] = rejected(db_engine)
    assert (path, raw_text) == (str(tracked), "")
    assert reason.startswith(REASON_PREFIX)
    assert turn_texts(db_engine, session) == ["first"]
    assert service.popen.poll() is None
    assert_secret_nowhere(db_engine, service.log())
    assert service.stop() == 0


def test_every_transcript_open_refuses_a_path_outside_the_root(tmp_path: Path) -> None:
    """The registered-mode session peek and the checkpoint comparison open transcripts too."""
    root = tmp_path / "projects"
    outside = tmp_path / "outside"
    session = new_uuid()
    target = secret_file(outside, session)
    (root / "-p").mkdir(parents=True)
    link = root / "-p" / "notes.jsonl"
    link.symlink_to(target)
    (root / "-linked").symlink_to(outside, target_is_directory=True)
    via_folder = root / "-linked" / "id_rsa"
    inside = root / "-p" / "real.jsonl"
    inside.write_bytes(target.read_bytes())

    for path in (link, via_folder):
        assert first_session_id(str(path), str(root)) is None
        assert not content_matches(str(path), 10, b"x" * 32, root=str(root))
        try:
            open_in_tree(str(path), str(root))
        except OutsideTree:
            pass
        else:
            raise AssertionError(f"{path} was opened")
    assert first_session_id(str(inside), str(root)) == session  # inside: read as before


def test_a_root_retargeted_elsewhere_is_resolved_again(tmp_path: Path) -> None:
    """The root's resolution is cached for speed; a root that now names another directory
    (a symlinked ``projects`` moved to a new disk) is resolved again: the new directory's
    files are read, the old one's are outside the tree, even through a symlink into it."""
    old, new = tmp_path / "old", tmp_path / "new"
    for folder in (old, new):
        (folder / "-p").mkdir(parents=True)
        (folder / "-p" / "a.jsonl").write_bytes(user(new_uuid(), "x"))
    root = tmp_path / "projects"
    root.symlink_to(old, target_is_directory=True)
    os.close(open_in_tree(str(root / "-p" / "a.jsonl"), str(root)))  # resolved: old

    root.unlink()
    root.symlink_to(new, target_is_directory=True)
    (new / "-back").symlink_to(old, target_is_directory=True)
    os.close(open_in_tree(str(root / "-p" / "a.jsonl"), str(root)))  # new: inside
    try:
        open_in_tree(str(root / "-back" / "-p" / "a.jsonl"), str(root))
    except OutsideTree:
        pass
    else:
        raise AssertionError("a file of the root's former directory was opened")
