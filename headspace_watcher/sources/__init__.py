"""Sources: what produces records, and the contract every source keeps.

A *source* owns one or more *streams* (today: the transcript files of the projects tree,
``sources.transcripts``; next: the hook spool). The service's loop drives any number of
sources through this contract and nothing else:

1. **Say what is new.** ``fileno()`` is a descriptor that becomes readable when something may
   have changed (inotify today), or ``None``; ``drain()`` consumes those notifications;
   ``pending()`` is true while some stream may hold records past its checkpoint. A lost or
   coalesced notification may cost a re-read, never a record: what to read is always decided
   by comparing a stream with its durable checkpoint.
2. **Yield complete records with their durable position.** ``read(budget)`` returns
   ``Chunk``s: for one stream, the complete records past its committed checkpoint (each
   with its byte offset), where they end, and the fingerprint of the bytes before that end.
   A record that is not complete yet (no newline) is never yielded. A stream that cannot be
   read yields a chunk with ``failure`` set instead (recorded once as a rejection).
3. **Be advanced only by the store.** A source never writes a position. The store moves a
   checkpoint in the same transaction as the events of its bytes; only after that commit
   does the loop call ``committed(chunks)``, and after a failure ``rolled_back(chunks)``,
   which makes the source offer the same records again. Exactly once follows: a record is
   either committed with its checkpoint or offered again.
4. **Positions come from the store.** Stream rows (id, generation, committed offset,
   fingerprint) are created and re-bound through the ``Checkpoints`` interface the service
   hands in (``store.checkpoints.CheckpointStore`` implements it); sources import nothing
   from the store.

``hold(path, reason, delay_for)`` sets a stream aside whose records the store refuses even
one by one (retried after a capped backoff or when it changes; every other stream goes on).
Around that: ``start()`` discovers the streams (it may list them lazily: ``pending()`` stays
true until all are known); ``reload()`` re-reads the checkpoints of the streams it tracks
after a (re)connect and offers every stream again; ``conflicted(chunks)``
re-reads those streams' checkpoints after the store refused a batch as stale;
``sessions_changed()`` is told when session states changed (a source may drop state it no
longer needs; it returns how many streams it forgot); ``tick(now)`` does periodic upkeep and
says when it next wants to run; ``closed_sessions()`` names the sessions whose stream
disappeared (the loop ends them); ``lag_bytes()`` and ``health()`` feed ``status``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from headspace_watcher.records import Chunk, StreamState


class Budget:
    """How much one batch may still take: lines, bytes and (when isolating a refused batch)
    streams, shared by every source."""

    __slots__ = ("bytes", "lines", "streams")

    def __init__(self, lines: int, nbytes: int, streams: int | None = None) -> None:
        self.lines = lines
        self.bytes = nbytes
        self.streams = streams

    def spend(self, chunk: Chunk) -> None:
        self.lines -= chunk.count
        self.bytes -= chunk.nbytes
        if self.streams is not None:
            self.streams -= 1

    @property
    def exhausted(self) -> bool:
        return self.lines <= 0 or self.bytes <= 0 or self.streams == 0


class Checkpoints(Protocol):
    """Durable stream positions, as a source may use them (never to move an offset)."""

    def load_many(self, paths: list[str]) -> dict[str, StreamState]: ...

    def load(self, path: str) -> StreamState | None: ...

    def register(self, path: str, inode: int, device: int) -> StreamState: ...

    def register_many(self, files: list[tuple[str, int, int]]) -> dict[str, StreamState]: ...

    def rebind(self, state: StreamState, inode: int, device: int) -> StreamState: ...

    def new_generation(self, state: StreamState, inode: int, device: int) -> StreamState: ...


class Source(Protocol):
    """See the module docstring for the contract."""

    name: str

    def fileno(self) -> int | None: ...

    def drain(self) -> None: ...

    def pending(self) -> bool: ...

    def read(self, budget: Budget) -> list[Chunk]: ...

    def committed(self, chunks: list[Chunk]) -> None: ...

    def rolled_back(self, chunks: list[Chunk]) -> None: ...

    def start(self) -> None: ...

    def hold(self, path: str, reason: str, delay_for: Callable[[int], float]) -> bool: ...

    def tick(self, now: float) -> float | None: ...

    def closed_sessions(self) -> list[str]: ...

    def reload(self) -> None: ...

    def conflicted(self, chunks: list[Chunk]) -> None: ...

    def sessions_changed(self) -> int: ...

    def may_hold(self, session_uuid: str) -> bool: ...

    def health(self) -> dict[str, Any]: ...

    def found(self) -> int: ...

    def lag_bytes(self) -> int: ...

    def close(self) -> None: ...
