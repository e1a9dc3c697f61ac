"""The watcher end to end: real files, real inotify, real PostgreSQL.

``Service.run(once=True)`` in-process for catch-up behaviour, the real console script
(``headspace-watcher run``) for live behaviour. Every test ends with the exactly-once
invariant where it applies (``assert_exactly_once`` in conftest.py).
"""

from __future__ import annotations

import os
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from watcher_helpers import (
    BASE_TIME,
    append,
    assistant,
    conversation,
    count,
    line,
    message_line,
    new_uuid,
    other,
    project_dir,
    rows,
    scalar,
    session_events,
    source_row,
    table_counts,
    turn_texts,
    user,
    wait_for,
)

S1 = "11111111-2222-4333-8444-555555555555"
S2 = "66666666-7777-4888-8999-aaaaaaaaaaaa"


def now() -> datetime:
    return datetime.now(UTC)


def turns_at(engine, path: Path, generation: int | None = None) -> int:  # type: ignore[no-untyped-def]
    sql = (
        "SELECT count(*) FROM events e JOIN sources s ON s.id = e.source_id "
        "WHERE e.event_type = 'turn_detected' AND s.path = :p"
    )
    if generation is not None:
        sql += " AND e.source_generation = :g"
    return int(scalar(engine, sql, p=str(path), g=generation))


# =========================================================================== catch-up (--once)


def test_once_ingests_sessions_and_both_subagent_layouts(watcher, db_engine, exactly_once) -> None:
    proj = project_dir(watcher.root)
    cwd = "/home/dev/src/demo"
    session = proj / f"{S1}.jsonl"
    append(session, *conversation(S1, 4, cwd=cwd), other(S1), other(S1, "file-history-snapshot"))
    agent20 = proj / "agent-a1b2c3.jsonl"  # Claude Code 2.0.x: beside the session
    append(
        agent20,
        user(S1, "sub task", isSidechain=True, agentId="a1b2c3", cwd=cwd),
        assistant(S1, "sub answer", isSidechain=True, agentId="a1b2c3", cwd=cwd),
    )
    agent21 = proj / S1 / "subagents" / "agent-acompact-946d2b.jsonl"  # 2.1.x
    append(agent21, assistant(S1, "compacted", isSidechain=True, agentId="acompact-946d2b"))

    watcher.run_once()

    exactly_once(db_engine, watcher.root, max_line_bytes=watcher.max_line_bytes)
    assert turns_at(db_engine, session) == 4
    assert turns_at(db_engine, agent20) == 2
    assert turns_at(db_engine, agent21) == 1
    subs = rows(
        db_engine,
        "SELECT payload->>'session_uuid', payload->>'subagent_id', payload->>'is_sidechain' "
        "FROM events WHERE event_type = 'turn_detected' AND payload ? 'subagent_id' ORDER BY 2",
    )
    assert [tuple(r) for r in subs] == [
        (S1, "a1b2c3", "true"),
        (S1, "a1b2c3", "true"),
        (S1, "acompact-946d2b", "true"),
    ]
    missing_fk = scalar(
        db_engine,
        "SELECT count(*) FROM events WHERE event_type = 'turn_detected' "
        "AND (project_id IS NULL OR agent_id IS NULL)",
    )
    assert missing_fk == 0
    assert [r[0] for r in rows(db_engine, "SELECT path FROM projects")] == [cwd]
    assert len(session_events(db_engine, S1, "session_registered")) == 1


def test_turn_payload_carries_text_and_extras(watcher, db_engine) -> None:
    at = BASE_TIME + timedelta(seconds=7)
    msg = new_uuid()
    content = [
        {"type": "text", "text": "first part"},
        {"type": "tool_use", "name": "Bash", "input": {}},
        {"type": "text", "text": "second part"},
    ]
    append(
        project_dir(watcher.root) / f"{S1}.jsonl",
        message_line(
            "assistant",
            S1,
            content,
            at=at,
            msg_uuid=msg,
            cwd="/srv/app",
            gitBranch="feature/x",
        ),
    )

    watcher.run_once()

    ((ts, payload),) = rows(
        db_engine, "SELECT timestamp, payload FROM events WHERE event_type = 'turn_detected'"
    )
    assert ts == at  # the line's time, not the write time
    assert payload["text"] == "first part\nsecond part"
    assert payload["actor"] == "agent"
    assert payload["source"] == "polling"
    assert payload["session_uuid"] == S1
    assert payload["message_uuid"] == msg
    assert payload["cwd"] == "/srv/app"
    assert payload["git_branch"] == "feature/x"
    assert payload["tool_uses"] == ["Bash"]
    assert datetime.fromisoformat(payload["turn_timestamp"]) == at


