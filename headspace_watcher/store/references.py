"""The ``projects`` and ``agents`` reference rows events point to, and their id cache.

New ones are upserted inside the batch's own transaction (one statement per table for all
new keys of a batch) rather than in a transaction of their own, which cost a second commit
(an fsync) per batch of a catch-up. Ids become cached only once that transaction commits:
ids of rolled-back rows must not stick to events or be reused.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, select
from sqlalchemy.dialects.postgresql import insert as pg_insert

from headspace_watcher.records import Event
from headspace_watcher.store.retry import describe, is_transient
from headspace_watcher.store.rows import REFUSABLE
from headspace_watcher.store.schema import agents, projects


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


class References:
    """Resolves events' ``project_path``/``agent_key`` to ids, creating rows as needed."""

    def __init__(self) -> None:
        self._project_ids: dict[str, int] = {}
        self._agent_ids: dict[str, int] = {}

    def project_id(self, path: str | None) -> int | None:
        return self._project_ids.get(path or "")

    def agent_id(self, key: str) -> int | None:
        return self._agent_ids.get(key)

    def committed(self, refs: NewRefs) -> None:
        """The transaction that created ``refs`` committed: their ids are safe to reuse."""
        self._project_ids.update(refs.projects)
        self._agent_ids.update(refs.agents)

    def resolve(
        self, conn: Connection, evts: list[Event], refs: NewRefs, *, careful: bool = False
    ) -> None:
        """Upsert the batch's new projects/agents first in its transaction, before any lock.

        First, before the checkpoint guard's row locks, so two writers racing for the same
        sources take their locks in the same order. ``careful`` (after a refusal): each alone
        in a savepoint, the refused ones noted in ``refs.refused_*`` (a path or id beyond an
        index's limit must not take the lines of the batch down with it).
        """
        paths = {e.project_path for e in evts if e.project_path} - self._project_ids.keys()
        keys = {e.agent_key for e in evts if e.agent_key} - self._agent_ids.keys()
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
            known = self._project_ids | refs.projects
            wanted = [(k, known.get(project_of.get(k, ""))) for k in sorted(keys)]
            refs.agents = (
                _each_alone(conn, _upsert_agents, wanted, refs.refused_agents)
                if careful
                else _upsert_agents(conn, wanted)
            )
        project_ids = self._project_ids | refs.projects if refs.projects else self._project_ids
        agent_ids = self._agent_ids | refs.agents if refs.agents else self._agent_ids
        for e in evts:
            if e.project_id is None and e.project_path in project_ids:
                e.project_id = project_ids[e.project_path]
                refs.assigned.append(e)
            if e.agent_id is None and e.agent_key in agent_ids:
                e.agent_id = agent_ids[e.agent_key]
                refs.assigned_agents.append(e)


def _upsert_projects(conn: Connection, paths: list[str]) -> dict[str, int]:
    rows = [{"path": p, "name": p.rstrip("/").rsplit("/", 1)[-1] or p} for p in paths]
    conn.execute(pg_insert(projects).values(rows).on_conflict_do_nothing())
    found = conn.execute(
        select(projects.c.path, projects.c.id).where(projects.c.path.in_(paths))
    ).all()
    return {r.path: r.id for r in found}


def _upsert_agents(conn: Connection, keys: list[tuple[str, int | None]]) -> dict[str, int]:
    rows = [{"session_uuid": k, "project_id": pid} for k, pid in keys]
    conn.execute(pg_insert(agents).values(rows).on_conflict_do_nothing())
    found = conn.execute(
        select(agents.c.session_uuid, agents.c.id).where(
            agents.c.session_uuid.in_([k for k, _ in keys])
        )
    ).all()
    return {r.session_uuid: r.id for r in found}


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
