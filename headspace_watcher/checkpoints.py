"""Per-file read checkpoints (the ``sources`` table).

The checkpoint is only ever advanced by the writer inside the transaction that stores the
events of those bytes; this module creates sources and moves them to a new generation when
a file was truncated or replaced by different content.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

from sqlalchemy import Engine, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert

from headspace_watcher.db import sources

FINGERPRINT_SPAN = 256


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
    raw = m.get("path_bytes")
    return SourceState(
        source_id=m["id"],
        path=os.fsdecode(bytes(raw)) if raw is not None else m["path"],
        inode=m["inode"],
        device=m["device"],
        generation=m["generation"],
        committed_offset=m["committed_offset"],
        fingerprint=m["fingerprint"],
        lines_committed=m["lines_committed"],
    )


PREFETCH_MAX = 1000


class CheckpointStore:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._prefetched: dict[str, SourceState] = {}

    def load_all(self) -> dict[str, SourceState]:
        self._prefetched.clear()
        with self._engine.connect() as conn:
            return {s.path: s for s in map(_state, conn.execute(select(sources)))}

    def load(self, path: str) -> SourceState | None:
        with self._engine.connect() as conn:
            row = conn.execute(select(sources).where(sources.c.path == storable_path(path))).first()
        return _state(row) if row else None

    def register(self, path: str, inode: int, device: int) -> SourceState:
        """The source row for ``path``, created at offset 0 when new (or from ``prefetch``)."""
        state = self._prefetched.pop(path, None)
        if state is not None and (state.inode, state.device) == (inode, device):
            return state
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

    def prefetched(self, path: str) -> bool:
        return path in self._prefetched

    def prefetch(self, files: list[tuple[str, int, int]]) -> None:
        """``register`` many (path, inode, device) at once: one transaction, not one per file.

        For a catch-up over a tree of many new files. ``register`` then answers from memory
        (the rows cannot change meanwhile: only this process's writer advances a source, and
        only once it is registered; the batch guard would catch it anyway).
        """
        if len(self._prefetched) >= PREFETCH_MAX:  # left over (files gone meanwhile)
            self._prefetched.clear()
        todo = [f for f in files if f[0] not in self._prefetched][:PREFETCH_MAX]
        if not todo:
            return
        with self._engine.begin() as conn:
            conn.execute(
                pg_insert(sources)
                .values(
                    [
                        {
                            "path": storable_path(p),
                            "path_bytes": path_bytes(p),
                            "inode": i,
                            "device": d,
                        }
                        for p, i, d in todo
                    ]
                )
                .on_conflict_do_nothing(index_elements=["path"])
            )
            rows = conn.execute(
                select(sources).where(sources.c.path.in_([storable_path(p) for p, _i, _d in todo]))
            ).all()
        for row in rows:
            state = _state(row)
            self._prefetched[state.path] = state

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
