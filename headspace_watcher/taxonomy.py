"""The event taxonomy: one registry entry per event type — its schema, where it comes
from, and what makes a second write of it store nothing.

Everything that stores an event validates it here first, so the ``events`` table only ever
holds payloads that the dashboards and the state machine can rely on. Adding a
transcript-derived type is one ``EventType`` in ``REGISTRY`` plus its deriving function in
``ingest.derive`` (registered under the same name); the loop and the store need no change.
The module sits at the bottom of the package (ingest derives, the store validates).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

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

from headspace_watcher.errors import InvalidEvent

Origin = Literal["transcript", "lifecycle", "producer", "hook"]
KeyedBy = Literal["position", "idempotency_key"]


@dataclass(frozen=True, slots=True)
class EventType:
    """One entry of the taxonomy.

    ``origin`` says who makes it: ``transcript`` (derived from lines by ``ingest.derive``),
    ``lifecycle`` (session decisions), ``producer`` (in-process callers through the store's
    producer API), ``hook`` (the hook spool). ``keyed_by`` is what makes a re-write a no-op:
    the line's stream position, or the producer's idempotency key. ``closed``: every value
    the schema admits serialises identically with orjson and json (the store's fast path).
    """

    name: str
    schema: Schema
    origin: Origin
    keyed_by: KeyedBy
    closed: bool = False


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

_SCHEMAS: dict[str, Schema] = {
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

REGISTRY: dict[str, EventType] = {
    t.name: t
    for t in (
        EventType(
            "session_registered",
            _SCHEMAS["session_registered"],
            "lifecycle",
            "idempotency_key",
            True,
        ),
        EventType("session_ended", _SCHEMAS["session_ended"], "lifecycle", "idempotency_key", True),
        EventType("turn_detected", _SCHEMAS["turn_detected"], "transcript", "position", True),
        EventType("state_transition", _SCHEMAS["state_transition"], "producer", "idempotency_key"),
        EventType("hook_received", _SCHEMAS["hook_received"], "hook", "position"),
    )
}

# ---------------------------------------------------------------- turn_detected fast path
# Every turn of a catch-up is validated (tens of thousands per second); voluptuous costs
# ~35 µs a payload, as much as parsing the line. ``_turn_ok`` accepts a SUBSET of what the
# schema above accepts, checked directly; anything it does not accept goes through
# voluptuous, which decides and words the error. Used only while the registry holds that
# very schema object.
_TURN_SCHEMA = _SCHEMAS["turn_detected"]
_TURN_REQUIRED = ("session_uuid", "actor", "text", "source", "turn_timestamp")
_TURN_STR = frozenset(
    (
        "message_uuid",
        "parent_uuid",
        "message_id",
        "model",
        "subagent_id",
        "cwd",
        "git_branch",
        "claude_version",
    )
)
_TURN_BOOL = frozenset(("is_sidechain", "is_meta", "sanitized", "timestamp_inferred"))
_TURN_KEYS = frozenset(_TURN_REQUIRED) | _TURN_STR | _TURN_BOOL | {"tool_uses", "usage"}


def _turn_ok(p: dict[str, Any]) -> bool:
    if not _TURN_KEYS.issuperset(p):
        return False
    get = p.get
    session, actor, text_ = get("session_uuid"), get("actor"), get("text")
    source, ts = get("source"), get("turn_timestamp")
    if not (
        type(session) is str
        and session
        and type(text_) is str
        and text_
        and (actor == "user" or actor == "agent")
        and (source == "polling" or source == "hook")
        and type(ts) is str
    ):
        return False
    try:
        iso8601(ts)
    except Invalid:
        return False
    for key, value in p.items():
        if key in _TURN_STR:
            if type(value) is not str:
                return False
        elif key in _TURN_BOOL:
            if type(value) is not bool:
                return False
        elif key == "tool_uses":
            if type(value) is not list or any(type(v) is not str for v in value):
                return False
        elif key == "usage" and (
            type(value) is not dict
            or any(type(k) is not str or type(v) is not int or v < 0 for k, v in value.items())
        ):
            return False
    return True


# ---------------------------------------------------------------- lifecycle fast paths
# A catch-up of many small sessions makes two lifecycle events per session; the same idea
# as ``_turn_ok``: a subset of each schema, checked directly, anything else to voluptuous.
_REGISTERED_TEXT = ("session_uuid", "project_path", "working_directory")
_REGISTERED_KEYS = frozenset((*_REGISTERED_TEXT, "iterm_pane_id", "source"))
_REGISTERED_SOURCES = frozenset(("transcript", "cli", "api"))
_ENDED_KEYS = frozenset(("session_uuid", "reason", "duration_seconds"))
_ENDED_REASONS = frozenset(("timeout", "unregistered", "closed"))


def _nonempty_str(value: Any) -> bool:
    return type(value) is str and bool(value)


def _registered_ok(p: dict[str, Any]) -> bool:
    if not _REGISTERED_KEYS.issuperset(p) or not all(
        _nonempty_str(p.get(k)) for k in _REGISTERED_TEXT
    ):
        return False
    pane = p.get("iterm_pane_id")
    source = p.get("source", "transcript")
    return (
        (pane is None or type(pane) is str)
        and type(source) is str
        and source in _REGISTERED_SOURCES
    )


def _ended_ok(p: dict[str, Any]) -> bool:
    duration = p.get("duration_seconds", 0)
    return (
        _ENDED_KEYS.issuperset(p)
        and _nonempty_str(p.get("session_uuid"))
        and type(p.get("reason")) is str
        and p.get("reason") in _ENDED_REASONS
        and type(duration) is int
        and duration >= 0
    )


# checked directly while the registry holds these very schema objects
_FAST_PATHS = {
    id(_TURN_SCHEMA): _turn_ok,
    id(_SCHEMAS["session_registered"]): _registered_ok,
    id(_SCHEMAS["session_ended"]): _ended_ok,
}


def validate_payload(event_type: str, payload: Any) -> dict[str, Any]:
    """Return the validated payload or raise InvalidEvent naming the offending field."""
    entry = REGISTRY.get(event_type)
    if entry is None:
        raise InvalidEvent(
            event_type,
            f"unknown event type {event_type!r}; expected one of {sorted(REGISTRY)}",
        )
    schema = entry.schema
    if not isinstance(payload, dict):
        raise InvalidEvent(event_type, f"{event_type}: payload must be a mapping")
    fast = _FAST_PATHS.get(id(schema))
    if fast is not None and fast(payload):
        return dict(payload)
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
