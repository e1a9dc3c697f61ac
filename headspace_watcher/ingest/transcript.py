"""Pure transcript parser: one complete JSONL line (bytes) → one ``LineOutcome``.

No I/O and no database here, so the tailer can feed it lines from any source and the
tests can feed it anything at all. The rule it implements is the contract's section
"Events derived from transcripts" (``INTERFACE.md``):

* a JSON object of ``type`` ``user``/``assistant`` whose ``message.content`` holds visible text
  → exactly one ``turn`` (the ``turn_detected`` payload);
* a blank line, or any other object (progress, system, unknown types, tool-only…) → ``skip``;
* not UTF-8, not JSON, not an object → ``reject`` with a machine-readable reason.

It never raises: a line that would crash the service instead becomes a rejection, so every
complete line is accounted for exactly once.

The parser is on the catch-up hot path (whole ``~/.claude/projects`` trees), so it decodes and
parses each line once, makes cheap checks first, and only walks the payload for characters
PostgreSQL's jsonb cannot store when the raw bytes show an escape that could produce one.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import orjson

from headspace_watcher.records import FileContext

__all__ = ["HUGE_LINE_BYTES", "LineOutcome", "parse_line", "parse_line_owned"]

OutcomeKind = Literal["turn", "skip", "reject"]

_SUFFIX = ".jsonl"
_REPLACEMENT = 0xFFFD
# str.translate table: NUL and every UTF-16 surrogate (which json.loads yields for a lone
# "\udXXX" escape) → U+FFFD, the two things jsonb refuses.
_UNSTORABLE_TABLE: dict[int, int] = {0: _REPLACEMENT} | dict.fromkeys(
    range(0xD800, 0xE000), _REPLACEMENT
)
_SURROGATE_ESCAPE_PREFIXES: tuple[bytes, ...] = tuple(b"\\ud" + bytes([c]) for c in b"89abcdef")
_USAGE_KEYS: tuple[str, ...] = (
    "input_tokens",
    "output_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
)
_JSON_TYPE_NAMES: dict[type, str] = {
    list: "array",
    str: "string",
    int: "number",
    float: "number",
    bool: "boolean",
    type(None): "null",
}


@dataclass(slots=True)
class LineOutcome:
    """The parser's verdict on one line; the caller turns it into an event, a count or a row.

    ``timestamp`` is the line's own time (``None`` when absent or unparseable — a turn then
    carries an inferred ``turn_timestamp`` in its payload instead). ``session_uuid``,
    ``project_path`` and ``agent_key`` are filled for turns and skips so the caller can attribute
    activity without re-parsing; they are already safe for PostgreSQL text.
    """

    kind: OutcomeKind
    session_uuid: str | None = None
    timestamp: datetime | None = None
    project_path: str | None = None
    agent_key: str | None = None
    payload: dict[str, Any] | None = None
    reason: str | None = None
    # the parsed object, for the derivers of ingest.derive; not part of the verdict (the two
    # JSON paths may differ in what they make of fields no deriver reads, e.g. huge integers)
    line: dict[str, Any] | None = field(default=None, compare=False, repr=False)


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _parse_timestamp(value: Any) -> datetime | None:
    """ISO 8601 → aware UTC datetime; a naive time is taken as UTC (Claude Code writes ``Z``)."""
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
        if parsed.tzinfo is None:
            return parsed.replace(tzinfo=UTC)
        return parsed.astimezone(UTC)
    except (ValueError, OverflowError):
        return None


def _may_hold_unstorable(raw: bytes) -> bool:
    """Cheap pre-check: only a ``\\u0000`` or ``\\udXXX`` escape can yield NUL or a surrogate.

    Raw NUL bytes make the JSON invalid and raw surrogates make the UTF-8 invalid, so escapes
    are the only way in. False positives (an escaped backslash before ``u0000``, a valid
    surrogate pair) only cost a walk that finds nothing.
    """
    if b"\\u" not in raw:
        return False
    low = raw.lower()
    if b"\\u0000" in low:
        return True
    return any(prefix in low for prefix in _SURROGATE_ESCAPE_PREFIXES)


def _clean(value: str | None) -> tuple[str | None, bool]:
    if value is None:
        return None, False
    cleaned = value.translate(_UNSTORABLE_TABLE)
    return cleaned, cleaned != value


def _sanitize(value: Any) -> tuple[Any, bool]:
    """Return ``value`` with every string made jsonb-storable, and whether anything changed."""
    if isinstance(value, str):
        return _clean(value)
    if isinstance(value, dict):
        changed = False
        out: dict[Any, Any] = {}
        for key, item in value.items():
            new_item, item_changed = _sanitize(item)
            out[key] = new_item
            changed = changed or item_changed
        return out, changed
    if isinstance(value, list):
        changed = False
        items: list[Any] = []
        for item in value:
            new_item, item_changed = _sanitize(item)
            items.append(new_item)
            changed = changed or item_changed
        return items, changed
    return value, False


def _reject(reason: str) -> LineOutcome:
    return LineOutcome(kind="reject", reason=reason)


def parse_line(
    raw: bytes, ctx: FileContext, *, now: Callable[[], datetime] = _utc_now
) -> LineOutcome:
    """Classify one complete line (without its ``\\n``); never raises.

    ``now`` supplies ``turn_timestamp`` for turns whose line has no usable ``timestamp``
    (injectable so tests are deterministic).
    """
    try:
        return _parse_line(raw, ctx, now, fast=True)
    except Exception as exc:  # the contract: a line never crashes the service
        return _reject(f"parser_error: {type(exc).__name__}: {exc}")


def _parse_line(
    raw: bytes, ctx: FileContext, now: Callable[[], datetime], *, fast: bool
) -> LineOutcome:
    if raw[-1:] == b"\r":
        raw = raw[:-1]
    obj: Any = None
    if fast:
        # orjson first: ~2.5x faster than json and, for every document it accepts, the same
        # value, except integers beyond 64 bits (a float: see the usage counts below). What
        # it refuses (invalid UTF-8, NaN/Infinity, escaped lone surrogates, deep nesting,
        # blank lines) takes the standard path, which decides and words the outcome.
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError:
            fast = False
    if not fast:
        obj, outcome = _decode_json(raw, ctx)
        if outcome is not None:
            return outcome
    if not isinstance(obj, dict):
        kind = _JSON_TYPE_NAMES.get(type(obj), type(obj).__name__)
        return _reject(f"not_an_object: top-level JSON value is {kind}")
    return _classify(obj, raw, ctx, now, fast)


HUGE_LINE_BYTES = 4 * 1024 * 1024
_UNSTORABLE_ESCAPE = re.compile(r"\\u(?:0000|d[89a-f])", re.IGNORECASE)


def parse_line_owned(
    holder: list[bytes], ctx: FileContext, *, now: Callable[[], datetime] = _utc_now
) -> LineOutcome:
    """``parse_line`` for a huge line whose only reference the caller hands over in
    ``holder``: its bytes are freed as soon as they are decoded, and the standard library
    parses the text (orjson needs about twice the input besides it), so the parse peaks at
    about twice the line instead of three times. Same outcomes as ``parse_line``."""
    try:
        text, outcome = _decode(holder.pop(), ctx)
        if outcome is not None:
            return outcome
        suspicious = _UNSTORABLE_ESCAPE.search(text) is not None
        obj, outcome = _loads(text, ctx)
        del text
        if outcome is not None:
            return outcome
        if not isinstance(obj, dict):
            kind = _JSON_TYPE_NAMES.get(type(obj), type(obj).__name__)
            return _reject(f"not_an_object: top-level JSON value is {kind}")
        # the escape pre-check already ran on the text: hand _classify its verdict
        return _classify(obj, b"\\u0000" if suspicious else b"", ctx, now, False)
    except Exception as exc:  # the contract: a line never crashes the service
        return _reject(f"parser_error: {type(exc).__name__}: {exc}")


def _decode(raw: bytes, ctx: FileContext) -> tuple[str, LineOutcome | None]:
    """``raw`` as text (dropping a trailing CR), or the outcome when it is not UTF-8."""
    try:
        # Decode explicitly rather than handing bytes to json.loads: json would also accept
        # UTF-16/32 and a UTF-8 BOM, and this costs the same single pass.
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return "", _reject(f"invalid_utf8: {exc.reason} at byte {exc.start}")
    return (text[:-1] if text.endswith("\r") else text), None


def _decode_json(raw: bytes, ctx: FileContext) -> tuple[Any, LineOutcome | None]:
    """The standard library's parse of ``raw``: (the value, None) or (None, the outcome)."""
    text, outcome = _decode(raw, ctx)
    if outcome is not None:
        return None, outcome
    return _loads(text, ctx)


