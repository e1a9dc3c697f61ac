"""The transcript parser against the contract's rule, line by line and over real transcripts."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from headspace_watcher.ingest.transcript import LineOutcome, parse_line
from headspace_watcher.records import FileContext
from headspace_watcher.sources.layout import file_context
from headspace_watcher.taxonomy import validate_payload

ROOT = "/home/u/.claude/projects"
SESSION = "0b7a6d3e-1c2f-4a5b-9c8d-7e6f5a4b3c2d"
OTHER_SESSION = "491e126e-1e71-469c-ade2-fcc8af567c74"
CTX = file_context(f"{ROOT}/-home-u-proj/{SESSION}.jsonl", ROOT)
SUB_CTX = file_context(f"{ROOT}/-home-u-proj/{SESSION}/subagents/agent-a881341.jsonl", ROOT)
NO_HINT_CTX = file_context(f"{ROOT}/-home-u-proj/short.jsonl", ROOT)
FIXED_NOW = datetime(2030, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
TS = "2026-02-10T21:54:53.186Z"
TS_NORMALISED = "2026-02-10T21:54:53.186000+00:00"


def fixed_now() -> datetime:
    return FIXED_NOW


def parse(raw: bytes, ctx: FileContext = CTX) -> LineOutcome:
    return parse_line(raw, ctx, now=fixed_now)


def encode(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode("utf-8")


def line(line_type: Any = "user", content: Any = "hello", **extra: Any) -> bytes:
    """A transcript line as Claude Code writes it, with ``extra`` top-level keys."""
    obj: dict[str, Any] = {
        "type": line_type,
        "sessionId": OTHER_SESSION,
        "timestamp": TS,
        "message": {"role": "user" if line_type == "user" else "assistant", "content": content},
    }
    obj.update(extra)
    return encode(obj)


def text_block(text: Any) -> dict[str, Any]:
    return {"type": "text", "text": text}


TOOL_USE = {"type": "tool_use", "id": "toolu_1", "name": "Bash", "input": {"command": "ls"}}
THINKING = {"type": "thinking", "thinking": "hmm, let me think", "signature": "abc"}
TOOL_RESULT = {"type": "tool_result", "tool_use_id": "toolu_1", "content": "file.txt"}


@dataclass
class Case:
    id: str
    raw: bytes
    kind: str
    text: str | None = None
    actor: str | None = None
    reason_prefix: str | None = None
    payload_has: dict[str, Any] = field(default_factory=dict)
    payload_lacks: tuple[str, ...] = ()
    ctx: FileContext = CTX


CASES: list[Case] = [
    # --- turns
    Case("user_string_content", line("user", "hello there"), "turn", "hello there", "user"),
    Case(
        "string_content_kept_verbatim",
        line("user", "  padded\n"),
        "turn",
        "  padded\n",
        "user",
    ),
    Case(
        "assistant_text_block",
        line("assistant", [text_block("Sure.")]),
        "turn",
        "Sure.",
        "agent",
    ),
    Case(
        "user_list_with_text_block",
        line("user", [text_block("from a list")]),
        "turn",
        "from a list",
        "user",
    ),
    Case(
        "multiple_text_blocks_joined_with_newline",
        line(
            "assistant",
            [text_block("first"), TOOL_USE, text_block("\n\n"), THINKING, text_block("second")],
        ),
        "turn",
        "first\n\n\n\nsecond",
        "agent",
        payload_has={"tool_uses": ["Bash"]},
    ),
    Case(
        "text_next_to_non_dict_blocks",
        line("assistant", ["stray string", 7, None, text_block("kept")]),
        "turn",
        "kept",
        "agent",
    ),
    # --- skips: no visible text
    Case("whitespace_only_text_block", line("assistant", [text_block("\n\n")]), "skip"),
    Case("whitespace_only_string", line("user", " \t\n "), "skip"),
    Case("unicode_whitespace_only_string", line("user", "\u3000\u00a0"), "skip"),
    Case("empty_string_content", line("user", ""), "skip"),
    Case("empty_block_list", line("assistant", []), "skip"),
    Case("thinking_only", line("assistant", [THINKING]), "skip"),
    Case("tool_use_only", line("assistant", [TOOL_USE]), "skip"),
    Case("tool_result_user_line", line("user", [TOOL_RESULT]), "skip"),
    Case("text_block_with_non_string_text", line("assistant", [text_block(["x"])]), "skip"),
    Case("text_block_without_text", line("assistant", [{"type": "text"}]), "skip"),
    Case("block_of_other_type_with_text", line("assistant", [{"type": "x", "text": "hi"}]), "skip"),
    Case("content_is_number", line("user", 42), "skip"),
    Case("content_is_object", line("user", {"text": "hi"}), "skip"),
    Case("content_is_null", line("user", None), "skip"),
    Case("content_missing", encode({"type": "user", "message": {"role": "user"}}), "skip"),
    Case("message_not_a_dict", encode({"type": "user", "message": "hello"}), "skip"),
    Case("message_missing", encode({"type": "assistant", "sessionId": OTHER_SESSION}), "skip"),
    Case("unknown_type", line("brand-new-type", "looks like text"), "skip"),
    Case("type_missing", encode({"message": {"content": "hello"}}), "skip"),
    Case("type_not_a_string", line(["user"], "hello"), "skip"),
    Case("type_case_matters", line("User", "hello"), "skip"),
    Case("progress", encode({"type": "progress", "data": {"type": "hook_progress"}}), "skip"),
    Case("system", encode({"type": "system", "subtype": "x", "content": "text"}), "skip"),
    Case("summary", encode({"type": "summary", "summary": "a summary", "leafUuid": "u"}), "skip"),
    Case(
        "file_history_snapshot",
        encode({"type": "file-history-snapshot", "messageId": "m", "snapshot": {}}),
        "skip",
    ),
    Case("empty_object", b"{}", "skip"),
    # --- blank lines
    Case("empty_line", b"", "skip"),
    Case("spaces_only", b"   ", "skip"),
    Case("tab_only", b"\t", "skip"),
    Case("lone_cr", b"\r", "skip"),
    Case("unicode_whitespace_line", "\u2003 ".encode(), "skip"),
    # --- rejects
    Case("array", b"[1, 2]", "reject", reason_prefix="not_an_object"),
    Case("empty_array", b"[]", "reject", reason_prefix="not_an_object"),
    Case("number", b"42", "reject", reason_prefix="not_an_object"),
    Case("json_string", b'"user"', "reject", reason_prefix="not_an_object"),
    Case("null", b"null", "reject", reason_prefix="not_an_object"),
    Case("boolean", b"true", "reject", reason_prefix="not_an_object"),
    Case("invalid_json", b"{not json}", "reject", reason_prefix="invalid_json"),
    Case("plain_text", b"hello world", "reject", reason_prefix="invalid_json"),
    Case("truncated_json", line("user", "cut short")[:25], "reject", reason_prefix="invalid_json"),
    Case("two_objects_on_one_line", b"{}{}", "reject", reason_prefix="invalid_json"),
    Case("utf8_bom", b"\xef\xbb\xbf" + line(), "reject", reason_prefix="invalid_json"),
    Case(
        "invalid_utf8",
        b'{"type":"user","message":{"content":"caf\xe9"}}',
        "reject",
        reason_prefix="invalid_utf8",
    ),
    Case(
        "utf8_encoded_surrogate",
        b'{"type":"user","message":{"content":"\xed\xa0\x80"}}',
        "reject",
        reason_prefix="invalid_utf8",
    ),
    Case(
        "raw_nul_byte_in_string",
        b'{"type":"user","message":{"content":"a\x00b"}}',
        "reject",
        reason_prefix="invalid_json",
    ),
    Case("raw_nul_byte_after_object", line() + b"\x00", "reject", reason_prefix="invalid_json"),
    Case("deep_nesting", b"[" * 100_000, "reject"),
    Case("deep_nesting_closed", b"[" * 50_000 + b"]" * 50_000, "reject"),
    Case(
        "integer_beyond_python_digit_limit",
        b'{"type":"user","n":' + b"9" * 5000 + b"}",
        "reject",
        reason_prefix="invalid_json",
    ),
    # --- text PostgreSQL cannot store: made storable and flagged
    Case(
        "nul_escape_in_text",
        b'{"type":"user","sessionId":"s","timestamp":"' + TS.encode() + b'",'
        b'"message":{"content":"a\\u0000b"}}',
        "turn",
        "a\ufffdb",
        "user",
        payload_has={"sanitized": True},
    ),
    Case(
        "lone_surrogate_escape_in_text_block",
        b'{"type":"assistant","message":{"content":[{"type":"text","text":"x\\uD83Dy"}]}}',
        "turn",
        "x\ufffdy",
        "agent",
        payload_has={"sanitized": True},
    ),
    Case(
        "lone_low_surrogate_escape",
        b'{"type":"user","message":{"content":"\\udfff"}}',
        "turn",
        "\ufffd",
        "user",
        payload_has={"sanitized": True},
    ),
    Case(
        "valid_surrogate_pair_escape_is_not_sanitized",
        b'{"type":"user","message":{"content":"smile \\ud83d\\ude00"}}',
        "turn",
        "smile \U0001f600",
        "user",
        payload_lacks=("sanitized",),
    ),
    Case(
        "escaped_backslash_before_u0000_is_not_sanitized",
        b'{"type":"user","message":{"content":"C:\\\\u0000dir"}}',
        "turn",
        "C:\\u0000dir",
        "user",
        payload_lacks=("sanitized",),
    ),
    Case(
        "nul_escape_in_extras",
        b'{"type":"user","message":{"content":"ok","model":"m\\u0000"},"gitBranch":"b\\ud800"}',
        "turn",
        "ok",
        "user",
        payload_has={"model": "m\ufffd", "git_branch": "b\ufffd", "sanitized": True},
    ),
    Case(
        "nul_escape_in_skipped_line",
        b'{"type":"progress","data":"\\u0000"}',
        "skip",
    ),
    # --- CRLF
    Case("crlf_line", line("user", "windows") + b"\r", "turn", "windows", "user"),
    Case("only_one_cr_is_stripped", line("user", "x") + b"\r\r", "turn", "x", "user"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_rule_table(case: Case) -> None:
    outcome = parse(case.raw, case.ctx)

    assert outcome.kind == case.kind, outcome.reason
    if case.kind == "reject":
        assert outcome.payload is None
        assert outcome.reason
        if case.reason_prefix:
            assert outcome.reason.startswith(case.reason_prefix + ":"), outcome.reason
        return
    assert outcome.reason is None
    if case.kind == "skip":
        assert outcome.payload is None
        return
    payload = outcome.payload
    assert payload is not None
    assert payload["text"] == case.text
    assert payload["actor"] == case.actor
    assert payload["source"] == "polling"
    for key, value in case.payload_has.items():
        assert payload[key] == value, key
    for key in case.payload_lacks:
        assert key not in payload
    validate_payload("turn_detected", payload)


def test_crlf_line_gives_the_same_outcome_as_lf_line() -> None:
    raw = line("assistant", [text_block("same")], uuid="u-1")
    assert parse(raw + b"\r") == parse(raw)


def test_turn_payload_core_fields() -> None:
    outcome = parse(line("assistant", [text_block("Hi")]))

    assert outcome.kind == "turn"
    assert outcome.payload == {
        "session_uuid": OTHER_SESSION,
        "actor": "agent",
        "text": "Hi",
        "source": "polling",
        "turn_timestamp": TS_NORMALISED,
    }
    assert outcome.session_uuid == OTHER_SESSION
    assert outcome.timestamp == datetime(2026, 2, 10, 21, 54, 53, 186000, tzinfo=UTC)
    assert outcome.project_path == "/home/u/proj"  # no cwd → the folder's decoded name
    assert outcome.agent_key is None


def test_all_extras_present_are_mapped() -> None:
    obj = {
        "parentUuid": "p-uuid",
        "isSidechain": True,
        "userType": "external",
        "cwd": "/home/USER/projects/spotter-worktrees/spotter-gqc",
        "sessionId": OTHER_SESSION,
        "version": "2.1.39",
        "gitBranch": "spotter-gqc",
        "agentId": "a881341",
        "isMeta": False,
        "type": "assistant",
        "message": {
            "model": "claude-sonnet-4-5-20250929",
            "id": "msg_013qape6Zy3q8eZYgN4M39ym",
            "type": "message",
            "role": "assistant",
            "content": [text_block("Let me look."), TOOL_USE, {**TOOL_USE, "name": "Read"}],
            "usage": {
                "input_tokens": 3,
                "cache_creation_input_tokens": 10,
                "cache_read_input_tokens": 0,
                "output_tokens": 5,
                "service_tier": "standard",
                "server_tool_use": {"web_search_requests": 0},
            },
        },
        "uuid": "m-uuid",
        "timestamp": TS,
    }
    outcome = parse(encode(obj))

    assert outcome.kind == "turn"
    assert outcome.payload == {
        "session_uuid": OTHER_SESSION,
        "actor": "agent",
        "text": "Let me look.",
        "source": "polling",
        "turn_timestamp": TS_NORMALISED,
        "message_uuid": "m-uuid",
        "parent_uuid": "p-uuid",
        "message_id": "msg_013qape6Zy3q8eZYgN4M39ym",
        "model": "claude-sonnet-4-5-20250929",
        "is_sidechain": True,
        "is_meta": False,
        "subagent_id": "a881341",
        "cwd": "/home/USER/projects/spotter-worktrees/spotter-gqc",
        "git_branch": "spotter-gqc",
        "claude_version": "2.1.39",
        "tool_uses": ["Bash", "Read"],
        "usage": {
            "input_tokens": 3,
            "output_tokens": 5,
            "cache_creation_input_tokens": 10,
            "cache_read_input_tokens": 0,
        },
    }
    assert outcome.project_path == "/home/USER/projects/spotter-worktrees/spotter-gqc"
    assert outcome.agent_key == "a881341"
    validate_payload("turn_detected", outcome.payload)


def test_mistyped_extras_are_omitted() -> None:
    obj = {
        "type": "assistant",
        "sessionId": OTHER_SESSION,
        "timestamp": TS,
        "uuid": 12,
        "parentUuid": None,
        "isSidechain": "true",
        "isMeta": 1,
        "agentId": ["a1"],
        "cwd": {"path": "/x"},
        "gitBranch": "",
        "version": 2.1,
        "message": {
            "id": 5,
            "model": None,
            "content": [text_block("text"), {"type": "tool_use", "name": 3}],
            "usage": {
                "input_tokens": "3",
                "output_tokens": True,
                "cache_read_input_tokens": -1,
                "cache_creation_input_tokens": 1.5,
            },
        },
    }
    outcome = parse(encode(obj))

    assert outcome.kind == "turn"
    assert outcome.payload is not None
    assert set(outcome.payload) == {"session_uuid", "actor", "text", "source", "turn_timestamp"}
    assert outcome.project_path == "/home/u/proj"  # cwd not a string → the path hint
    assert outcome.agent_key is None
    validate_payload("turn_detected", outcome.payload)


def test_usage_keeps_only_valid_integer_counts() -> None:
    usage = {"input_tokens": 7, "output_tokens": "9", "cache_read_input_tokens": False}
    obj = json.loads(line("assistant", [text_block("t")]))
    obj["message"]["usage"] = usage
    outcome = parse(encode(obj))

    assert outcome.payload is not None
    assert outcome.payload["usage"] == {"input_tokens": 7}


def test_missing_session_id_falls_back_to_the_path_hint() -> None:
    obj = json.loads(line("user", "hi"))
    del obj["sessionId"]
    outcome = parse(encode(obj))

    assert outcome.kind == "turn"
    assert outcome.session_uuid == SESSION
    assert outcome.payload is not None
    assert outcome.payload["session_uuid"] == SESSION


@pytest.mark.parametrize("bad", ["", 7, None, ["s"]])
def test_unusable_session_id_falls_back_to_the_path_hint(bad: Any) -> None:
    outcome = parse(line("user", "hi", sessionId=bad))

    assert outcome.payload is not None
    assert outcome.payload["session_uuid"] == SESSION


def test_missing_session_id_and_no_hint_falls_back_to_the_file_stem() -> None:
    assert NO_HINT_CTX.session_hint is None
    outcome = parse(encode({"type": "user", "message": {"content": "hi"}}), NO_HINT_CTX)

    assert outcome.payload is not None
    assert outcome.payload["session_uuid"] == "short"


def test_skip_carries_session_timestamp_and_project() -> None:
    raw = encode({"type": "progress", "sessionId": OTHER_SESSION, "timestamp": TS, "cwd": "/a/b-c"})
    outcome = parse(raw)

    assert outcome.kind == "skip"
    assert outcome.session_uuid == OTHER_SESSION
    assert outcome.timestamp == datetime(2026, 2, 10, 21, 54, 53, 186000, tzinfo=UTC)
    assert outcome.project_path == "/a/b-c"


@pytest.mark.parametrize("timestamp", [None, "yesterday", 1700000000, "", "2026-13-45T99:00:00Z"])
def test_missing_or_invalid_timestamp_is_inferred_and_flagged(timestamp: Any) -> None:
    obj = json.loads(line("user", "hi"))
    if timestamp is None:
        del obj["timestamp"]
    else:
        obj["timestamp"] = timestamp
    outcome = parse(encode(obj))

    assert outcome.kind == "turn"
    assert outcome.timestamp is None
    assert outcome.payload is not None
    assert outcome.payload["turn_timestamp"] == FIXED_NOW.isoformat()
    assert outcome.payload["timestamp_inferred"] is True
    validate_payload("turn_detected", outcome.payload)


def test_naive_now_is_taken_as_utc() -> None:
    obj = json.loads(line("user", "hi"))
    del obj["timestamp"]
    outcome = parse_line(encode(obj), CTX, now=lambda: datetime(2030, 1, 1, 12, 0))

    assert outcome.payload is not None
    assert outcome.payload["turn_timestamp"] == "2030-01-01T12:00:00+00:00"


@pytest.mark.parametrize(
    ("timestamp", "expected"),
    [
        ("2026-02-10T21:54:53.186Z", "2026-02-10T21:54:53.186000+00:00"),
        ("2026-02-10T23:54:53+02:00", "2026-02-10T21:54:53+00:00"),
        ("2026-02-10T21:54:53", "2026-02-10T21:54:53+00:00"),
    ],
)
def test_timestamp_is_normalised_to_utc_iso8601(timestamp: str, expected: str) -> None:
    outcome = parse(line("user", "hi", timestamp=timestamp))

    assert outcome.payload is not None
    assert outcome.payload["turn_timestamp"] == expected
    assert "timestamp_inferred" not in outcome.payload
    assert outcome.timestamp == datetime.fromisoformat(expected)


def test_subagent_line_takes_subagent_id_from_agent_id() -> None:
    outcome = parse(line("user", "task", agentId="a42", isSidechain=True), SUB_CTX)

    assert outcome.kind == "turn"
    assert outcome.agent_key == "a42"
    assert outcome.payload is not None
    assert outcome.payload["subagent_id"] == "a42"
    assert outcome.payload["is_sidechain"] is True


def test_subagent_file_without_agent_id_uses_the_file_name() -> None:
    outcome = parse(line("user", "task"), SUB_CTX)

    assert outcome.agent_key == "a881341"
    assert outcome.payload is not None
    assert outcome.payload["subagent_id"] == "a881341"


def test_main_session_line_has_no_subagent() -> None:
    outcome = parse(line("user", "hi"))

    assert outcome.agent_key is None
    assert outcome.payload is not None
    assert "subagent_id" not in outcome.payload


def test_line_cwd_wins_over_the_project_hint_exactly() -> None:
    outcome = parse(line("user", "hi", cwd="/home/u/my-proj"))

    assert outcome.project_path == "/home/u/my-proj"
    assert outcome.payload is not None
    assert outcome.payload["cwd"] == "/home/u/my-proj"


def test_unstorable_text_in_outcome_fields_is_replaced() -> None:
    raw = b'{"type":"progress","sessionId":"s\\u0000","cwd":"/p\\uDC00","agentId":"a\\u0000"}'
    outcome = parse(raw)

    assert outcome.kind == "skip"
    assert outcome.session_uuid == "s\ufffd"
    assert outcome.project_path == "/p\ufffd"
    assert outcome.agent_key == "a\ufffd"


def test_nul_in_session_id_is_replaced_in_payload() -> None:
    raw = b'{"type":"user","sessionId":"\\u0000","message":{"content":"hi"}}'
    outcome = parse(raw)

    assert outcome.payload is not None
    assert outcome.payload["session_uuid"] == "\ufffd"
    assert outcome.payload["sanitized"] is True


def test_long_text_is_never_truncated() -> None:
    big = "x" * 500_000 + "\n" + "é" * 100_000
    outcome = parse(line("assistant", [text_block(big), text_block(big)]))

    assert outcome.payload is not None
    assert outcome.payload["text"] == big + "\n" + big


def test_unexpected_exception_becomes_a_parser_error_reject() -> None:
    def broken_now() -> datetime:
        raise RuntimeError("clock is gone")

    obj = json.loads(line("user", "hi"))
    del obj["timestamp"]
    outcome = parse_line(encode(obj), CTX, now=broken_now)

    assert outcome.kind == "reject"
    assert outcome.reason is not None
    assert outcome.reason.startswith("parser_error: RuntimeError")


def test_default_now_is_aware_utc() -> None:
    before = datetime.now(UTC)
    outcome = parse_line(encode({"type": "user", "message": {"content": "hi"}}), CTX)
    after = datetime.now(UTC)

    assert outcome.payload is not None
    inferred = datetime.fromisoformat(outcome.payload["turn_timestamp"])
    assert inferred.utcoffset() is not None
    assert before <= inferred <= after


def test_invalid_json_reason_names_the_column() -> None:
    outcome = parse(b'{"a": }')

    assert outcome.reason == "invalid_json: Expecting value at col 7"


# --- file_context


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        (
            f"{ROOT}/-home-u-proj/{SESSION}.jsonl",
            FileContext(f"{ROOT}/-home-u-proj/{SESSION}.jsonl", SESSION, None, "/home/u/proj"),
        ),
        (
            f"{ROOT}/-home-u-proj/{SESSION}/subagents/agent-a881341.jsonl",
            FileContext(
                f"{ROOT}/-home-u-proj/{SESSION}/subagents/agent-a881341.jsonl",
                SESSION,
                "a881341",
                "/home/u/proj",
            ),
        ),
        (
            f"{ROOT}/-home-u-proj/{SESSION}/subagents/agent-aprompt_suggestion-dcd338.jsonl",
            FileContext(
                f"{ROOT}/-home-u-proj/{SESSION}/subagents/agent-aprompt_suggestion-dcd338.jsonl",
                SESSION,
                "aprompt_suggestion-dcd338",
                "/home/u/proj",
            ),
        ),
        (  # Claude Code 2.0.x: sub-agent files beside the session files
            f"{ROOT}/-home-u-proj/agent-1a2b3c4d.jsonl",
            FileContext(
                f"{ROOT}/-home-u-proj/agent-1a2b3c4d.jsonl", None, "1a2b3c4d", "/home/u/proj"
            ),
        ),
        (
            f"{ROOT}/-home-u-proj/short.jsonl",
            FileContext(f"{ROOT}/-home-u-proj/short.jsonl", None, None, "/home/u/proj"),
        ),
        (  # outside the projects root: only the file name can help
            f"/elsewhere/{SESSION}.jsonl",
            FileContext(f"/elsewhere/{SESSION}.jsonl", SESSION, None, None),
        ),
        (  # directly under the root: no project folder
            f"{ROOT}/{SESSION}.jsonl",
            FileContext(f"{ROOT}/{SESSION}.jsonl", SESSION, None, None),
        ),
    ],
)
def test_file_context(path: str, expected: FileContext) -> None:
    assert file_context(path, ROOT) == expected
    assert file_context(Path(path), Path(ROOT + "/")) == expected


def test_file_context_project_hint_is_lossy_best_effort() -> None:
    ctx = file_context(f"{ROOT}/-home-u-my-proj/{SESSION}.jsonl", ROOT)

    assert ctx.project_hint == "/home/u/my/proj"


# --- every line of the real transcripts


def _local_shared_transcripts() -> Path:
    path = Path(__file__).resolve().parents[1].parent / "shared" / "transcripts"
    if not path.is_dir():
        pytest.skip(f"shared transcripts not present at {path}")
    return path


@pytest.fixture
def transcripts_root(request: pytest.FixtureRequest) -> Path:
    """The lead's ``shared_transcripts`` fixture when conftest provides it, else the same here."""
    try:
        return Path(request.getfixturevalue("shared_transcripts"))
    except pytest.FixtureLookupError:
        return _local_shared_transcripts()