def test_huge_line_becomes_one_rejection_with_its_full_length(
    watcher, db_engine, exactly_once
) -> None:
    watcher.configure(file_watcher={"max_line_bytes": 1024})
    path = project_dir(watcher.root) / f"{S1}.jsonl"
    huge = user(S1, "h" * (100 * 1024))
    append(path, user(S1, "before"), huge, user(S1, "after"))

    watcher.run_once()

    ((raw_length, raw_text, reason, offset),) = rows(
        db_engine, "SELECT raw_length, raw_text, reason, byte_offset FROM rejected_events"
    )
    assert raw_length == len(huge) - 1  # the full line, without its newline
    assert len(raw_text) < raw_length  # a bounded head, not the whole line
    assert "line_too_long" in reason
    assert offset == len(user(S1, "before"))
    assert turn_texts(db_engine) == ["before", "after"]
    exactly_once(db_engine, watcher.root, max_line_bytes=1024)


def test_invalid_utf8_and_malformed_lines_are_rejected_one_row_each(
    watcher, db_engine, exactly_once
) -> None:
    path = project_dir(watcher.root) / f"{S1}.jsonl"
    bad = [
        b'{"type":"user","sessionId":"x","message":{"content":"\xff\xfe bad"}}\n',  # not UTF-8
        b"this is not json\n",
        b"[1, 2, 3]\n",  # JSON, but not an object
        b'{"type": "user", "message": \n',  # truncated JSON
    ]
    crlf = user(S1, "ok 2").replace(b"\n", b"\r\n")
    append(path, user(S1, "ok 1"), *bad, b"   \t\n", crlf)

    watcher.run_once()

    reasons = [r[0] for r in rows(db_engine, "SELECT reason FROM rejected_events ORDER BY 1")]
    assert len(reasons) == 4
    assert any(r.startswith("invalid_utf8") for r in reasons)
    assert any(r.startswith("not_an_object") for r in reasons)
    assert sum(r.startswith("invalid_json") for r in reasons) == 2
    assert turn_texts(db_engine) == ["ok 1", "ok 2"]
    assert watcher.status_file()["rejected"] == 4
    exactly_once(db_engine, watcher.root, max_line_bytes=watcher.max_line_bytes)


def test_nul_and_lone_surrogate_escapes_are_stored_and_flagged(
    watcher, db_engine, exactly_once
) -> None:
    path = project_dir(watcher.root) / f"{S1}.jsonl"
    nul = user(S1, "PLACEHOLDER").replace(b"PLACEHOLDER", b"before\\u0000after")
    lone = user(S1, "PLACEHOLDER").replace(b"PLACEHOLDER", b"x\\ud800y")
    assert b"\\u0000" in nul and b"\\ud800" in lone
    append(path, nul, lone, user(S1, "clean"))

    watcher.run_once()

    stored = rows(
        db_engine,
        "SELECT payload->>'text', payload->'sanitized' FROM events "
        "WHERE event_type = 'turn_detected' ORDER BY source_offset",
    )
    assert [tuple(r) for r in stored] == [
        ("before\ufffdafter", True),
        ("x\ufffdy", True),
        ("clean", None),
    ]
    assert count(db_engine) >= 3
    assert scalar(db_engine, "SELECT count(*) FROM rejected_events") == 0
    exactly_once(db_engine, watcher.root, max_line_bytes=watcher.max_line_bytes)


def test_unknown_and_turnless_lines_are_counted_without_events(
    watcher, db_engine, exactly_once
) -> None:
    path = project_dir(watcher.root) / f"{S1}.jsonl"
    turnless = [
        other(S1, "progress"),
        other(S1, "system"),
        line({"type": "summary", "summary": "x", "leafUuid": new_uuid()}),
        line({"type": "file-history-snapshot", "messageId": new_uuid(), "snapshot": {}}),
        line({"type": "queue-operation", "operation": "enqueue", "sessionId": S1}),
        line({"type": "a-type-from-the-future", "sessionId": S1, "whatever": [1, 2]}),
        line({"noType": True}),
        message_line("assistant", S1, [{"type": "tool_use", "name": "Read", "input": {}}]),
        message_line("assistant", S1, [{"type": "thinking", "thinking": "hmm"}]),
        message_line("user", S1, [{"type": "tool_result", "content": "ok"}]),
        message_line("assistant", S1, [{"type": "text", "text": "\n\n"}]),
        message_line("user", S1, "   "),
    ]
    append(path, *turnless)

    watcher.run_once()

    assert count(db_engine, "turn_detected") == 0
    assert scalar(db_engine, "SELECT count(*) FROM rejected_events") == 0
    assert watcher.status_file()["skipped"] == len(turnless)
    assert source_row(db_engine, path).lines_committed == len(turnless)
    exactly_once(db_engine, watcher.root, max_line_bytes=watcher.max_line_bytes)


