"""The event taxonomy: what each event type accepts, and errors that name the field.

The ``events`` table only ever holds payloads that passed here, so dashboards and the state
machine rely on these schemas; a refused payload goes to ``rejected_events`` with the
InvalidEvent's message, so that message must point at the offending field.
"""

from __future__ import annotations

from typing import Any

import pytest
from voluptuous import Required, Schema

from headspace_watcher import taxonomy as schemas
from headspace_watcher.taxonomy import REGISTRY, EventType, InvalidEvent, validate_payload

VALID: dict[str, dict[str, Any]] = {
    "session_registered": {
        "session_uuid": "7f0c2a8e-6d0b-4c6a-9f3e-1d2c3b4a5e6f",
        "project_path": "/home/dev/src/headspace",
        "working_directory": "/home/dev/src/headspace",
    },
    "session_ended": {"session_uuid": "7f0c2a8e-6d0b-4c6a-9f3e-1d2c3b4a5e6f", "reason": "timeout"},
    "turn_detected": {
        "session_uuid": "7f0c2a8e-6d0b-4c6a-9f3e-1d2c3b4a5e6f",
        "actor": "user",
        "text": "Please refactor the writer.",
        "source": "polling",
        "turn_timestamp": "2025-06-01T12:34:56.789Z",
    },
    "state_transition": {
        "agent_id": 3,
        "task_id": 17,
        "from_state": "idle",
        "to_state": "processing",
        "trigger": "turn",
    },
    "hook_received": {
        "hook_type": "Stop",
        "claude_session_id": "7f0c2a8e-6d0b-4c6a-9f3e-1d2c3b4a5e6f",
        "working_directory": "/home/dev/src/headspace",
    },
}

OPTIONAL_FULL: dict[str, dict[str, Any]] = {
    "session_registered": {"iterm_pane_id": "w0t1p0:ABC", "source": "cli"},
    "session_ended": {"duration_seconds": 3600},
    "turn_detected": {
        "message_uuid": "a1b2c3d4-0000-4000-8000-000000000001",
        "parent_uuid": "a1b2c3d4-0000-4000-8000-000000000000",
        "message_id": "msg_01ABCDEF",
        "model": "claude-opus-4-1-20250805",
        "is_sidechain": False,
        "is_meta": False,
        "subagent_id": "a3f9e2",
        "cwd": "/home/dev/src/headspace",
        "git_branch": "main",
        "claude_version": "2.1.3",
        "tool_uses": ["Read", "Edit"],
        "usage": {"input_tokens": 1200, "output_tokens": 88, "cache_read_input_tokens": 0},
        "sanitized": True,
        "timestamp_inferred": False,
    },
    "state_transition": {"reason": "anything goes: extra allowed"},
    "hook_received": {"tool_name": "Bash", "nested": {"any": ["thing"]}},
}

STRICT = ["session_registered", "session_ended", "turn_detected"]
LENIENT = ["state_transition", "hook_received"]


def with_(event_type: str, **changes: Any) -> dict[str, Any]:
    payload = dict(VALID[event_type])
    payload.update(changes)
    return payload


def without(event_type: str, key: str) -> dict[str, Any]:
    return {k: v for k, v in VALID[event_type].items() if k != key}


def test_registry_covers_the_taxonomy() -> None:
    assert set(REGISTRY) == set(VALID)
    assert set(STRICT) | set(LENIENT) == set(VALID)


# --------------------------------------------------------------------------- valid


@pytest.mark.parametrize("event_type", sorted(VALID))
def test_minimal_valid_payload(event_type: str) -> None:
    assert validate_payload(event_type, VALID[event_type]) == VALID[event_type]


@pytest.mark.parametrize("event_type", sorted(VALID))
def test_valid_payload_with_all_optional_fields(event_type: str) -> None:
    payload = {**VALID[event_type], **OPTIONAL_FULL[event_type]}
    assert validate_payload(event_type, payload) == payload