def _unstorable_replaced(text: str) -> str:
    out = []
    for ch in text:
        if ch == "\x00" or 0xD800 <= ord(ch) <= 0xDFFF:
            out.append("\ufffd")
        else:
            out.append(ch)
    return "".join(out)


def expected_from_rule(raw: bytes) -> tuple[str, str | None, str | None]:
    """The contract's rule written out plainly: (kind, actor, text) for one line."""
    if raw.endswith(b"\r"):
        raw = raw[:-1]
    try:
        decoded = raw.decode("utf-8")
    except UnicodeDecodeError:
        return ("reject", None, None)
    if decoded.strip() == "":
        return ("skip", None, None)
    try:
        obj = json.loads(decoded)
    except (ValueError, RecursionError):
        return ("reject", None, None)
    if not isinstance(obj, dict):
        return ("reject", None, None)
    if obj.get("type") == "user":
        actor = "user"
    elif obj.get("type") == "assistant":
        actor = "agent"
    else:
        return ("skip", None, None)
    message = obj.get("message")
    if not isinstance(message, dict):
        return ("skip", None, None)
    content = message.get("content")
    if isinstance(content, str):
        if content.strip() != "":
            return ("turn", actor, _unstorable_replaced(content))
        return ("skip", None, None)
    if isinstance(content, list):
        texts = []
        for block in content:
            is_text_block = isinstance(block, dict) and block.get("type") == "text"
            if is_text_block and isinstance(block.get("text"), str):
                texts.append(block["text"])
        if any(t.strip() != "" for t in texts):
            return ("turn", actor, _unstorable_replaced("\n".join(texts)))
    return ("skip", None, None)