def test_message_uuid_recurring_in_a_resumed_session_is_stored_for_both(
    watcher, db_engine, exactly_once
) -> None:
    proj = project_dir(watcher.root)
    u1, u2 = new_uuid(), new_uuid()
    append(proj / f"{S1}.jsonl", user(S1, "q", msg_uuid=u1), assistant(S1, "a", msg_uuid=u2))
    # the resumed session copies the history (same uuids) under its own sessionId
    append(
        proj / f"{S2}.jsonl",
        user(S2, "q", msg_uuid=u1),
        assistant(S2, "a", msg_uuid=u2),
        user(S2, "next"),
    )

    watcher.run_once()

    found = rows(
        db_engine,
        "SELECT payload->>'message_uuid', payload->>'session_uuid' FROM events "
        "WHERE event_type = 'turn_detected' AND payload->>'message_uuid' IN (:a, :b) ORDER BY 1, 2",
        a=u1,
        b=u2,
    )
    assert sorted(tuple(r) for r in found) == sorted([(u1, S1), (u1, S2), (u2, S1), (u2, S2)])
    assert count(db_engine, "turn_detected") == 5
    exactly_once(db_engine, watcher.root, max_line_bytes=watcher.max_line_bytes)


def test_restart_mid_file_continues_at_the_checkpoint(watcher, db_engine, exactly_once) -> None:
    path = project_dir(watcher.root) / f"{S1}.jsonl"
    lines = conversation(S1, 10)
    partial = user(S1, "completed after the restart")
    append(path, *lines[:5], partial[:20])

    watcher.run_once()
    assert count(db_engine, "turn_detected") == 5
    assert source_row(db_engine, path).committed_offset == sum(map(len, lines[:5]))

    with open(path, "r+b") as f:  # finish the partial line and add the rest
        f.seek(sum(map(len, lines[:5])))
        f.write(b"".join(lines[5:]) + partial)
    watcher.run_once()

    texts = turn_texts(db_engine)
    assert len(texts) == 11
    assert len(set(texts)) == 11
    assert texts[-1] == "completed after the restart"
    exactly_once(db_engine, watcher.root, max_line_bytes=watcher.max_line_bytes)


def test_truncated_file_is_read_from_zero_as_a_new_generation(
    watcher, db_engine, exactly_once
) -> None:
    path = project_dir(watcher.root) / f"{S1}.jsonl"
    append(path, *conversation(S1, 4))
    watcher.run_once()
    before = source_row(db_engine, path)

    path.write_bytes(user(S1, "after truncation"))  # same inode, shorter than the checkpoint
    watcher.run_once()

    after = source_row(db_engine, path)
    assert after.id == before.id
    assert after.generation == before.generation + 1
    assert after.committed_offset == path.stat().st_size
    assert turns_at(db_engine, path, before.generation) == 4  # what was stored stays
    assert turns_at(db_engine, path, after.generation) == 1
    exactly_once(db_engine, watcher.root, max_line_bytes=watcher.max_line_bytes)


def test_replaced_file_with_other_content_is_a_new_generation(
    watcher, db_engine, exactly_once
) -> None:
    path = project_dir(watcher.root) / f"{S1}.jsonl"
    append(path, *conversation(S1, 3))
    watcher.run_once()
    before = source_row(db_engine, path)
    tmp = path.with_suffix(".tmp")
    append(tmp, *(user(S1, f"different {i}") for i in range(5)))  # longer than before
    assert tmp.stat().st_size > before.committed_offset

    os.replace(tmp, path)
    watcher.run_once()

    after = source_row(db_engine, path)
    assert after.generation == before.generation + 1
    assert after.inode == path.stat().st_ino
    assert turns_at(db_engine, path, after.generation) == 5  # read from 0
    assert turns_at(db_engine, path) == 3 + 5
    exactly_once(db_engine, watcher.root, max_line_bytes=watcher.max_line_bytes)


