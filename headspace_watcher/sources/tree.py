"""Discovery: which transcript files exist and which may have changed (inotify).

One inotify descriptor watches the projects root and the folders below it that can hold
transcripts (``<project>/``, ``<project>/<uuid>/``, ``<project>/<uuid>/subagents/``). File
writes are reported on their folder's watch, so there is no watch per file. The watcher
only says *which* files may have changed; what to read is decided by comparing the file
with its committed checkpoint, so a lost or coalesced event can never lose a line — at
worst a rescan reads nothing new.

Nothing outside the projects root is ever followed: symlinked folders are neither listed nor
watched (folders are listed through ``O_NOFOLLOW`` descriptors and watched with
``IN_DONT_FOLLOW``); files are opened only by ``sources.reader.open_in_tree``.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from inotify_simple import INotify
from inotify_simple import flags as F

from headspace_watcher.sources.layout import is_transcript

log = logging.getLogger(__name__)

DIR_MASK = (
    F.CREATE
    | F.MODIFY
    | F.CLOSE_WRITE
    | F.MOVED_TO
    | F.MOVED_FROM
    | F.DELETE
    | F.DELETE_SELF
    | F.MOVE_SELF
    | F.ATTRIB
    | F.ONLYDIR
)
# Below the root a folder is watched only if it is a folder itself: IN_DONT_FOLLOW makes a
# symlink swapped in for it between the scan and add_watch fail (ENOTDIR) instead of watching
# whatever it points at. The root may be a symlink: its real path is the trust anchor.
SUBDIR_MASK = DIR_MASK | F.DONT_FOLLOW
ANCESTOR_MASK = F.CREATE | F.MOVED_TO | F.DELETE_SELF | F.MOVE_SELF | F.ONLYDIR
MAX_DIR_DEPTH = 3  # root=0, project=1, <uuid>=2, subagents=3


@dataclass(slots=True)
class WatchChanges:
    dirty: set[str] = field(default_factory=set)
    deleted: set[str] = field(default_factory=set)
    rescan: bool = False

    def __bool__(self) -> bool:
        return bool(self.dirty or self.deleted or self.rescan)


class TreeWatcher:
    """Discovery of transcript files; see the module docstring."""

    def __init__(self, root: Path) -> None:
        self.root = Path(os.path.abspath(root))
        self._inotify = INotify()
        # wd -> folder inside the tree, as a string: a tree of 10,000 sessions with sub-agents
        # has 20,000 of them, and a Path costs ~3x its string
        self._dirs: dict[int, str] = {}
        self._ancestor: tuple[int, Path] | None = None  # waiting for the root to appear
        self.watch_limit_reached = False
        self.root_present = False
        self.unlisted: dict[str, None] = {}  # project folders watched, not listed yet

    def fileno(self) -> int:
        return self._inotify.fileno()

    def close(self) -> None:
        self._inotify.close()

    @property
    def watch_count(self) -> int:
        return len(self._dirs)

    # ------------------------------------------------------------------ set-up
    def start(self) -> list[str]:
        """Watch the tree (or the nearest existing ancestor) and return the files present."""
        found = self.watch_tree()
        while self.unlisted:
            found.extend(self.list_next())
        return found

    def watch_tree(self) -> list[str]:
        """Watch the root and every project folder in it, leaving the project folders to be
        listed by ``list_next``: a catch-up then holds one folder's pending files at a
        time, not the whole tree's. Events in a folder not listed yet are reported as
        usual (its watch is set first), so nothing written meanwhile goes unseen."""
        if not self.root.is_dir():
            return self._wait_for_root(list_now=False)
        self.root_present = True
        self._drop_ancestor()
        if not self._watch(self.root, DIR_MASK):
            return []
        try:
            entries = _list_folder(self.root, follow=True)
        except OSError as exc:
            log.warning("cannot list folder", extra={"path": str(self.root), "error": exc.strerror})
            return []
        for entry in entries:
            with contextlib.suppress(OSError):
                if entry.is_dir(follow_symlinks=False):
                    folder = self.root / entry.name
                    if self._watch(folder, SUBDIR_MASK):
                        self.unlisted[str(folder)] = None
        return []

    def list_next(self) -> list[str]:
        """The transcript files of the next project folder not listed yet (and its session
        folders watched)."""
        folder = next(iter(self.unlisted))
        del self.unlisted[folder]
        return self._add_tree(Path(folder), 1)

    def rescan(self) -> list[str]:
        """Re-add every watch (after an overflow); the project folders are listed again."""
        return self.watch_tree()

    def _wait_for_root(self, *, list_now: bool) -> list[str]:
        """Watch the nearest existing ancestor; the files present if the root just appeared
        (all of them with ``list_now``, as an event reports them; else see ``watch_tree``)."""
        self.root_present = False
        probe = self.root.parent
        while not probe.is_dir() and probe != probe.parent:
            probe = probe.parent
        if self._ancestor and self._ancestor[1] == probe:
            return []
        self._drop_ancestor()
        try:
            wd = self._inotify.add_watch(probe, ANCESTOR_MASK)
        except OSError as exc:
            log.warning("cannot watch %s for the projects path: %s", probe, exc.strerror)
            return []
        self._ancestor = (wd, probe)
        log.info("projects path does not exist yet; waiting", extra={"path": str(self.root)})
        if self.root.is_dir():  # appeared between the check and the watch
            return self.start() if list_now else self.watch_tree()
        return []

    def _drop_ancestor(self) -> None:
        if self._ancestor is not None:
            with contextlib.suppress(OSError):
                self._inotify.rm_watch(self._ancestor[0])
            self._ancestor = None

    def _add_tree(self, folder: Path, depth: int) -> list[str]:
        found: list[str] = []
        if not self._watch(folder, DIR_MASK if depth == 0 else SUBDIR_MASK):
            return found
        try:
            entries = _list_folder(folder, follow=depth == 0)
        except OSError as exc:
            log.warning("cannot list folder", extra={"path": str(folder), "error": exc.strerror})
            return found
        base = str(folder)
        for entry in entries:
            try:
                is_dir = entry.is_dir(follow_symlinks=False)
            except OSError:
                continue
            if is_dir and depth < MAX_DIR_DEPTH:
                path = folder / entry.name
                if self._wanted_dir(path):
                    found.extend(self._add_tree(path, depth + 1))
            elif not is_dir and _is_transcript_at(depth, base, entry.name):
                found.append(os.path.join(base, entry.name))
        return found

    def _wanted_dir(self, path: Path) -> bool:
        parts = path.relative_to(self.root).parts
        return len(parts) < 3 or parts[2] == "subagents"

    def _watch(self, folder: Path, mask: int) -> bool:
        try:
            wd = self._inotify.add_watch(folder, mask)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                if not self.watch_limit_reached:
                    log.warning(
                        "inotify watch limit reached (fs.inotify.max_user_watches); "
                        "falling back to periodic rescans",
                        extra={"path": str(folder)},
                    )
                self.watch_limit_reached = True
            elif exc.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                log.warning("cannot watch folder", extra={"path": str(folder), "error": str(exc)})
            return False
        self._dirs[wd] = str(folder)
        return True

    # ------------------------------------------------------------------ events
    def read(self, timeout_ms: int | None = 0) -> WatchChanges:
        """Drain pending inotify events into a set of changes (non-blocking by default)."""
        changes = WatchChanges()
        for ev in self._inotify.read(timeout=timeout_ms):
            self._apply(ev, changes)
        return changes

    def _apply(self, ev: object, changes: WatchChanges) -> None:
        wd, mask, name = ev.wd, ev.mask, ev.name  # type: ignore[attr-defined]
        if mask & F.Q_OVERFLOW:
            log.warning("inotify queue overflow; rescanning the tree")
            changes.rescan = True
            return
        if self._ancestor and wd == self._ancestor[0]:
            if mask & (F.DELETE_SELF | F.MOVE_SELF | F.IGNORED):
                self._ancestor = None
            self._wait_or_start(changes)
            return
        watched = self._dirs.get(wd)
        if watched is None:
            return
        folder = Path(watched)
        if mask & (F.DELETE_SELF | F.MOVE_SELF | F.IGNORED):
            self._forget(wd, folder, changes)
            return
        if not name:
            return
        path = folder / name
        if mask & F.ISDIR:
            if mask & (F.CREATE | F.MOVED_TO):
                depth = len(path.relative_to(self.root).parts)
                if depth <= MAX_DIR_DEPTH and self._wanted_dir(path):
                    changes.dirty.update(self._add_tree(path, depth))
            return
        if not is_transcript(self.root, path):
            return
        if mask & (F.DELETE | F.MOVED_FROM):
            changes.deleted.add(str(path))
            changes.dirty.discard(str(path))
        else:
            changes.dirty.add(str(path))
            changes.deleted.discard(str(path))

    def _wait_or_start(self, changes: WatchChanges) -> None:
        if self.root.is_dir():
            changes.dirty.update(self.start())
        else:
            changes.dirty.update(self._wait_for_root(list_now=True))

    def _forget(self, wd: int, folder: Path, changes: WatchChanges) -> None:
        self._dirs.pop(wd, None)
        self.unlisted.pop(str(folder), None)
        if folder == self.root:
            log.warning("projects path removed; waiting for it to reappear")
            self.unlisted.clear()
            for other in list(self._dirs):
                self._dirs.pop(other, None)
            changes.rescan = True
            changes.dirty.update(self._wait_for_root(list_now=True))


def _is_transcript_at(depth: int, folder: str, name: str) -> bool:
    """``is_transcript`` for a name listed in a folder at ``depth`` (root = 0): a project
    folder's ``*.jsonl``, or a ``<uuid>/subagents`` folder's."""
    if not name.endswith(".jsonl"):
        return False
    return depth == 1 or (depth == 3 and os.path.basename(folder) == "subagents")


def _list_folder(folder: Path, *, follow: bool) -> list[os.DirEntry[str]]:
    """The folder's entries; below the root through an ``O_NOFOLLOW`` descriptor, so a folder
    replaced by a symlink after its watch was set up is not listed (ELOOP/ENOTDIR)."""
    if follow:
        with os.scandir(folder) as it:
            return list(it)
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        with os.scandir(fd) as it:
            return list(it)
    finally:
        os.close(fd)