def complete_lines(data: bytes) -> list[bytes]:
    """Lines terminated by ``\\n``; a trailing fragment is not complete and is left out."""
    return data.split(b"\n")[:-1]


@pytest.mark.transcripts
def test_every_line_of_the_shared_transcripts(transcripts_root: Path) -> None:
    files = sorted(transcripts_root.rglob("*.jsonl"))
    assert files, f"no *.jsonl under {transcripts_root}"
    per_dir: dict[str, Counter[str]] = {}
    total: Counter[str] = Counter()
    subagent_turns = 0

    for path in files:
        ctx = file_context(path, transcripts_root)
        folder = path.relative_to(transcripts_root).parts[0]
        counts = per_dir.setdefault(folder, Counter())
        for number, raw in enumerate(complete_lines(path.read_bytes()), start=1):
            where = f"{path}:{number}"
            kind, actor, text = expected_from_rule(raw)
            outcome = parse_line(raw, ctx, now=fixed_now)

            assert outcome.kind == kind, where
            counts[kind] += 1
            total[kind] += 1
            if kind == "reject":
                assert outcome.reason, where
                continue
            obj = json.loads(raw) if raw.strip() else {}
            session_id = obj.get("sessionId")
            if isinstance(session_id, str) and session_id:
                assert outcome.session_uuid == session_id, where
            if kind == "skip":
                assert outcome.payload is None, where
                continue

            payload = outcome.payload
            assert payload is not None, where
            assert payload["actor"] == actor, where
            assert payload["actor"] in {"user", "agent"}, where
            assert payload["text"] == text, where
            assert payload["text"].strip(), where
            assert isinstance(payload["session_uuid"], str) and payload["session_uuid"], where
            assert payload["source"] == "polling", where
            if isinstance(obj.get("timestamp"), str):
                assert "timestamp_inferred" not in payload, where
                assert outcome.timestamp is not None, where
            if ctx.subagent_hint is not None:
                assert payload.get("subagent_id"), where
                subagent_turns += 1
            validate_payload("turn_detected", payload)

    summary = "\n".join(
        f"{folder}: turn={c['turn']} skip={c['skip']} reject={c['reject']}"
        for folder, c in sorted(per_dir.items())
    )
    print(f"\n{summary}\nTOTAL: turn={total['turn']} skip={total['skip']} reject={total['reject']}")
    assert total["turn"] > 0
    assert total["skip"] > 0
    assert subagent_turns > 0


def _real_lines(root: Path, predicate: Callable[[dict[str, Any]], bool]) -> list[bytes]:
    found = []
    for path in sorted(root.rglob("*.jsonl")):
        for raw in complete_lines(path.read_bytes()):
            obj = json.loads(raw)
            if predicate(obj):
                found.append(raw)
    return found


@pytest.mark.transcripts
def test_real_whitespace_only_assistant_blocks_are_skipped(transcripts_root: Path) -> None:
    def whitespace_only(obj: dict[str, Any]) -> bool:
        content = (obj.get("message") or {}).get("content")
        return (
            obj.get("type") == "assistant"
            and isinstance(content, list)
            and len(content) == 1
            and content[0].get("type") == "text"
            and not content[0]["text"].strip()
        )

    lines = _real_lines(transcripts_root, whitespace_only)
    assert lines, "the shared transcripts no longer hold a whitespace-only text block"
    assert {parse_line(raw, CTX).kind for raw in lines} == {"skip"}
