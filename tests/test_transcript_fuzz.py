"""Property tests: the parser never raises and agrees with the contract's rule on any input."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from headspace_watcher.ingest.transcript import (
    LineOutcome,
    _parse_line,
    parse_line,
    parse_line_owned,
)
from headspace_watcher.sources.layout import file_context
from headspace_watcher.taxonomy import validate_payload

ROOT = "/home/u/.claude/projects"
CTX = file_context(f"{ROOT}/-home-u-proj/0b7a6d3e-1c2f-4a5b-9c8d-7e6f5a4b3c2d.jsonl", ROOT)
SUB_CTX = file_context(
    f"{ROOT}/-home-u-proj/0b7a6d3e-1c2f-4a5b-9c8d-7e6f5a4b3c2d/subagents/agent-a1.jsonl", ROOT
)
NO_HINT_CTX = file_context("/tmp/x/short.jsonl", ROOT)
FIXED_NOW = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
KINDS = {"turn", "skip", "reject"}
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def fixed_now() -> datetime:
    return FIXED_NOW


# --- the rule, written out independently of the implementation


def replace_unstorable(text: str) -> str:
    return "".join("\ufffd" if ch == "\x00" or 0xD800 <= ord(ch) <= 0xDFFF else ch for ch in text)


def rule(obj: dict[str, Any]) -> tuple[str, str | None, str | None]:
    """(kind, actor, stored text) that INTERFACE.md prescribes for a parsed JSON object."""
    line_type = obj.get("type")
    if line_type == "user":
        actor = "user"
    elif line_type == "assistant":
        actor = "agent"
    else:
        return ("skip", None, None)
    message = obj.get("message")
    if not isinstance(message, dict):
        return ("skip", None, None)
    content = message.get("content")
    if isinstance(content, str):
        if content.strip():
            return ("turn", actor, replace_unstorable(content))
        return ("skip", None, None)
    if isinstance(content, list):
        texts = [
            block["text"]
            for block in content
            if isinstance(block, dict)
            and block.get("type") == "text"
            and isinstance(block.get("text"), str)
        ]
        if any(text.strip() for text in texts):
            return ("turn", actor, replace_unstorable("\n".join(texts)))
    return ("skip", None, None)


def all_strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in (*all_strings(k), *all_strings(v))]
    if isinstance(value, list):
        return [s for item in value for s in all_strings(item)]
    return []


def assert_storable(outcome: LineOutcome) -> None:
    """Everything headed for PostgreSQL encodes as UTF-8 and holds no NUL."""
    fields = [outcome.session_uuid, outcome.project_path, outcome.agent_key]
    for text in [*all_strings(outcome.payload), *(f for f in fields if f is not None)]:
        text.encode("utf-8")
        assert "\x00" not in text


def assert_well_formed(outcome: LineOutcome) -> None:
    assert outcome.kind in KINDS
    if outcome.kind == "reject":
        assert isinstance(outcome.reason, str) and outcome.reason
        assert outcome.payload is None
    elif outcome.kind == "skip":
        assert outcome.reason is None
        assert outcome.payload is None
    else:
        assert outcome.reason is None
        assert outcome.payload is not None
        assert_storable(outcome)
        validate_payload("turn_detected", outcome.payload)


# --- strategies

# Arbitrary unicode including NUL and lone surrogates (excluded by default), plus the
# characters that decide the rule (whitespace) and the ones PostgreSQL refuses.
any_char = st.characters(exclude_categories=())
tricky_piece = st.sampled_from(
    ["\x00", "\ud800", "\udfff", "\ud83d", " ", "\n\n", "\t", "\r", "\u3000", "a", "é", "😀", "\\"]
)
texts = st.lists(st.text(any_char, max_size=4) | tricky_piece, max_size=6).map("".join)

json_leaf = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**12), max_value=10**12)
    | st.floats(allow_nan=False, allow_infinity=False)
    | texts
)
json_value = st.recursive(
    json_leaf,
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(st.text(any_char, max_size=5), children, max_size=3)
    ),
    max_leaves=8,
)

block = (
    st.fixed_dictionaries(
        {"type": st.sampled_from(["text", "text", "tool_use", "thinking", "tool_result"])},
        optional={"text": texts | json_value, "name": texts | json_value, "thinking": texts},
    )
    | json_value
)
content = texts | st.lists(block, max_size=5) | json_value
usage = st.dictionaries(
    st.sampled_from(
        ["input_tokens", "output_tokens", "cache_read_input_tokens", "service_tier", "other"]
    ),
    st.integers(min_value=-5, max_value=10**9) | json_value,
    max_size=4,
)
message = (
    st.fixed_dictionaries(
        {"content": content},
        optional={"id": texts | json_value, "model": texts | json_value, "usage": usage},
    )
    | json_value
)
timestamps = (
    st.datetimes(timezones=st.just(UTC)).map(lambda d: d.isoformat().replace("+00:00", "Z"))
    | texts
    | json_value
)
line_objects = st.fixed_dictionaries(
    {
        "type": st.sampled_from(["user", "assistant", "user", "assistant", "progress", "system"])
        | texts
        | json_value,
        "message": message,
    },
    optional={
        "sessionId": texts | json_value,
        "timestamp": timestamps,
        "uuid": texts | json_value,
        "parentUuid": texts | json_value,
        "isSidechain": json_value,
        "isMeta": json_value,
        "agentId": texts | json_value,
        "cwd": texts | json_value,
        "gitBranch": texts | json_value,
        "version": texts | json_value,
    },
)
contexts = st.sampled_from([CTX, SUB_CTX, NO_HINT_CTX])


def serialise(obj: dict[str, Any], ascii_only: bool, crlf: bool) -> bytes:
    """The line as a writer would put it on disk (lone surrogates force ``\\u`` escapes)."""
    raw: bytes
    try:
        raw = json.dumps(obj, ensure_ascii=ascii_only).encode("utf-8")
    except UnicodeEncodeError:
        raw = json.dumps(obj, ensure_ascii=True).encode("utf-8")
    return raw + b"\r" if crlf else raw


# --- properties


@FUZZ
@given(raw=st.binary(max_size=400), ctx=contexts)
def test_arbitrary_bytes_never_raise(raw: bytes, ctx: Any) -> None:
    outcome = parse_line(raw, ctx, now=fixed_now)

    assert_well_formed(outcome)


@FUZZ
@given(
    obj=line_objects,
    data=st.data(),
    ctx=contexts,
)
def test_corrupted_json_lines_never_raise(obj: dict[str, Any], data: Any, ctx: Any) -> None:
    raw = serialise(obj, ascii_only=False, crlf=False)
    position = data.draw(st.integers(min_value=0, max_value=len(raw)))
    noise = data.draw(st.binary(min_size=1, max_size=3))
    mutated = data.draw(
        st.sampled_from(
            [raw[:position], raw[:position] + noise + raw[position:], noise + raw, raw + noise]
        )
    )
    outcome = parse_line(mutated, ctx, now=fixed_now)

    assert_well_formed(outcome)


@FUZZ
@given(obj=line_objects, ascii_only=st.booleans(), crlf=st.booleans(), ctx=contexts)
def test_json_objects_turn_iff_the_rule_says_so(
    obj: dict[str, Any], ascii_only: bool, crlf: bool, ctx: Any
) -> None:
    raw = serialise(obj, ascii_only, crlf)
    # Judge what a JSON reader sees: adjacent lone surrogates in ``obj`` become one pair.
    seen = json.loads(raw)
    expected_kind, expected_actor, expected_text = rule(seen)

    outcome = parse_line(raw, ctx, now=fixed_now)

    assert outcome.kind == expected_kind
    assert_well_formed(outcome)
    if expected_kind == "turn":
        assert outcome.payload is not None
        assert outcome.payload["actor"] == expected_actor
        assert outcome.payload["text"] == expected_text
        changed = any(s != replace_unstorable(s) for s in all_strings(seen))
        if not changed:
            assert "sanitized" not in outcome.payload


@FUZZ
@given(text=texts, escape=st.booleans())
def test_unstorable_characters_are_replaced_and_flagged(text: str, escape: bool) -> None:
    obj = {"type": "user", "message": {"content": "visible " + text}}
    raw = serialise(obj, ascii_only=escape, crlf=False)

    outcome = parse_line(raw, CTX, now=fixed_now)

    assert outcome.kind == "turn"
    assert outcome.payload is not None
    seen = json.loads(raw)["message"]["content"]  # a surrogate pair reads as one character
    assert outcome.payload["text"] == replace_unstorable(seen)
    unstorable = replace_unstorable(seen) != seen
    assert outcome.payload.get("sanitized", False) is unstorable


# --- the orjson fast path decides exactly as the standard library would

wide_ints = st.integers(min_value=-(2**80), max_value=2**80)
wide_usage = st.dictionaries(
    st.sampled_from(["input_tokens", "output_tokens", "cache_creation_input_tokens"]),
    wide_ints | st.floats(allow_nan=True, allow_infinity=True),
    max_size=3,
)


def standard(raw: bytes, ctx: Any) -> LineOutcome:
    return _parse_line(raw, ctx, fixed_now, fast=False)


@FUZZ
@given(raw=st.binary(max_size=400), ctx=contexts)
def test_fast_parse_agrees_with_standard_on_arbitrary_bytes(raw: bytes, ctx: Any) -> None:
    assert parse_line(raw, ctx, now=fixed_now) == standard(raw, ctx)


@FUZZ
@given(
    obj=line_objects,
    usage=wide_usage,
    extra=wide_ints | st.floats(allow_nan=True, allow_infinity=True),
    ascii_only=st.booleans(),
    crlf=st.booleans(),
    ctx=contexts,
)
def test_fast_parse_agrees_with_standard_on_json_lines(
    obj: dict[str, Any],
    usage: dict[str, Any],
    extra: Any,
    ascii_only: bool,
    crlf: bool,
    ctx: Any,
) -> None:
    obj = {**obj, "extra": extra}
    if isinstance(obj["message"], dict):
        obj["message"] = {**obj["message"], "usage": usage}
    raw = serialise(obj, ascii_only, crlf)

    assert parse_line(raw, ctx, now=fixed_now) == standard(raw, ctx)


def owned(raw: bytes, ctx: Any) -> LineOutcome:
    return parse_line_owned([raw], ctx, now=fixed_now)


@FUZZ
@given(raw=st.binary(max_size=400), ctx=contexts)
def test_owned_parse_of_huge_lines_agrees_on_arbitrary_bytes(raw: bytes, ctx: Any) -> None:
    """The path for huge lines (bytes handed over, freed once decoded) decides every line
    exactly as ``parse_line`` does."""
    assert owned(raw, ctx) == parse_line(raw, ctx, now=fixed_now)


@FUZZ
@given(
    obj=line_objects,
    usage=wide_usage,
    ascii_only=st.booleans(),
    crlf=st.booleans(),
    ctx=contexts,
)
def test_owned_parse_of_huge_lines_agrees_on_json_lines(
    obj: dict[str, Any], usage: dict[str, Any], ascii_only: bool, crlf: bool, ctx: Any
) -> None:
    if isinstance(obj["message"], dict):
        obj["message"] = {**obj["message"], "usage": usage}
    raw = serialise(obj, ascii_only, crlf)
    assert owned(raw, ctx) == parse_line(raw, ctx, now=fixed_now)


def test_usage_beyond_64_bits_is_kept_exact() -> None:
    big = 2**70
    raw = json.dumps(
        {"type": "assistant", "message": {"content": "hi", "usage": {"input_tokens": big}}}
    ).encode()

    outcome = parse_line(raw, CTX, now=fixed_now)

    assert outcome.payload is not None
    assert outcome.payload["usage"] == {"input_tokens": big}
    assert type(outcome.payload["usage"]["input_tokens"]) is int
