"""The ``projects`` and ``agents`` reference rows events point to, and their id cache.

New ones are upserted inside the batch's own transaction (one statement per table for all
new keys of a batch) rather than in a transaction of their own, which cost a second commit
(an fsync) per batch of a catch-up. Ids become cached only once that transaction commits:
ids of rolled-back rows must not stick to events or be reused.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, text

from headspace_watcher.records import Event
from headspace_watcher.store.bulk import json_rows, recordset
from headspace_watcher.store.retry import describe, is_transient
from headspace_watcher.store.rows import REFUSABLE


@dataclass(slots=True)
class NewRefs:
    """Ids one attempt created, and the events it gave ids to (undone on failure)."""

    projects: dict[str, int] = field(default_factory=dict)
    agents: dict[str, int] = field(default_factory=dict)
    assigned: list[Event] = field(default_factory=list)
    assigned_agents: list[Event] = field(default_factory=list)
    # new references PostgreSQL refused (careful mode), with the reason: their events are
    # stored without them
    refused_projects: dict[str, str] = field(default_factory=dict)
    refused_agents: dict[str, str] = field(default_factory=dict)

    def forget(self) -> None:
        for e in self.assigned:
            e.project_id = None
        for e in self.assigned_agents:
            e.agent_id = None


ID_CACHE_MAX = 1024  # ids kept per table: a tree of years of sessions is not held in memory


class IdCache:
    """Ids by key, at most ``limit``, the least recently used dropped first: a dropped one
    costs one lookup (the upsert finds the row) when it is needed again."""

    __slots__ = ("_ids", "limit")

    def __init__(self, limit: int = ID_CACHE_MAX) -> None:
        self._ids: OrderedDict[str, int] = OrderedDict()
        self.limit = limit

    def get(self, key: str) -> int | None:
        found = self._ids.get(key)
        if found is not None:
            self._ids.move_to_end(key)
        return found

    def update(self, ids: dict[str, int]) -> None:
        for key, value in ids.items():
            self._ids[key] = value
            self._ids.move_to_end(key)
        while len(self._ids) > self.limit:
            self._ids.popitem(last=False)

    def __len__(self) -> int:
        return len(self._ids)


class References:
    """Resolves events' ``project_path``/``agent_key`` to ids, creating rows as needed."""

    def __init__(self, cache_max: int = ID_CACHE_MAX) -> None:
        self._project_ids = IdCache(cache_max)
        self._agent_ids = IdCache(cache_max)
        # the ids the transaction under way created: its session rows point at them too
        self._attempt = NewRefs()

    def project_id(self, path: str | None) -> int | None:
        key = path or ""
        return self._attempt.projects.get(key) or self._project_ids.get(key)

    def agent_id(self, key: str) -> int | None:
        return self._attempt.agents.get(key) or self._agent_ids.get(key)

    def committed(self, refs: NewRefs) -> None:
        """The transaction that created ``refs`` committed: their ids are safe to reuse."""
        self._project_ids.update(refs.projects)
        self._agent_ids.update(refs.agents)
        self._attempt = NewRefs()

    def resolve(
        self, conn: Connection, evts: list[Event], refs: NewRefs, *, careful: bool = False
    ) -> None:
        """Upsert the batch's new projects/agents first in its transaction, before any lock.

        First, before the checkpoint guard's row locks, so two writers racing for the same
        sources take their locks in the same order. ``careful`` (after a refusal): each alone
        in a savepoint, the refused ones noted in ``refs.refused_*`` (a path or id beyond an
        index's limit must not take the lines of the batch down with it).
        """
        self._attempt = refs  # every attempt resolves first; a failed one is replaced here
        paths = {p for e in evts if (p := e.project_path) and self._project_ids.get(p) is None}
        keys = {k for e in evts if (k := e.agent_key) and self._agent_ids.get(k) is None}
        if paths:
            refs.projects = (
                _each_alone(conn, _upsert_projects, sorted(paths), refs.refused_projects)
                if careful
                else _upsert_projects(conn, sorted(paths))
            )
        if keys:
            project_of: dict[str, str] = {}
            for e in evts:
                if e.agent_key in keys and e.project_path:
                    project_of.setdefault(e.agent_key, e.project_path)
            wanted = [(k, self._project_of(project_of.get(k), refs)) for k in sorted(keys)]
            refs.agents = (
                _each_alone(conn, _upsert_agents, wanted, refs.refused_agents)
                if careful
                else _upsert_agents(conn, wanted)
            )
        for e in evts:
            if e.project_id is None and e.project_path:
                e.project_id = self._project_of(e.project_path, refs)
                if e.project_id is not None:
                    refs.assigned.append(e)
            if e.agent_id is None and e.agent_key:
                e.agent_id = refs.agents.get(e.agent_key) or self._agent_ids.get(e.agent_key)
                if e.agent_id is not None:
                    refs.assigned_agents.append(e)

    def _project_of(self, path: str | None, refs: NewRefs) -> int | None:
        if not path:
            return None
        return refs.projects.get(path) or self._project_ids.get(path)


