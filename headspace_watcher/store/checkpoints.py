"""Stream checkpoints (the ``sources`` table): creating them and changing their identity.

A checkpoint's offset is only ever advanced by the batch writer, inside the transaction that
stores the events of those bytes (``store.writer``); this module creates stream rows, binds
them to a new inode (same content copied) and moves them to a new generation (different
content under the same path). It is what a source is handed to learn its positions.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from sqlalchemy import Connection, Engine, Text, any_, bindparam, select, text, update
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.dialects.postgresql import insert as pg_insert

from headspace_watcher.errors import CheckpointConflict, StreamRefused
from headspace_watcher.records import SourceAdvance, StreamState
from headspace_watcher.store.bulk import json_rows, recordset
from headspace_watcher.store.retry import describe, is_transient
from headspace_watcher.store.schema import sources

log = logging.getLogger(__name__)


def path_bytes(path: str) -> bytes | None:
    """The name's raw bytes when it is not UTF-8 (it came from the filesystem with
    surrogate escapes, which PostgreSQL text cannot hold), else None."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        try:
            return os.fsencode(path)
        except UnicodeEncodeError:  # a lone surrogate not from the filesystem
            return path.encode("utf-8", "surrogatepass")
    return None


def storable_path(path: str) -> str:
    """``path`` as PostgreSQL text: unchanged when UTF-8, else its bad bytes as ``\\xNN``.

    Not reversible on its own (a name may contain a literal ``\\xff``): the exact name is
    kept in ``sources.path_bytes``.
    """
    raw = path_bytes(path)
    return path if raw is None else raw.decode("utf-8", "backslashreplace")


def check_guard(conn: Connection, advances: list[SourceAdvance]) -> None:
    """Lock the batch's stream rows and prove each is where the batch starts.

    This is what makes COPY safe: with the rows locked and their offsets equal to the
    batch's start, no row for those positions can exist yet, and no other writer can add one
    before this transaction ends. A mismatch means someone else got there first.
    """
    if not advances:
        return
    wanted = {a.source_id: a for a in advances}
    rows = conn.execute(
        select(sources.c.id, sources.c.generation, sources.c.committed_offset)
        .where(sources.c.id.in_(sorted(wanted)))
        .order_by(sources.c.id)
        .with_for_update()
    ).all()
    found = {r.id: r for r in rows}
    for sid, adv in wanted.items():
        row = found.get(sid)
        if row is None or (row.generation, row.committed_offset) != (
            adv.generation,
            adv.start_offset,
        ):
            stored = None if row is None else (row.generation, row.committed_offset)
            raise CheckpointConflict(
                f"source {sid}: expected generation/offset "
                f"{(adv.generation, adv.start_offset)}, database has {stored}"
            )


_ADVANCE = text(
    "WITH r AS (SELECT * FROM "
    f"{recordset({'sid': 'bigint', 'end_offset': 'bigint', 'lines': 'bigint', 'fp': 'text'})}) "
    "UPDATE sources SET committed_offset = r.end_offset, "
    "lines_committed = sources.lines_committed + r.lines, fingerprint = decode(r.fp, 'hex'), "
    "updated_at = now() FROM r "
    "WHERE sources.id = r.sid AND sources.id = ANY(ARRAY(SELECT sid FROM r))"
)


def advance(conn: Connection, advances: list[SourceAdvance]) -> None:
    """Move the checkpoints, in the transaction of the events those bytes produced.

    One statement for the whole batch (the rows as one JSON parameter, ``store.bulk``): a
    catch-up of many small files advances thousands of streams, and one UPDATE per stream
    cost the server a statement each. An UPDATE ... FROM applies one row per stream, so a
    stream advanced twice in a batch is folded first, as the statements in order would have
    left it: the last end and fingerprint, the lines summed.
    """
    if not advances:
        return
    folded: dict[int, dict[str, Any]] = {}
    for a in advances:
        before = folded.get(a.source_id)
        folded[a.source_id] = {
            "sid": a.source_id,
            "end_offset": a.end_offset,
            "lines": a.lines + (before["lines"] if before else 0),
            "fp": a.fingerprint.hex() if a.fingerprint is not None else None,
        }
    conn.execute(_ADVANCE, {"rows": json_rows(list(folded.values()))})


def _state(row: object) -> StreamState:
    m = row._mapping  # type: ignore[attr-defined]
    raw = m.get("path_bytes")
    return StreamState(
        source_id=m["id"],
        path=os.fsdecode(bytes(raw)) if raw is not None else m["path"],
        inode=m["inode"],
        device=m["device"],
        generation=m["generation"],
        committed_offset=m["committed_offset"],
        fingerprint=m["fingerprint"],
        lines_committed=m["lines_committed"],
    )


