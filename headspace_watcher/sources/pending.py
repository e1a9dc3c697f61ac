"""The streams that may hold unread records, and whose sessions those records can be of.

A catch-up over years of history wants to end each timed-out session as soon as nothing
unread can still belong to it (then neither the session nor its files stay in memory until
the whole backlog is read), and never earlier: ending a session and then reading another of
its lines would register it again. What a path tells (``sources.layout.stream_owner``) is
enough to know whose lines an unread file can hold: ``<folder>/<uuid>.jsonl`` and
``<folder>/<uuid>/subagents/*`` are that session's; a 2.0.x ``agent-<id>.jsonl`` names none
and may hold lines of any session of its project folder.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

# (project folder, what names the session: the path itself, its session folder, or None)
Owner = Callable[[str], tuple[str, str | None]]


class PendingStreams:
    """An insertion-ordered set of paths (the round robin of reading) with counts of its
    paths per project folder, per session folder (sub-agents) and per project folder of
    the paths that name no session. Nothing is kept per session besides: a backlog of
    10,000 files costs its paths, not a session name each too."""

    __slots__ = ("_folders", "_home", "_owner", "_paths", "_session_dirs", "_unnamed")

    def __init__(self, owner: Owner) -> None:
        self._owner = owner
        self._paths: dict[str, None] = {}
        self._folders: dict[str, int] = {}
        self._session_dirs: dict[str, int] = {}
        self._unnamed: dict[str, int] = {}
        # session -> the project folder holding its transcript, once a look found it held
        # there: a session waiting on its folder's 2.0.x files is then checked in O(1) at
        # each batch, not with a stat per folder (thousands of them wait in such a tree)
        self._home: dict[str, str] = {}

    def add(self, path: str) -> None:
        if path in self._paths:
            return
        self._paths[path] = None
        folder, names = self._owner(path)
        _increment(self._folders, folder)
        if names is None:
            _increment(self._unnamed, folder)
        elif names is not path:
            _increment(self._session_dirs, names)

    def discard(self, path: str) -> None:
        if path not in self._paths:
            return
        del self._paths[path]
        folder, names = self._owner(path)
        _decrement(self._folders, folder)
        if names is None:
            _decrement(self._unnamed, folder)
        elif names != path:
            _decrement(self._session_dirs, names)

    def clear(self) -> None:
        """Empty, freeing the tables a backlog grew (a dict never shrinks by deletions)."""
        self._paths, self._folders, self._session_dirs, self._unnamed = {}, {}, {}, {}
        self._home = {}

    def may_hold(self, session_uuid: str) -> bool:
        """Can a pending path hold lines of ``session_uuid``: its transcript or one of its
        sub-agents', or one naming no session in a folder that has its transcript."""
        name = session_uuid + ".jsonl"
        home = self._home.get(session_uuid)
        if home is not None:
            if self._holds(home, session_uuid, name) or home in self._unnamed:
                return True
            del self._home[session_uuid]
            return False
        for folder in self._folders:
            if self._holds(folder, session_uuid, name):
                return True
        for folder in self._unnamed:
            if os.path.lexists(os.path.join(folder, name)):
                self._home[session_uuid] = folder
                return True
        return False

    def _holds(self, folder: str, session_uuid: str, name: str) -> bool:
        """Is the session's transcript, or one of its sub-agents', pending in ``folder``?"""
        return (
            os.path.join(folder, name) in self._paths
            or os.path.join(folder, session_uuid) in self._session_dirs
        )

    def __contains__(self, path: object) -> bool:
        return path in self._paths

    def __iter__(self) -> Iterator[str]:
        return iter(self._paths)

    def __len__(self) -> int:
        return len(self._paths)

    def __bool__(self) -> bool:
        return bool(self._paths)


def _increment(counts: dict[str, int], key: str) -> None:
    counts[key] = counts.get(key, 0) + 1


def _decrement(counts: dict[str, int], key: str) -> None:
    left = counts[key] - 1
    if left:
        counts[key] = left
    else:
        del counts[key]