# One statement per table: the rows already there are found, only the others inserted (no
# speculative insertion for a known key, e.g. the agents of a batch of session ends); the
# rows as one JSON parameter (``store.bulk``). Keys a concurrent writer inserted after this
# statement's snapshot are neither found nor inserted: ``_missing`` selects them again.
_UPSERT_PROJECTS = text(
    f"WITH wanted AS (SELECT * FROM {recordset({'path': 'text', 'name': 'text'})}), "
    "found AS (SELECT path, id FROM projects WHERE path = ANY(ARRAY(SELECT path FROM wanted))), "
    "added AS (INSERT INTO projects (path, name) SELECT w.path, w.name FROM wanted w "
    "WHERE w.path NOT IN (SELECT path FROM found) ON CONFLICT DO NOTHING RETURNING path, id) "
    "SELECT path, id FROM found UNION ALL SELECT path, id FROM added"
)
_SELECT_PROJECTS = text("SELECT path, id FROM projects WHERE path = ANY(CAST(:keys AS text[]))")
_UPSERT_AGENTS = text(
    "WITH wanted AS (SELECT * FROM "
    f"{recordset({'session_uuid': 'text', 'project_id': 'bigint'})}), "
    "found AS (SELECT session_uuid, id FROM agents "
    "WHERE session_uuid = ANY(ARRAY(SELECT session_uuid FROM wanted))), "
    "added AS (INSERT INTO agents (session_uuid, project_id) "
    "SELECT w.session_uuid, w.project_id FROM wanted w "
    "WHERE w.session_uuid NOT IN (SELECT session_uuid FROM found) "
    "ON CONFLICT DO NOTHING RETURNING session_uuid, id) "
    "SELECT session_uuid, id FROM found UNION ALL SELECT session_uuid, id FROM added"
)
_SELECT_AGENTS = text(
    "SELECT session_uuid, id FROM agents WHERE session_uuid = ANY(CAST(:keys AS text[]))"
)


def _upsert_projects(conn: Connection, paths: list[str]) -> dict[str, int]:
    rows = [{"path": p, "name": p.rstrip("/").rsplit("/", 1)[-1] or p} for p in paths]
    ids = {r.path: r.id for r in conn.execute(_UPSERT_PROJECTS, {"rows": json_rows(rows)})}
    return ids | _missing(conn, _SELECT_PROJECTS, paths, ids)


def _upsert_agents(conn: Connection, keys: list[tuple[str, int | None]]) -> dict[str, int]:
    rows = [{"session_uuid": k, "project_id": pid} for k, pid in keys]
    found = conn.execute(_UPSERT_AGENTS, {"rows": json_rows(rows)})
    ids = {r.session_uuid: r.id for r in found}
    ids |= _missing(conn, _SELECT_AGENTS, [k for k, _ in keys], ids)
    return ids


def _missing(conn: Connection, lookup: Any, keys: list[str], ids: dict[str, int]) -> dict[str, int]:
    """The ids of the keys the upsert returned no row for (inserted concurrently, committed
    after its snapshot: its insert skipped them, its lookup did not see them)."""
    missing = [k for k in keys if k not in ids]
    if not missing:
        return {}
    return {key: id_ for key, id_ in conn.execute(lookup, {"keys": missing})}


def _each_alone(
    conn: Connection,
    upsert: Callable[[Connection, list[Any]], dict[str, int]],
    items: list[Any],
    refused: dict[str, str],
) -> dict[str, int]:
    """``upsert`` one item per savepoint; a refused one's key goes to ``refused``, with why."""
    found: dict[str, int] = {}
    for item in items:
        key = item[0] if isinstance(item, tuple) else item
        try:
            with conn.begin_nested():
                found |= upsert(conn, [item])
        except REFUSABLE as exc:
            if is_transient(exc):
                raise
            refused[key] = describe(exc)
    return found
