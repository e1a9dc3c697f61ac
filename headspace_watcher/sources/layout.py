"""The Claude Code projects layout: which files are transcripts, and what a path tells.

``<root>/<project>/<uuid>.jsonl`` (a session), ``<root>/<project>/agent-<id>.jsonl`` (a 2.0.x
sub-agent) and ``<root>/<project>/<uuid>/subagents/agent-<id>.jsonl`` (a 2.1.x sub-agent).
"""

from __future__ import annotations

import os
from pathlib import Path

from headspace_watcher.records import FileContext

_SUBAGENT_PREFIX = "agent-"
_SUFFIX = ".jsonl"


def is_transcript(root: Path, path: Path) -> bool:
    """``<project>/*.jsonl`` or ``<project>/<uuid>/subagents/*.jsonl`` under ``root``."""
    try:
        parts = path.relative_to(root).parts
    except ValueError:
        return False
    if not parts or not parts[-1].endswith(".jsonl"):
        return False
    return len(parts) == 2 or (len(parts) == 4 and parts[2] == "subagents")


def _looks_like_uuid(value: str) -> bool:
    """Only a canonical 8-4-4-4-12 hex name is trusted as a session id (``short.jsonl`` is not)."""
    if len(value) != 36:
        return False
    for i, ch in enumerate(value):
        if i in (8, 13, 18, 23):
            if ch != "-":
                return False
        elif ch not in "0123456789abcdefABCDEF":
            return False
    return True


def _subagent_id(name: str) -> str | None:
    if name.startswith(_SUBAGENT_PREFIX) and name.endswith(_SUFFIX):
        ident = name[len(_SUBAGENT_PREFIX) : -len(_SUFFIX)]
        return ident or None
    return None


def file_context(path: str | Path, projects_root: str | Path) -> FileContext:
    """Derive per-file fallbacks from the Claude Code projects layout.

    Layouts: ``<root>/<proj>/<uuid>.jsonl`` (session), ``<root>/<proj>/agent-<id>.jsonl``
    (2.0.x sub-agent, its lines name the session) and
    ``<root>/<proj>/<uuid>/subagents/agent-<id>.jsonl`` (2.1.x sub-agent).

    ``project_hint`` decodes the folder name by turning every ``-`` into ``/``. Claude Code's
    encoding is lossy (``/``, ``.`` and ``-`` all become ``-``), so this is only a best effort
    for lines without ``cwd``; a line's ``cwd`` always wins.
    """
    abs_path = os.path.abspath(os.fspath(path))
    root = os.path.abspath(os.fspath(projects_root))
    name = os.path.basename(abs_path)
    stem = name[: -len(_SUFFIX)] if name.endswith(_SUFFIX) else os.path.splitext(name)[0]

    rel_parts: list[str] | None = None
    rel = os.path.relpath(abs_path, root)
    if rel != os.curdir and rel != os.pardir and not rel.startswith(os.pardir + os.sep):
        rel_parts = rel.split(os.sep)

    subagent_hint = _subagent_id(name)
    session_hint: str | None = stem if _looks_like_uuid(stem) else None
    project_hint: str | None = None
    if rel_parts is not None and len(rel_parts) >= 2:
        project_hint = rel_parts[0].replace("-", "/") or None
        if len(rel_parts) == 4 and rel_parts[2] == "subagents" and rel_parts[1]:
            session_hint = rel_parts[1]
    return FileContext(
        path=abs_path,
        session_hint=session_hint,
        subagent_hint=subagent_hint,
        project_hint=project_hint,
    )


def stream_owner(path: str, projects_root: str) -> tuple[str, str | None]:
    """(project folder, what names its session) of a transcript path: the path itself for
    ``<uuid>.jsonl``, ``<folder>/<uuid>`` for that session's sub-agents, None when the path
    names no session (a 2.0.x ``agent-<id>.jsonl``: its lines do)."""
    ctx = file_context(path, projects_root)
    folder = os.path.dirname(path)
    if ctx.session_hint is None:
        return folder, None
    if os.path.basename(folder) == "subagents":
        session_dir = os.path.dirname(folder)
        return os.path.dirname(session_dir), session_dir
    return folder, path
