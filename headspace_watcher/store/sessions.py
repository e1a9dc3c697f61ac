"""The ``sessions`` table: loading it, and applying lifecycle decisions under their guards.

Every write of a session row goes through here. A decision (``SessionChange``) applies only
if the row is still in the state its decider saw (state + epoch): a CLI ``register`` racing
the service's own discovery of the session yields one ``session_registered``, never two.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

from sqlalchemy import Connection, Engine, bindparam, func, select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert

from headspace_watcher.errors import CheckpointConflict
from headspace_watcher.records import SessionChange, SessionInfo
from headspace_watcher.store.bulk import json_rows, recordset
from headspace_watcher.store.references import References
from headspace_watcher.store.retry import describe, is_transient
from headspace_watcher.store.rows import REFUSABLE
from headspace_watcher.store.schema import sessions

LOAD_BATCH = 1000  # session rows fetched at a time by ``load_all``

_VALUE_COLUMNS = (
    "session_uuid",
    "state",
    "epoch",
    "registered_at",
    "last_activity_at",
    "project_path",
    "project_id",
    "agent_id",
    "ended_at",
    "end_reason",
    "monitored",
    "working_directory",
    "iterm_pane_id",
)


def info_from_row(r: Any) -> SessionInfo:
    return SessionInfo(
        r.session_uuid,
        r.state,
        r.epoch,
        r.registered_at,
        r.last_activity_at,
        r.project_path,
        r.monitored,
        r.working_directory,
        r.iterm_pane_id,
    )


def load_all(engine: Engine) -> Iterator[SessionInfo]:
    """Every session row (the tracker's durable state at start and after a conflict),
    streamed ``LOAD_BATCH`` rows at a time (a server-side cursor): a restart over years of
    sessions holds the tracker's compact view of them, not every row at once besides."""
    with engine.connect() as conn:
        result = conn.execution_options(yield_per=LOAD_BATCH).execute(select(sessions))
        for r in result:
            yield info_from_row(r)


def load_one(engine: Engine, session_uuid: str) -> SessionInfo | None:
    with engine.connect() as conn:
        r = conn.execute(select(sessions).where(sessions.c.session_uuid == session_uuid)).first()
    return None if r is None else info_from_row(r)


def set_monitoring(
    conn: Connection,
    session_uuid: str,
    monitored: bool,
    details: dict[str, str | None] | None = None,
) -> None:
    """Registered mode's flag (and the registration details) without a lifecycle change."""
    conn.execute(
        update(sessions)
        .where(sessions.c.session_uuid == session_uuid)
        .values(monitored=monitored, **(details or {}))
    )


def apply_changes(
    conn: Connection,
    changes: list[SessionChange],
    refs: References,
    refused: dict[str, str] | None = None,
) -> set[tuple[str, str]]:
    """Apply lifecycle changes under their guards; return the (kind, uuid) that lost.

    An ``activity`` change whose session was ended meanwhile (``unregister``) raises
    CheckpointConflict: nothing of the batch is stored; the caller reloads and redoes it.
    With ``refused`` (careful mode) each change is alone in a savepoint: one PostgreSQL
    refuses (a session id beyond the primary key's index limit) is noted there with the
    reason and counted as lost, and the batch goes on without it.
    """
    lost: set[tuple[str, str]] = set()
    coalesced = _coalesce(changes)
    if refused is None and _bulk_safe(coalesced):
        _apply_bulk(conn, coalesced, refs, lost)
        return lost
    for ch in coalesced:
        if refused is None:
            _apply_one(conn, ch, refs, lost)
            continue
        try:
            with conn.begin_nested():
                _apply_one(conn, ch, refs, lost)
        except REFUSABLE as exc:
            if is_transient(exc):
                raise
            refused[ch.info.session_uuid] = describe(exc)
            lost.add((ch.kind, ch.info.session_uuid))
    return lost


def _bulk_safe(changes: list[SessionChange]) -> bool:
    """Whether one statement per kind decides as the changes in order would: each session
    once (order between kinds cannot matter), and every guard's epoch the one its row's
    own epoch implies (so the statement's guard can be written with ``excluded.epoch``)."""
    if len({ch.info.session_uuid for ch in changes}) != len(changes):
        return False
    offset = {"register": 1, "end": 0}
    return all(
        ch.kind == "activity" or ch.expected_epoch == ch.info.epoch - offset[ch.kind]
        for ch in changes
    )


def _apply_bulk(
    conn: Connection, changes: list[SessionChange], refs: References, lost: set[tuple[str, str]]
) -> None:
    """``_apply_one`` for all changes of a batch in ONE statement (the rows of each kind as
    one JSON parameter, ``store.bulk``: one compiled statement whatever the count; each
    session once, so its parts touch different rows). A guard that failed is a row not
    returned."""
    by_kind: dict[str, list[SessionChange]] = {"register": [], "end": [], "activity": []}
    for ch in changes:
        if ch.kind == "end" and ch.expected_epoch == 0:
            lost.add((ch.kind, ch.info.session_uuid))  # never registered: nothing to end
        else:
            by_kind[ch.kind].append(ch)
    if not any(by_kind.values()):
        return
    moves = [
        {"uuid": c.info.session_uuid, "epoch": c.expected_epoch, "at": c.info.last_activity_at}
        for c in by_kind["activity"]
    ]
    params = {
        "register": json_rows(_upsert_rows(by_kind["register"], refs)),
        "end": json_rows(_upsert_rows(by_kind["end"], refs)),
        "activity": json_rows(moves),
    }
    won = {(kind, uuid) for kind, uuid in conn.execute(_bulk_changes_stmt(), params)}
    for kind in ("register", "end"):
        lost.update((kind, c.info.session_uuid) for c in by_kind[kind])
    lost.difference_update(won)
    for ch in by_kind["activity"]:
        if ("activity", ch.info.session_uuid) not in won:
            raise CheckpointConflict(
                f"session {ch.info.session_uuid} is no longer active with epoch {ch.expected_epoch}"
            )


def _upsert_rows(changes: list[SessionChange], refs: References) -> list[dict[str, Any]]:
    """The changes' rows, keyed by column (``_bulk_upsert_stmt``'s parameter)."""
    return [_row(ch, refs) for ch in changes]


def _row(ch: SessionChange, refs: References) -> dict[str, Any]:
    """The session row a change leaves, by column."""
    i = ch.info
    return {
        "session_uuid": i.session_uuid,
        "state": i.state,
        "epoch": i.epoch,
        "registered_at": i.registered_at,
        "last_activity_at": i.last_activity_at,
        "project_path": i.project_path,
        "project_id": refs.project_id(i.project_path),
        "agent_id": refs.agent_id(i.session_uuid),
        "ended_at": ch.ended_at,
        "end_reason": ch.end_reason,
        "monitored": i.monitored,
        "working_directory": i.working_directory,
        "iterm_pane_id": i.iterm_pane_id,
    }


_COLUMN_TYPES = {
    "session_uuid": "text",
    "state": "text",
    "epoch": "integer",
    "registered_at": "timestamptz",
    "last_activity_at": "timestamptz",
    "project_path": "text",
    "project_id": "bigint",
    "agent_id": "bigint",
    "ended_at": "timestamptz",
    "end_reason": "text",
    "monitored": "boolean",
    "working_directory": "text",
    "iterm_pane_id": "text",
}

_MOVES = {"uuid": "text", "epoch": "integer", "at": "timestamptz"}


@functools.cache
def _bulk_changes_stmt() -> Any:
    """``_upsert_stmt`` of the ``register`` and the ``end`` rows and ``_activity_stmt`` of the
    ``activity`` rows, in one statement. The upserts keep their guard, with the expected
    epoch implied by the row's own (``_bulk_safe``): a ``register`` of epoch n needs the row
    absent or ended at n - 1, an ``end`` of epoch n needs it active at n. Returns (kind,
    uuid) of the changes that won."""
    return text(
        f"WITH reg AS ({_bulk_upsert(True)}), fin AS ({_bulk_upsert(False)}), "
        f"moves AS (SELECT * FROM {recordset(_MOVES, 'activity')}), "
        "act AS (UPDATE sessions SET last_activity_at = "
        "greatest(sessions.last_activity_at, r.at) FROM moves r "
        "WHERE sessions.session_uuid = r.uuid AND sessions.state = 'active' "
        "AND sessions.epoch = r.epoch "
        "AND sessions.session_uuid = ANY(ARRAY(SELECT uuid FROM moves)) "
        "RETURNING sessions.session_uuid) "
        "SELECT 'register', session_uuid FROM reg UNION ALL "
        "SELECT 'end', session_uuid FROM fin UNION ALL "
        "SELECT 'activity', session_uuid FROM act"
    )


def _bulk_upsert(register: bool) -> str:
    """The guarded upsert of the ``register`` (or ``end``) rows of ``_bulk_changes_stmt``."""
    keep = {c: f"EXCLUDED.{c}" for c in _VALUE_COLUMNS[1:]}
    for key in ("project_id", "agent_id", "project_path", "working_directory", "iterm_pane_id"):
        keep[key] = f"coalesce(EXCLUDED.{key}, sessions.{key})"
    if register:
        keep["monitored"] = "sessions.monitored OR EXCLUDED.monitored"
    guard = (
        "sessions.state = 'ended' AND sessions.epoch = EXCLUDED.epoch - 1"
        if register
        else "sessions.state = 'active' AND sessions.epoch = EXCLUDED.epoch"
    )
    columns = ", ".join(_VALUE_COLUMNS)
    rows = recordset(
        {c: _COLUMN_TYPES[c] for c in _VALUE_COLUMNS}, "register" if register else "end"
    )
    return (
        f"INSERT INTO sessions ({columns}) SELECT {columns} FROM {rows} "
        f"ON CONFLICT (session_uuid) DO UPDATE SET "
        f"{', '.join(f'{c} = {v}' for c, v in keep.items())} "
        f"WHERE {guard} RETURNING sessions.session_uuid"
    )


def _apply_one(
    conn: Connection, ch: SessionChange, refs: References, lost: set[tuple[str, str]]
) -> None:
    """One guarded lifecycle change; a guard that failed adds (kind, uuid) to ``lost``."""
    i = ch.info
    if ch.kind == "activity":
        params = {"uuid": i.session_uuid, "expected_epoch": ch.expected_epoch}
        params["at"] = i.last_activity_at
        if conn.execute(_activity_stmt(), params).rowcount == 0:
            raise CheckpointConflict(
                f"session {i.session_uuid} is no longer active with epoch {ch.expected_epoch}"
            )
        return
    if ch.kind == "end" and ch.expected_epoch == 0:
        lost.add((ch.kind, i.session_uuid))
        return
    values = {**_row(ch, refs), "expected_epoch": ch.expected_epoch}
    if conn.execute(_upsert_stmt(ch.kind == "register"), values).first() is None:
        lost.add((ch.kind, i.session_uuid))


@functools.cache
def _activity_stmt() -> Any:
    """Built once: constructing these per change cost ~2 ms each (a catch-up has thousands)."""
    return (
        sessions.update()
        .where(
            sessions.c.session_uuid == bindparam("uuid"),
            sessions.c.state == "active",
            sessions.c.epoch == bindparam("expected_epoch"),
        )
        .values(last_activity_at=func.greatest(sessions.c.last_activity_at, bindparam("at")))
    )


@functools.cache
def _upsert_stmt(register: bool) -> Any:
    """The guarded upsert of a ``register`` (row absent or ended with the expected epoch)
    or an ``end`` (row active with the expected epoch); parameters named as the columns,
    plus ``expected_epoch``. Returns the epoch, or no row when the guard failed."""
    ins = pg_insert(sessions).values({c: bindparam(c) for c in _VALUE_COLUMNS})
    keep: dict[str, Any] = {c: ins.excluded[c] for c in _VALUE_COLUMNS[1:]}
    for key in ("project_id", "agent_id", "project_path", "working_directory", "iterm_pane_id"):
        keep[key] = func.coalesce(ins.excluded[key], sessions.c[key])
    if register:
        keep["monitored"] = sessions.c.monitored | ins.excluded.monitored
    want_state = "ended" if register else "active"
    return ins.on_conflict_do_update(
        index_elements=["session_uuid"],
        set_=keep,
        where=(sessions.c.state == want_state) & (sessions.c.epoch == bindparam("expected_epoch")),
    ).returning(sessions.c.epoch)


def _coalesce(changes: list[SessionChange]) -> list[SessionChange]:
    """One change per session and batch: an activity update folds into the change before it."""
    out: list[SessionChange] = []
    where: dict[str, int] = {}
    latest: dict[int, SessionInfo] = {}  # folded activity: the last info wins (one replace)
    for ch in changes:
        key = ch.info.session_uuid
        at = where.get(key)
        if at is not None and ch.kind == "activity" and out[at].kind != "end":
            latest[at] = ch.info
            continue
        where[key] = len(out)
        out.append(ch)
    for at, info in latest.items():
        out[at] = replace(out[at], info=info)
    return out