def _loads(text: str, ctx: FileContext) -> tuple[Any, LineOutcome | None]:
    """``json.loads`` of a decoded line: (the value, None) or (None, the outcome)."""
    if not text or text.isspace():
        return None, LineOutcome(kind="skip", session_uuid=ctx.session_hint)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        return None, _reject(f"invalid_json: {exc.msg} at col {exc.colno}")
    except RecursionError:
        return None, _reject("too_deeply_nested: JSON nesting exceeds the parser's recursion limit")
    except ValueError as exc:  # e.g. an integer literal beyond Python's digit limit
        return None, _reject(f"invalid_json: {exc}")
    return obj, None


def _classify(
    obj: dict[str, Any],
    raw: bytes,
    ctx: FileContext,
    now: Callable[[], datetime],
    fast: bool,
) -> LineOutcome:
    get = obj.get
    session_id = get("sessionId")
    line_session = session_id if isinstance(session_id, str) and session_id else None
    session_uuid = line_session or ctx.session_hint
    cwd = get("cwd")
    line_cwd = cwd if isinstance(cwd, str) and cwd else None
    agent_id = get("agentId")
    agent_key = agent_id if isinstance(agent_id, str) and agent_id else ctx.subagent_hint
    timestamp = _parse_timestamp(get("timestamp"))
    # orjson refuses escaped lone surrogates, so on its path only a \u0000 escape can yield
    # something jsonb refuses.
    suspicious = b"\\u0000" in raw if fast else _may_hold_unstorable(raw)

    outcome = LineOutcome(
        kind="skip",
        session_uuid=session_uuid,
        timestamp=timestamp,
        project_path=line_cwd or ctx.project_hint,
        agent_key=agent_key,
        line=obj,
    )
    if suspicious:
        outcome.session_uuid = _clean(outcome.session_uuid)[0]
        outcome.project_path = _clean(outcome.project_path)[0]
        outcome.agent_key = _clean(outcome.agent_key)[0]

    line_type = get("type")
    if line_type == "user":
        actor = "user"
    elif line_type == "assistant":
        actor = "agent"
    else:
        return outcome
    message = get("message")
    if not isinstance(message, dict):
        return outcome

    content = message.get("content")
    tool_uses: list[str] = []
    if isinstance(content, str):
        if not content or content.isspace():
            return outcome
        turn_text = content
    elif isinstance(content, list):
        texts: list[str] = []
        visible = False
        for block in content:
            if not isinstance(block, dict):
                continue
            block_type = block.get("type")
            if block_type == "text":
                block_text = block.get("text")
                if isinstance(block_text, str):
                    texts.append(block_text)
                    if not visible and block_text and not block_text.isspace():
                        visible = True
            elif block_type == "tool_use":
                name = block.get("name")
                if isinstance(name, str) and name:
                    tool_uses.append(name)
        if not visible:
            return outcome
        turn_text = "\n".join(texts)
    else:
        return outcome

    payload: dict[str, Any] = {
        "session_uuid": session_uuid or _stem(ctx.path),
        "actor": actor,
        "text": turn_text,
        "source": "polling",
    }
    if timestamp is not None:
        payload["turn_timestamp"] = timestamp.isoformat()
    else:
        inferred = now()
        if inferred.tzinfo is None:
            inferred = inferred.replace(tzinfo=UTC)
        payload["turn_timestamp"] = inferred.astimezone(UTC).isoformat()
        payload["timestamp_inferred"] = True

    _put_str(payload, "message_uuid", get("uuid"))
    _put_str(payload, "parent_uuid", get("parentUuid"))
    _put_str(payload, "message_id", message.get("id"))
    _put_str(payload, "model", message.get("model"))
    _put_bool(payload, "is_sidechain", get("isSidechain"))
    _put_bool(payload, "is_meta", get("isMeta"))
    _put_str(payload, "subagent_id", agent_key)
    _put_str(payload, "cwd", line_cwd)
    _put_str(payload, "git_branch", get("gitBranch"))
    _put_str(payload, "claude_version", get("version"))
    if tool_uses:
        payload["tool_uses"] = tool_uses
    usage = message.get("usage")
    if isinstance(usage, dict):
        counts: dict[str, int] = {}
        for key in _USAGE_KEYS:
            value = usage.get(key)
            if type(value) is int:
                if value >= 0:
                    counts[key] = value
            elif fast and type(value) is float:  # maybe an integer beyond 64 bits
                return _parse_line(raw, ctx, now, fast=False)
        if counts:
            payload["usage"] = counts

    if suspicious:
        payload, changed = _sanitize(payload)
        if changed:
            payload["sanitized"] = True

    outcome.kind = "turn"
    outcome.payload = payload
    return outcome


def _stem(path: str) -> str:
    """Last-resort session id: the file name without ``.jsonl`` (never empty)."""
    name = os.path.basename(path)
    stem = name[: -len(_SUFFIX)] if name.endswith(_SUFFIX) else name
    return stem or name or path or "unknown"


def _put_str(payload: dict[str, Any], key: str, value: Any) -> None:
    if isinstance(value, str) and value:
        payload[key] = value


def _put_bool(payload: dict[str, Any], key: str, value: Any) -> None:
    if isinstance(value, bool):
        payload[key] = value