def test_replaced_by_a_copy_with_appended_lines_continues_at_checkpoint(
    watcher, db_engine, exactly_once
) -> None:
    path = project_dir(watcher.root) / f"{S1}.jsonl"
    lines = conversation(S1, 6)
    append(path, *lines[:4])
    watcher.run_once()
    before = source_row(db_engine, path)
    tmp = path.with_suffix(".tmp")
    shutil.copyfile(path, tmp)
    append(tmp, *lines[4:])

    os.replace(tmp, path)
    watcher.run_once()

    after = source_row(db_engine, path)
    assert after.generation == before.generation
    assert after.inode == path.stat().st_ino != before.inode
    assert turns_at(db_engine, path) == 6
    assert len(set(turn_texts(db_engine))) == 6
    exactly_once(db_engine, watcher.root, max_line_bytes=watcher.max_line_bytes)


def test_run_once_twice_the_second_stores_nothing(watcher, db_engine, exactly_once) -> None:
    proj = project_dir(watcher.root)
    append(proj / f"{S1}.jsonl", *conversation(S1, 6), b"garbage\n", other(S1))
    append(proj / S1 / "subagents" / "agent-a9.jsonl", assistant(S1, "sub", agentId="a9"))

    watcher.run_once()
    before = table_counts(db_engine)
    watcher.run_once()

    assert table_counts(db_engine) == before
    status = watcher.status_file()
    assert (status["lines_read"], status["events_written"]) == (0, 0)
    assert before["events"] > 0 and before["rejected_events"] == 1
    exactly_once(db_engine, watcher.root, max_line_bytes=watcher.max_line_bytes)


def test_once_with_a_missing_projects_path_is_an_error_storing_nothing(watcher, db_engine) -> None:
    from headspace_watcher.config import ConfigError

    watcher.root.rmdir()  # issue 11: a mistyped path must not report "caught up"

    with pytest.raises(ConfigError, match=r"projects path .* does not exist"):
        watcher.run_once()

    assert table_counts(db_engine)["events"] == 0
    assert table_counts(db_engine)["sources"] == 0


def test_exactly_once_check_catches_a_lost_or_duplicated_line(
    watcher, db_engine, exactly_once
) -> None:
    path = project_dir(watcher.root) / f"{S1}.jsonl"
    append(path, *conversation(S1, 3), b"junk\n")
    watcher.run_once()
    exactly_once(db_engine, watcher.root, max_line_bytes=watcher.max_line_bytes)

    with db_engine.begin() as conn:  # a turn lost
        conn.exec_driver_sql(
            "DELETE FROM events WHERE id = "
            "(SELECT max(id) FROM events WHERE event_type = 'turn_detected')"
        )
    with pytest.raises(AssertionError, match="turn rows"):
        exactly_once(db_engine, watcher.root, max_line_bytes=watcher.max_line_bytes)

    append(path, user(S1, "not yet ingested"))  # a complete line never committed
    with pytest.raises(AssertionError, match="committed_offset"):
        exactly_once(db_engine, watcher.root, max_line_bytes=watcher.max_line_bytes)


# =========================================================================== real transcripts


@pytest.mark.transcripts
def test_real_transcripts_are_accounted_exactly_once(
    watcher, db_engine, shared_transcripts, exactly_once
) -> None:
    max_line = 64 * 1024 * 1024
    watcher.configure(
        file_watcher={"max_line_bytes": max_line, "read_chunk_bytes": 1024 * 1024},
    )
    shared = str(shared_transcripts)

    done = watcher.cli("run", "--once", HEADSPACE_PROJECTS_PATH=shared)
    assert done.returncode == 0, done.stderr[-3000:]

    expected = exactly_once(db_engine, shared_transcripts, max_line_bytes=max_line)
    want_turns = sum(len(e.turns) for e in expected.values())
    want_rejects = sum(len(e.rejects) for e in expected.values())
    assert len(expected) >= 60  # session files and sub-agents of both layouts
    assert any("/subagents/" in p for p in expected)
    assert want_turns > 0
    assert count(db_engine, "turn_detected") == want_turns
    assert scalar(db_engine, "SELECT count(*) FROM rejected_events") == want_rejects
    before = table_counts(db_engine)

    again = watcher.cli("run", "--once", HEADSPACE_PROJECTS_PATH=shared)
    assert again.returncode == 0, again.stderr[-3000:]
    assert table_counts(db_engine) == before