# New rows returned by the insert, existing ones found by index (the statement's snapshot:
# a row a concurrent writer committed meanwhile is neither, and is selected again).
_REGISTER_MANY = text(
    "WITH r AS (SELECT * FROM "
    f"{recordset({'path': 'text', 'raw': 'text', 'inode': 'bigint', 'device': 'bigint'})}), "
    "added AS (INSERT INTO sources (path, path_bytes, inode, device) "
    "SELECT path, decode(raw, 'hex'), inode, device FROM r "
    "ON CONFLICT (path) DO NOTHING RETURNING *) "
    "SELECT * FROM added UNION ALL "
    "SELECT * FROM sources WHERE path = ANY(ARRAY(SELECT path FROM r))"
)
LOOKUP_MAX = 1000  # paths per lookup statement
_SELECT_MANY = select(sources).where(sources.c.path == any_(bindparam("paths", type_=ARRAY(Text))))


class CheckpointStore:
    """The stream rows a source is handed: it learns positions here, never writes offsets.

    Holds no state of its own: what a source keeps of these rows is the source's to bound.
    """

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def load_many(self, paths: list[str]) -> dict[str, StreamState]:
        """The rows of these paths (those that have one), ``LOOKUP_MAX`` to a statement."""
        found: dict[str, StreamState] = {}
        with self._engine.connect() as conn:
            for start in range(0, len(paths), LOOKUP_MAX):
                stored = [storable_path(p) for p in paths[start : start + LOOKUP_MAX]]
                rows = conn.execute(_SELECT_MANY, {"paths": stored})
                found.update((s.path, s) for s in map(_state, rows))
        return found

    def load(self, path: str) -> StreamState | None:
        with self._engine.connect() as conn:
            row = conn.execute(select(sources).where(sources.c.path == storable_path(path))).first()
        return _state(row) if row else None

    def register(self, path: str, inode: int, device: int) -> StreamState:
        """The source row for ``path``, created at offset 0 when new.

        Raises StreamRefused when PostgreSQL refuses the row for good (its path beyond the
        unique index's limit): that stream is held, the others go on.
        """
        try:
            return self._register(path, inode, device)
        except Exception as exc:
            if is_transient(exc):
                raise
            raise StreamRefused(describe(exc)) from exc

    def _register(self, path: str, inode: int, device: int) -> StreamState:
        stored = storable_path(path)
        with self._engine.begin() as conn:
            row = conn.execute(
                pg_insert(sources)
                .values(path=stored, path_bytes=path_bytes(path), inode=inode, device=device)
                .on_conflict_do_nothing(index_elements=["path"])
                .returning(*sources.c)
            ).first()
            if row is None:
                row = conn.execute(select(sources).where(sources.c.path == stored)).one()
        return _state(row)

    def register_many(self, files: list[tuple[str, int, int]]) -> dict[str, StreamState]:
        """``register`` many (path, inode, device) at once: one transaction, one statement
        (the rows as one JSON parameter, ``store.bulk``), not one transaction per file. For
        a catch-up over a tree of many new files.

        Refused for good (one path beyond the index's limit refuses them all): {} and a
        warning; ``register`` then takes them one by one and holds only the culprit.
        """
        if not files:
            return {}
        rows = []
        for path, inode, device in files:
            raw = path_bytes(path)
            rows.append(
                {
                    "path": storable_path(path),
                    "raw": raw.hex() if raw is not None else None,
                    "inode": inode,
                    "device": device,
                }
            )
        try:
            with self._engine.begin() as conn:
                found = conn.execute(_REGISTER_MANY, {"rows": json_rows(rows)}).all()
                missing = {r["path"] for r in rows} - {f.path for f in found}
                if missing:
                    found += conn.execute(_SELECT_MANY, {"paths": sorted(missing)}).all()
        except Exception as exc:
            if is_transient(exc):
                raise
            log.warning("bulk registration of new files refused", extra={"error": describe(exc)})
            return {}
        return {s.path: s for s in map(_state, found)}

    def rebind(self, state: StreamState, inode: int, device: int) -> StreamState:
        """Same content under a new inode (file replaced by a copy): keep the offset."""
        with self._engine.begin() as conn:
            row = conn.execute(
                update(sources)
                .where(sources.c.id == state.source_id, sources.c.generation == state.generation)
                .values(inode=inode, device=device)
                .returning(*sources.c)
            ).first()
        return _state(row) if row else self._reload(state)

    def new_generation(self, state: StreamState, inode: int, device: int) -> StreamState:
        """Different content under the same path: read it from 0 as a new generation.

        Guarded by the generation and offset seen, so a concurrent writer cannot be undone.
        """
        with self._engine.begin() as conn:
            row = conn.execute(
                update(sources)
                .where(
                    sources.c.id == state.source_id,
                    sources.c.generation == state.generation,
                    sources.c.committed_offset == state.committed_offset,
                )
                .values(
                    generation=sources.c.generation + 1,
                    committed_offset=0,
                    lines_committed=0,
                    fingerprint=None,
                    inode=inode,
                    device=device,
                )
                .returning(*sources.c)
            ).first()
        return _state(row) if row else self._reload(state)

    def _reload(self, state: StreamState) -> StreamState:
        fresh = self.load(state.path)
        assert fresh is not None, f"source {state.path} vanished"
        return fresh