@pytest.mark.parametrize(
    ("event_type", "field", "value"),
    [
        ("session_registered", "source", "transcript"),
        ("session_registered", "source", "api"),
        ("session_registered", "iterm_pane_id", None),
        ("session_ended", "reason", "unregistered"),
        ("session_ended", "reason", "closed"),
        ("session_ended", "duration_seconds", 0),
        ("turn_detected", "actor", "agent"),
        ("turn_detected", "source", "hook"),
        ("turn_detected", "turn_timestamp", "2025-06-01T12:34:56+02:00"),
        ("turn_detected", "turn_timestamp", "2025-06-01T12:34:56"),
        ("turn_detected", "tool_uses", []),
        ("turn_detected", "usage", {}),
        ("turn_detected", "text", "x" * 1_000_000),  # never truncated
        ("state_transition", "trigger", "timeout"),
        ("state_transition", "trigger", "manual"),
        ("state_transition", "agent_id", 0),
    ],
)
def test_other_valid_values(event_type: str, field: str, value: Any) -> None:
    payload = with_(event_type, **{field: value})
    assert validate_payload(event_type, payload)[field] == value


# --------------------------------------------------------------------------- invalid

MISSING = [(t, k) for t in sorted(VALID) for k in VALID[t]]


@pytest.mark.parametrize(("event_type", "field"), MISSING)
def test_missing_required_field(event_type: str, field: str) -> None:
    with pytest.raises(InvalidEvent) as info:
        validate_payload(event_type, without(event_type, field))
    assert info.value.event_type == event_type
    assert info.value.field == field
    assert f"field {field!r}" in str(info.value)
    assert "required" in str(info.value)


WRONG_ENUM = [
    ("session_registered", "source", "polling", "transcript"),
    ("session_ended", "reason", "crashed", "unregistered"),
    ("turn_detected", "actor", "assistant", "agent"),
    ("turn_detected", "source", "transcript", "polling"),
    ("state_transition", "trigger", "cron", "manual"),
]


@pytest.mark.parametrize(("event_type", "field", "value", "allowed"), WRONG_ENUM)
def test_wrong_enum_value(event_type: str, field: str, value: str, allowed: str) -> None:
    with pytest.raises(InvalidEvent) as info:
        validate_payload(event_type, with_(event_type, **{field: value}))
    assert info.value.field == field
    assert f"field {field!r}" in str(info.value)
    assert allowed in str(info.value)  # the message lists what would have been accepted


WRONG_TYPE = [
    ("session_registered", "session_uuid", 42, "string"),
    ("session_registered", "project_path", "", "non-empty string"),
    ("session_registered", "iterm_pane_id", 7, "string"),
    ("session_ended", "duration_seconds", "3600", "integer"),
    ("session_ended", "duration_seconds", -1, "non-negative integer"),
    ("session_ended", "duration_seconds", True, "integer"),
    ("turn_detected", "text", "", "non-empty string"),
    ("turn_detected", "text", ["a", "b"], "string"),
    ("turn_detected", "turn_timestamp", "yesterday", "ISO 8601"),
    ("turn_detected", "turn_timestamp", 1717245296, "ISO 8601"),
    ("turn_detected", "is_sidechain", "false", "true or false"),
    ("turn_detected", "is_meta", 0, "true or false"),
    ("turn_detected", "model", None, "string"),
    ("turn_detected", "tool_uses", "Read", "list"),
    ("state_transition", "agent_id", "3", "integer"),
    ("state_transition", "agent_id", True, "integer"),
    ("state_transition", "task_id", 1.5, "integer"),
    ("state_transition", "to_state", "", "non-empty string"),
    ("hook_received", "hook_type", None, "non-empty string"),
]


@pytest.mark.parametrize(("event_type", "field", "value", "expected"), WRONG_TYPE)
def test_wrong_type(event_type: str, field: str, value: Any, expected: str) -> None:
    with pytest.raises(InvalidEvent) as info:
        validate_payload(event_type, with_(event_type, **{field: value}))
    assert info.value.field == field
    assert f"field {field!r}" in str(info.value)
    assert expected in str(info.value)


@pytest.mark.parametrize(
    ("payload_change", "field"),
    [
        ({"tool_uses": ["Read", 5]}, "tool_uses.1"),
        ({"usage": {"input_tokens": "12"}}, "usage.input_tokens"),
        ({"usage": {"input_tokens": -3}}, "usage.input_tokens"),
        ({"usage": {"output_tokens": True}}, "usage.output_tokens"),
        ({"usage": {7: 1}}, "usage.7"),
    ],
)
def test_nested_field_is_named_by_path(payload_change: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidEvent) as info:
        validate_payload("turn_detected", with_("turn_detected", **payload_change))
    assert info.value.field == field
    assert f"field {field!r}" in str(info.value)


