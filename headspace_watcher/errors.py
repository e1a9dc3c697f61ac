"""Every error headspace-watcher raises on purpose, under one root.

One root (``HeadspaceError``) lets the CLI tell "we refused, with a message meant for the
user" from "a bug", and lets a caller catch everything of ours without catching the world.
This module is at the bottom of the package: it imports nothing of ours.
"""

from __future__ import annotations


class HeadspaceError(Exception):
    """Root of every deliberate error; its message is meant for the user (no secrets)."""


class ConfigError(HeadspaceError):
    """A configuration value is wrong; the message names the key and what was expected."""


class InvalidEvent(HeadspaceError, ValueError):
    """An event whose type is unknown or whose payload breaks its schema."""

    def __init__(self, event_type: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.event_type = event_type
        self.field = field


class AnotherInstance(HeadspaceError):
    """Another headspace-watcher already holds what this one needs (lock, state dir)."""


class StreamRefused(HeadspaceError):
    """The store refuses a stream's checkpoint row for good (e.g. a path beyond an index's
    limit): the stream is held, every other one goes on."""


class StoreError(HeadspaceError):
    """The store could not do what it was asked."""


class WriteFailed(StoreError):
    """Transient failures outlasted the retries; nothing of the batch was stored."""


class WriteAborted(StoreError):
    """The caller asked to stop (shutdown) while retrying; nothing of the batch was stored."""


class BatchRefused(StoreError):
    """A non-transient error remained even line by line; nothing of the batch was stored."""


class CheckpointConflict(StoreError):
    """A source's stored position is not where the batch starts: someone else wrote it."""


class SchemaError(StoreError):
    """The database holds a schema ``init_db`` cannot account for; it changes nothing."""


class ServerError(StoreError):
    """The embedded PostgreSQL could not be located, initialised, started or stopped."""
