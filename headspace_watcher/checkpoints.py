"""Per-file read checkpoints (the ``sources`` table).

The checkpoint is only ever advanced by the writer inside the transaction that stores the
events of those bytes; this module creates sources and moves them to a new generation when
a file was truncated or replaced by different content.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from sqlalchemy import Engine, select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert

from headspace_watcher.db import sources

FINGERPRINT_SPAN = 256


def tail_fingerprint(data: bytes) -> bytes:
    """Hash of the last ``FINGERPRINT_SPAN`` bytes before a checkpoint.

    Comparing it with the same span of a re-opened file tells "same content, keep going"
    from "different file under the same name, start a new generation".
    """
    return hashlib.sha256(data[-FINGERPRINT_SPAN:]).digest()


@dataclass(slots=True)
class SourceState:
    source_id: int
    path: str
    inode: int
    device: int
    generation: int
    committed_offset: int
    fingerprint: bytes | None
    lines_committed: int = 0


def _state(row: object) -> SourceState:
    m = row._mapping  # type: ignore[attr-defined]
    return SourceState(
        source_id=m["id"],
        path=m["path"],
        inode=m["inode"],
        device=m["device"],
        generation=m["generation"],
        committed_offset=m["committed_offset"],
        fingerprint=m["fingerprint"],
        lines_committed=m["lines_committed"],
    )


class CheckpointStore:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def load_all(self) -> dict[str, SourceState]:
        with self._engine.connect() as conn:
            return {s.path: s for s in map(_state, conn.execute(select(sources)))}

    def load(self, path: str) -> SourceState | None:
        with self._engine.connect() as conn:
            row = conn.execute(select(sources).where(sources.c.path == path)).first()
        return _state(row) if row else None

    def register(self, path: str, inode: int, device: int) -> SourceState:
        """The source row for ``path``, created at offset 0 when new.

        Committed without waiting for the WAL flush (one fsync per new file made a catch-up
        of a tree of many files slow). Safe: a row at offset 0 lost in a crash is simply
        registered again, and any batch that references it commits synchronously, which
        flushes the WAL up to and including this earlier commit.
        """
        with self._engine.begin() as conn:
            conn.execute(text("SET LOCAL synchronous_commit TO off"))
            row = conn.execute(
                pg_insert(sources)
                .values(path=path, inode=inode, device=device)
                .on_conflict_do_nothing(index_elements=["path"])
                .returning(*sources.c)
            ).first()
            if row is None:
                row = conn.execute(select(sources).where(sources.c.path == path)).one()
        return _state(row)

    def rebind(self, state: SourceState, inode: int, device: int) -> SourceState:
        """Same content under a new inode (file replaced by a copy): keep the offset."""
        with self._engine.begin() as conn:
            row = conn.execute(
                update(sources)
                .where(sources.c.id == state.source_id, sources.c.generation == state.generation)
                .values(inode=inode, device=device)
                .returning(*sources.c)
            ).first()
        return _state(row) if row else self._reload(state)

    def new_generation(self, state: SourceState, inode: int, device: int) -> SourceState:
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

    def _reload(self, state: SourceState) -> SourceState:
        fresh = self.load(state.path)
        assert fresh is not None, f"source {state.path} vanished"
        return fresh