@pytest.mark.parametrize("event_type", STRICT)
def test_extra_field_refused_on_strict_schemas(event_type: str) -> None:
    with pytest.raises(InvalidEvent) as info:
        validate_payload(event_type, with_(event_type, surprise="!"))
    assert info.value.field == "surprise"
    assert "field 'surprise'" in str(info.value)
    assert "extra keys not allowed" in str(info.value)


@pytest.mark.parametrize("event_type", LENIENT)
def test_extra_field_kept_on_lenient_schemas(event_type: str) -> None:
    assert validate_payload(event_type, with_(event_type, surprise="!"))["surprise"] == "!"


def test_every_error_is_listed_first_one_is_the_field() -> None:
    payload = with_("turn_detected", actor="bot", source="smoke")
    with pytest.raises(InvalidEvent) as info:
        validate_payload("turn_detected", payload)
    assert info.value.field in {"actor", "source"}
    assert "field 'actor'" in str(info.value)
    assert "field 'source'" in str(info.value)


@pytest.mark.parametrize("payload", [None, [], "text", 3, ("a", 1)])
def test_payload_not_a_mapping(payload: Any) -> None:
    with pytest.raises(InvalidEvent) as info:
        validate_payload("turn_detected", payload)
    assert info.value.event_type == "turn_detected"
    assert "payload must be a mapping" in str(info.value)


@pytest.mark.parametrize("event_type", ["turn_started", "", "TURN_DETECTED"])
def test_unknown_event_type(event_type: str) -> None:
    with pytest.raises(InvalidEvent) as info:
        validate_payload(event_type, VALID["turn_detected"])
    assert info.value.event_type == event_type
    assert info.value.field is None
    assert f"unknown event type {event_type!r}" in str(info.value)
    assert "turn_detected" in str(info.value)  # the known types are listed


def test_invalid_event_is_a_value_error() -> None:
    """Callers that only know ValueError still catch it."""
    with pytest.raises(ValueError):
        validate_payload("nope", {})


# --------------------------------------------------------------------------- extensibility


def test_registry_is_extensible(monkeypatch: pytest.MonkeyPatch) -> None:
    """Adding an event type is one registry entry; nothing else needs to change."""
    new_type = "task_assigned"
    with pytest.raises(InvalidEvent):
        validate_payload(new_type, {"task_id": 1})
    extended = dict(REGISTRY)
    schema = Schema({Required("task_id"): int, Required("title"): str})
    extended[new_type] = EventType(new_type, schema, "producer", "idempotency_key")
    monkeypatch.setattr(schemas, "REGISTRY", extended)

    assert validate_payload(new_type, {"task_id": 1, "title": "t"}) == {"task_id": 1, "title": "t"}
    with pytest.raises(InvalidEvent) as info:
        validate_payload(new_type, {"task_id": 1})
    assert info.value.field == "title"
    # the unknown-type message reflects the live registry
    with pytest.raises(InvalidEvent) as unknown:
        validate_payload("still_unknown", {})
    assert new_type in str(unknown.value)
    # existing types are untouched
    assert validate_payload("turn_detected", VALID["turn_detected"]) == VALID["turn_detected"]


@pytest.mark.parametrize("event_type", ["session_registered", "session_ended", "turn_detected"])
def test_fast_path_accepts_only_what_the_schema_accepts(event_type: str) -> None:
    """The direct checks (``taxonomy._FAST_PATHS``) are a subset of the voluptuous schema:
    whatever they pass, the schema passes unchanged (a random walk over field values)."""
    import random

    from headspace_watcher.taxonomy import _FAST_PATHS

    entry = REGISTRY[event_type]
    fast = _FAST_PATHS[id(entry.schema)]
    pool = [
        "",
        "x",
        "timeout",
        "cli",
        "api",
        "transcript",
        "closed",
        "user",
        "agent",
        "polling",
        "2026-01-01T00:00:00Z",
        None,
        0,
        -1,
        7,
        True,
        2**70,
        [],
        ["a"],
        {},
        {"a": 1},
    ]
    keys = [*VALID[event_type], "surprise", "iterm_pane_id", "source", "duration_seconds"]
    rng = random.Random(12)
    accepted = 0
    for _ in range(4000):
        payload = dict(VALID[event_type])
        for key in rng.sample(keys, k=rng.randint(1, 3)):
            if rng.random() < 0.2:
                payload.pop(key, None)
            else:
                payload[key] = rng.choice(pool)
        if fast(payload):
            accepted += 1
            assert entry.schema(payload) == payload, payload
    assert accepted > 100  # the walk reaches the fast path, not only its refusals