# =========================================================================== live (subprocess)


def test_live_appends_and_a_partial_line_completed_later(watcher, db_engine, exactly_once) -> None:
    proj = project_dir(watcher.root)
    a, b = proj / f"{S1}.jsonl", proj / f"{S2}.jsonl"
    append(a, user(S1, "one", at=now()))
    append(b, user(S2, "b one", at=now()))
    proc = watcher.start()
    wait_for(lambda: count(db_engine, "turn_detected") == 2, "the initial lines", details=proc.log)

    append(a, assistant(S1, "two", at=now()))
    wait_for(lambda: turns_at(db_engine, a) == 2, "an appended line", details=proc.log)

    committed = source_row(db_engine, a).committed_offset
    third = user(S1, "three, written in two pieces", at=now())
    append(a, third[:25])  # no newline yet
    append(b, user(S2, "b two", at=now()))  # a barrier: once this is in, `a` was looked at
    wait_for(lambda: turns_at(db_engine, b) == 2, "the barrier line", details=proc.log)
    assert source_row(db_engine, a).committed_offset == committed
    assert turns_at(db_engine, a) == 2
    assert scalar(db_engine, "SELECT count(*) FROM rejected_events") == 0

    append(a, third[25:])
    wait_for(lambda: turns_at(db_engine, a) == 3, "the completed line", details=proc.log)
    assert turn_texts(db_engine, S1)[-1] == "three, written in two pieces"
    assert proc.stop() == 0
    exactly_once(db_engine, watcher.root, max_line_bytes=watcher.max_line_bytes)


def test_live_new_projects_and_subagents_appearing(
    watcher, db_engine, exactly_once, tmp_path: Path
) -> None:
    watcher.root.rmdir()  # the projects path does not exist when the service starts
    proc = watcher.start()

    proj = project_dir(watcher.root, "-home-dev-late")
    append(proj / f"{S1}.jsonl", user(S1, "in a late project", at=now()))
    wait_for(lambda: count(db_engine, "turn_detected") == 1, "the late project", details=proc.log)

    append(proj / "agent-b7c8d9.jsonl", assistant(S1, "2.0 sub", agentId="b7c8d9", at=now()))
    sub = proj / S1 / "subagents" / "agent-aprompt_suggestion-026308.jsonl"
    append(sub, assistant(S1, "2.1 sub", agentId="aprompt_suggestion-026308", at=now()))
    wait_for(lambda: count(db_engine, "turn_detected") == 3, "both sub-agents", details=proc.log)

    staging = tmp_path / "staging" / "-home-dev-moved"
    append(staging / f"{S2}.jsonl", *conversation(S2, 2, start=now()))
    append(staging / S2 / "subagents" / "agent-x1.jsonl", assistant(S2, "x", agentId="x1"))
    os.rename(staging, watcher.root / "-home-dev-moved")
    wait_for(lambda: count(db_engine, "turn_detected") == 6, "the moved-in project")

    assert proc.stop() == 0
    assert set(turn_texts(db_engine, S1)) == {"in a late project", "2.0 sub", "2.1 sub"}
    exactly_once(db_engine, watcher.root, max_line_bytes=watcher.max_line_bytes)


def test_live_deleting_a_session_file_ends_the_session_closed(watcher, db_engine) -> None:
    path = project_dir(watcher.root) / f"{S1}.jsonl"
    append(path, *conversation(S1, 2, start=now()))
    proc = watcher.start()
    wait_for(lambda: session_events(db_engine, S1, "session_registered"), "registration")

    path.unlink()

    ended = wait_for(
        lambda: session_events(db_engine, S1, "session_ended"), "session_ended", details=proc.log
    )
    assert proc.stop() == 0
    assert len(ended) == 1
    assert ended[0]["reason"] == "closed"
    assert scalar(db_engine, "SELECT state FROM sessions WHERE session_uuid = :s", s=S1) == "ended"


def test_live_truncation_starts_a_new_generation(watcher, db_engine, exactly_once) -> None:
    path = project_dir(watcher.root) / f"{S1}.jsonl"
    append(path, *conversation(S1, 4, start=now()))
    proc = watcher.start()
    wait_for(lambda: turns_at(db_engine, path) == 4, "the first lines", details=proc.log)

    path.write_bytes(user(S1, "rewritten", at=now()))  # truncates in place, then one line

    wait_for(lambda: turns_at(db_engine, path, 1) == 1, "the new generation", details=proc.log)
    append(path, assistant(S1, "and more", at=now()))
    wait_for(lambda: turns_at(db_engine, path, 1) == 2, "an append to it", details=proc.log)
    assert proc.stop() == 0
    assert turns_at(db_engine, path, 0) == 4
    exactly_once(db_engine, watcher.root, max_line_bytes=watcher.max_line_bytes)


