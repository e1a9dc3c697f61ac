"""The event taxonomy: one registry of event type → payload schema.

Adding an event type is adding one entry to ``EVENT_SCHEMAS``. Everything that stores an
event validates it here first, so the ``events`` table only ever holds payloads that the
dashboards and the state machine can rely on.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from voluptuous import (
    ALLOW_EXTRA,
    All,
    In,
    Invalid,
    Length,
    MultipleInvalid,
    Optional,
    Range,
    Required,
    Schema,
)
from voluptuous import (
    Any as AnyOf,
)


class InvalidEvent(ValueError):
    """An event whose type is unknown or whose payload breaks its schema."""

    def __init__(self, event_type: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.event_type = event_type
        self.field = field


def iso8601(value: Any) -> str:
    """Accept an ISO 8601 timestamp string (``Z`` suffix allowed)."""
    if not isinstance(value, str):
        raise Invalid("expected an ISO 8601 timestamp string")
    try:
        datetime.fromisoformat(value.replace("Z", "+00:00", 1) if value.endswith("Z") else value)
    except ValueError:
        raise Invalid(f"expected an ISO 8601 timestamp, got {value[:40]!r}") from None
    return value


_TEXT = All(str, Length(min=1), msg="expected a non-empty string")
_STR = All(str, msg="expected a string")
_BOOL = All(bool, msg="expected true or false")


def _not_bool(value: Any) -> Any:
    """JSON ``true`` is a Python bool, which is an int: refuse it where a count is expected."""
    if isinstance(value, bool):
        raise Invalid("expected an integer, not a boolean")
    return value


_INT = All(_not_bool, int, Range(min=0), msg="expected a non-negative integer")
_NON_BOOL_INT = All(_not_bool, int, msg="expected an integer")

EVENT_SCHEMAS: dict[str, Schema] = {
    "session_registered": Schema(
        {
            Required("session_uuid"): _TEXT,
            Required("project_path"): _TEXT,
            Required("working_directory"): _TEXT,
            Optional("iterm_pane_id"): AnyOf(None, _STR, msg="expected a string or null"),
            Optional("source"): In(["transcript", "cli", "api"]),
        }
    ),
    "session_ended": Schema(
        {
            Required("session_uuid"): _TEXT,
            Required("reason"): In(["timeout", "unregistered", "closed"]),
            Optional("duration_seconds"): _INT,
        }
    ),
    "turn_detected": Schema(
        {
            Required("session_uuid"): _TEXT,
            Required("actor"): In(["user", "agent"]),
            Required("text"): _TEXT,
            Required("source"): In(["polling", "hook"]),
            Required("turn_timestamp"): iso8601,
            Optional("message_uuid"): _STR,
            Optional("parent_uuid"): _STR,
            Optional("message_id"): _STR,
            Optional("model"): _STR,
            Optional("is_sidechain"): _BOOL,
            Optional("is_meta"): _BOOL,
            Optional("subagent_id"): _STR,
            Optional("cwd"): _STR,
            Optional("git_branch"): _STR,
            Optional("claude_version"): _STR,
            Optional("tool_uses"): [_STR],
            Optional("usage"): {str: _INT},
            Optional("sanitized"): _BOOL,
            Optional("timestamp_inferred"): _BOOL,
        }
    ),
    "state_transition": Schema(
        {
            Required("agent_id"): _NON_BOOL_INT,
            Required("task_id"): _NON_BOOL_INT,
            Required("from_state"): _TEXT,
            Required("to_state"): _TEXT,
            Required("trigger"): In(["turn", "timeout", "manual"]),
        },
        extra=ALLOW_EXTRA,
    ),
    "hook_received": Schema(
        {
            Required("hook_type"): _TEXT,
            Required("claude_session_id"): _TEXT,
            Required("working_directory"): _TEXT,
        },
        extra=ALLOW_EXTRA,
    ),
}

EVENT_TYPES = frozenset(EVENT_SCHEMAS)


def validate_payload(event_type: str, payload: Any) -> dict[str, Any]:
    """Return the validated payload or raise InvalidEvent naming the offending field."""
    schema = EVENT_SCHEMAS.get(event_type)
    if schema is None:
        raise InvalidEvent(
            event_type,
            f"unknown event type {event_type!r}; expected one of {sorted(EVENT_SCHEMAS)}",
        )
    if not isinstance(payload, dict):
        raise InvalidEvent(event_type, f"{event_type}: payload must be a mapping")
    try:
        return schema(payload)
    except MultipleInvalid as exc:
        first = exc.errors[0]
        field = ".".join(str(p) for p in first.path) or None
        details = "; ".join(
            f"field {'.'.join(str(p) for p in e.path) or '<payload>'!r}: {e.msg}"
            for e in exc.errors
        )
        raise InvalidEvent(event_type, f"{event_type}: {details}", field) from None