def test_live_replacement_by_copy_continues_and_by_other_content_restarts(
    watcher, db_engine, exactly_once
) -> None:
    path = project_dir(watcher.root) / f"{S1}.jsonl"
    lines = conversation(S1, 5, start=now())
    append(path, *lines[:3])
    proc = watcher.start()
    wait_for(lambda: turns_at(db_engine, path) == 3, "the first lines", details=proc.log)

    tmp = path.with_suffix(".tmp")
    shutil.copyfile(path, tmp)
    append(tmp, *lines[3:])
    os.replace(tmp, path)  # same content plus two lines, new inode
    wait_for(lambda: turns_at(db_engine, path) == 5, "the appended lines", details=proc.log)
    assert source_row(db_engine, path).generation == 0

    other_content = [user(S1, f"another file {i}", at=now()) for i in range(8)]
    append(tmp, *other_content)
    os.replace(tmp, path)  # different content, new inode
    wait_for(lambda: turns_at(db_engine, path, 1) == 8, "the new generation", details=proc.log)

    assert proc.stop() == 0
    assert turns_at(db_engine, path, 0) == 5
    assert len(turn_texts(db_engine)) == len(set(turn_texts(db_engine))) == 13
    exactly_once(db_engine, watcher.root, max_line_bytes=watcher.max_line_bytes)


def test_live_steady_appends_to_many_files_cause_no_checkpoint_conflict(
    watcher, db_engine, exactly_once
) -> None:
    """The service remembers its own commits: a file's next batch starts at the checkpoint it
    just wrote, so the guard never refuses one (a refusal costs a reload and a re-read)."""
    proj = project_dir(watcher.root)
    sessions = [new_uuid() for _ in range(3)]
    paths = [proj / f"{s}.jsonl" for s in sessions]
    proc = watcher.start()

    for rnd in range(5):
        for session, path in zip(sessions, paths, strict=True):
            append(path, *conversation(session, 4, start=now() + timedelta(seconds=10 * rnd)))
        wait_for(
            lambda n=rnd: count(db_engine, "turn_detected") == 12 * (n + 1),
            f"round {rnd} committed",
            details=proc.log,
        )

    assert proc.stop() == 0
    status = watcher.status_file()
    assert status["state"] == "stopped"
    assert status["events_written"] == 60 + 3  # turns + one session_registered each
    assert status["checkpoint_conflicts"] == 0, status
    assert status["lag_bytes"] == 0
    exactly_once(db_engine, watcher.root, max_line_bytes=watcher.max_line_bytes)


def test_a_batch_ends_mid_file_and_holds_the_start_of_the_next(
    watcher, db_engine, exactly_once
) -> None:
    """batch_max_lines 10 over three files of 7 lines: batches {A:7, B:3}, {B:4, C:6}, {C:1}
    — one transaction each (read by PostgreSQL's xmin), every line exactly once."""
    watcher.configure(file_watcher={"batch_max_lines": 10})
    proj = project_dir(watcher.root)
    for _ in range(3):
        session = new_uuid()
        append(proj / f"{session}.jsonl", *conversation(session, 7))

    watcher.run_once()

    per_txn = rows(
        db_engine,
        "SELECT e.xmin::text AS txn, s.path, count(*) AS n, min(e.id) AS first "
        "FROM events e JOIN sources s ON s.id = e.source_id "
        "WHERE e.event_type = 'turn_detected' GROUP BY 1, 2 ORDER BY 4",
    )
    batches: dict[str, list[tuple[str, int]]] = {}
    for r in per_txn:
        batches.setdefault(r.txn, []).append((r.path, r.n))
    shape = [[n for _path, n in files] for files in batches.values()]
    assert shape == [[7, 3], [4, 6], [1]], shape
    first, second, _third = batches.values()
    assert first[1][0] == second[0][0]  # the file cut by the first batch continues the second
    assert watcher.status_file()["lines_read"] == 21
    exactly_once(db_engine, watcher.root, max_line_bytes=watcher.max_line_bytes)
