"""Shared plumbing of the service benchmarks (writer, catchup, latency, idle, soak): not one itself.

* a throwaway PostgreSQL (``PgCluster`` in a temp dir, fsync on) or, when
  ``HEADSPACE_BENCH_DATABASE_URL`` is set, fresh databases on that server;
* a generator of realistic Claude Code transcript trees (shapes taken from real 2.0.x/2.1.x
  transcripts: one content block per assistant line, usage blocks, hook progress lines,
  tool results, file-history snapshots, sub-agents of both layouts);
* the INTERFACE.md turn rule, written independently of ``headspace_watcher.ingest.transcript``, for
  the naive and floor ingests and for the expected counts;
* the ``headspace-watcher`` subprocess and ``/proc`` readings (CPU ticks, RSS).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from sqlalchemy.engine import make_url

ENV_URL = "HEADSPACE_BENCH_DATABASE_URL"
CLK_TCK = os.sysconf("SC_CLK_TCK")

# --------------------------------------------------------------------------- database


@dataclass
class Server:
    """Where the benchmark's databases live; ``fresh()`` makes an empty one."""

    admin: Any  # PgCluster | ExternalServer
    description: str
    names: list[str] = field(default_factory=list)

    def url(self, dbname: str) -> str:
        return self.admin.url(dbname)

    def fresh(self, prefix: str) -> str:
        """A new empty database; its SQLAlchemy URL. Dropped when the server context ends."""
        name = f"{prefix}_{uuid.uuid4().hex[:8]}"
        self.admin.create_database(name)
        self.names.append(name)
        return self.url(name)

    def drop(self, url: str) -> None:
        name = make_url(url).database
        self.admin.drop_database(name)
        with contextlib.suppress(ValueError):
            self.names.remove(name)


@contextlib.contextmanager
def server() -> Iterator[Server]:
    """Own throwaway PgCluster (fsync on), or the server of ``HEADSPACE_BENCH_DATABASE_URL``."""
    from headspace_watcher.store.embedded import PgCluster
    from tests.pg_servers import ExternalServer

    external = os.environ.get(ENV_URL)
    if external:
        srv = Server(ExternalServer(external), f"external server ({ENV_URL})")
        try:
            yield srv
        finally:
            for name in list(srv.names):
                with contextlib.suppress(Exception):
                    srv.admin.drop_database(name)
        return
    base = Path(tempfile.mkdtemp(prefix="headspace-bench-pg-", dir="/tmp"))
    os.chmod(base, 0o755)  # as root, the server runs as an unprivileged user
    cluster = PgCluster(base / "cluster")
    try:
        cluster.start()
        yield Server(cluster, f"own throwaway PgCluster in {base} (fsync on)")
    finally:
        cluster.destroy()
        shutil.rmtree(base, ignore_errors=True)


@contextlib.contextmanager
def fresh_database(prefix: str) -> Iterator[tuple[Server, str]]:
    """``server()`` and one fresh database on it: (the server, the database's SQLAlchemy URL)."""
    with server() as srv:
        yield srv, srv.fresh(prefix)


@contextlib.contextmanager
def workdir(name: str) -> Iterator[Path]:
    """A temporary directory under /tmp for one benchmark's tree, state and log; removed after."""
    base = Path(tempfile.mkdtemp(prefix=f"headspace-bench-{name}-", dir="/tmp"))
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def libpq(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def checkpoint(url: str) -> None:
    """Flush dirty pages now, so a checkpoint mid-run does not skew one path only."""
    with contextlib.suppress(Exception), psycopg.connect(libpq(url), autocommit=True) as conn:
        conn.execute("CHECKPOINT")


# --------------------------------------------------------------------------- report


def header(name: str, url: str, srv: Server) -> None:
    """The command, the machine, PostgreSQL: printed at the top of every benchmark."""
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = "?"
    with contextlib.suppress(OSError, IndexError, ValueError):
        first = Path("/proc/meminfo").read_text().splitlines()[0]
        mem = f"{int(first.split()[1]) / 1024 / 1024:.1f} GiB"
    with psycopg.connect(libpq(url)) as conn:
        version = conn.execute("SELECT version()").fetchone()[0]  # type: ignore[index]
        settings = dict(
            conn.execute(
                "SELECT name, setting FROM pg_settings WHERE name IN "
                "('fsync', 'synchronous_commit', 'shared_buffers', 'max_wal_size')"
            ).fetchall()
        )
    argv = " ".join([Path(sys.executable).name, "-m", f"bench.{name}", *sys.argv[1:]])
    print(f"command:  {argv}")
    print(
        f"machine:  nproc={os.cpu_count()}  cpu={cpu}  mem={mem}  kernel={platform.release()}  "
        f"loadavg {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    print(f"python:   {sys.version.split()[0]}  psycopg {psycopg.__version__}")
    shown = ", ".join(f"{k}={v}" for k, v in settings.items())
    print(f"postgres: {version.split(',')[0]}  ({shown})")
    print(f"server:   {srv.description}", flush=True)


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


# --------------------------------------------------------------------------- transcripts

_VOCABULARY = """
the a to of and in is it that for this with on as be are was not by or from at an we you
function return self test error value file line writer batch event commit offset source
checkpoint database postgres query index table retry transaction timeout session agent user
turn text payload json schema validate import class def None True False assert raise except
try async await lambda config service tailer parser inotify watcher, fixed. done: failing
`pytest` `ruff` `git diff` `SELECT` `COPY` (see above) [1] -> => == != >= <= {} [] () "quoted"
'single' path/to/module.py src/app/main.ts 404 500 0.25 1,024 résumé naïve façade → ✓ 日本語
"""
_WORDS = _VOCABULARY.split()
MODELS = ("claude-opus-4-6", "claude-sonnet-4-5-20250929", "claude-haiku-4-5-20251001")
TOOLS = ("Read", "Edit", "Write", "Bash", "Grep", "Glob", "Task", "TodoWrite", "WebFetch")
HOOKS = ("PreToolUse", "PostToolUse", "SessionStart", "Stop", "UserPromptSubmit")
_B62 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"

# (kind, weight): half the lines are turns (user prompts, user text blocks, assistant text);
# the rest as in real transcripts. "assistant_blank" is a whitespace-only text block (real:
# "\n\n" before a thinking block) and is NOT a turn.
LINE_MIX: tuple[tuple[str, int], ...] = (
    ("user_prompt", 12),
    ("user_text_block", 3),
    ("assistant_text", 35),
    ("assistant_blank", 1),
    ("assistant_tool_use", 14),
    ("user_tool_result", 14),
    ("assistant_thinking", 5),
    ("progress", 10),
    ("file_history", 3),
    ("system", 2),
    ("queue_operation", 1),
)
TURN_KINDS = frozenset({"user_prompt", "user_text_block", "assistant_text"})
# (median characters, sigma of the log-normal, cap) per text-bearing kind
_TEXT_SIZES = {
    "user_prompt": (100, 1.2, 20_000),
    "user_text_block": (1_500, 1.0, 20_000),
    "assistant_text": (220, 1.1, 16_000),
    "assistant_thinking": (600, 1.0, 12_000),
    "assistant_tool_use": (120, 1.0, 8_000),
    "user_tool_result": (700, 1.4, 80_000),
}
LONG_LINE_RATE = 0.0008  # share of text-bearing lines made ~100 KB long


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _ts(t: datetime) -> str:
    return t.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _dumps(obj: Any) -> bytes:
    # Claude Code writes compact JSON with non-ASCII characters as they are.
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


@dataclass
class SessionCtx:
    """One transcript file being written: a main session or a sub-agent of one."""

    path: Path
    session_id: str
    cwd: str
    branch: str
    version: str
    clock: datetime
    agent_id: str | None = None
    parent_uuid: str | None = None
    slug: str | None = None


@dataclass
class TreeStats:
    root: Path
    files: int = 0
    lines: int = 0
    bytes: int = 0
    turns: int = 0
    projects: int = 0
    sessions: int = 0
    subagents: int = 0
    longest: int = 0
    long_lines: int = 0
    kinds: Counter[str] = field(default_factory=Counter)

    def describe(self) -> str:
        mix = ", ".join(f"{k} {v / max(1, self.lines):.0%}" for k, v in self.kinds.most_common())
        return (
            f"{self.bytes / 1e6:.1f} MB, {self.lines:,} lines ({self.turns:,} turns = "
            f"{self.turns / max(1, self.lines):.0%}) in {self.files} files: {self.projects} "
            f"projects, {self.sessions} sessions, {self.subagents} sub-agents (2.1.x and 2.0.x "
            f"layouts); mean line {self.bytes / max(1, self.lines):,.0f} B, longest "
            f"{self.longest / 1e3:.0f} KB, {self.long_lines} lines >= 90 KB\n          mix: {mix}"
        )


class TranscriptFactory:
    """Realistic transcript lines, deterministic for a seed."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.corpus = self._corpus(3_000_000)
        self.kinds = [k for k, _ in LINE_MIX]
        self.weights = [w for _, w in LINE_MIX]

    def _corpus(self, size: int) -> str:
        rng = self.rng
        parts: list[str] = []
        length = 0
        while length < size:
            r = rng.random()
            word = rng.choice(_WORDS)
            sep = "\n\n" if r < 0.02 else "\n" if r < 0.07 else " "
            if r > 0.995:
                word = '\n```python\ndef f(x):\n    return x * 2  # "doubled"\n```\n'
            parts.append(word + sep)
            length += len(word) + len(sep)
        return "".join(parts)

    def text(self, kind: str, long: bool = False) -> str:
        rng = self.rng
        if long:
            n = rng.randrange(90_000, 130_000)
        else:
            median, sigma, cap = _TEXT_SIZES[kind]
            n = max(2, min(cap, int(rng.lognormvariate(math.log(median), sigma))))
        start = rng.randrange(0, len(self.corpus) - n - 1)
        return self.corpus[start : start + n].strip() or "ok"

    def new_session(self, project_dir: Path, cwd: str, start: datetime, version: str) -> SessionCtx:
        sid = _uuid(self.rng)
        return SessionCtx(
            path=project_dir / f"{sid}.jsonl",
            session_id=sid,
            cwd=cwd,
            branch=self.rng.choice(("main", "feature/catchup", "fix/retry", "spotter-4te")),
            version=version,
            clock=start,
            slug=None,
        )

    def new_subagent(self, parent: SessionCtx) -> SessionCtx:
        rng = self.rng
        if parent.version.startswith("2.1"):
            agent = "a" + "".join(rng.choice("0123456789abcdef") for _ in range(7))
            path = parent.path.parent / parent.session_id / "subagents" / f"agent-{agent}.jsonl"
        else:
            agent = "".join(rng.choice("0123456789abcdef") for _ in range(8))
            path = parent.path.parent / f"agent-{agent}.jsonl"
        return SessionCtx(
            path=path,
            session_id=parent.session_id,
            cwd=parent.cwd,
            branch=parent.branch,
            version=parent.version,
            clock=parent.clock + timedelta(seconds=rng.uniform(1, 60)),
            agent_id=agent,
        )

    def _base(self, ctx: SessionCtx) -> dict[str, Any]:
        base: dict[str, Any] = {
            "parentUuid": ctx.parent_uuid,
            "isSidechain": ctx.agent_id is not None,
            "userType": "external",
            "cwd": ctx.cwd,
            "sessionId": ctx.session_id,
            "version": ctx.version,
            "gitBranch": ctx.branch,
        }
        if ctx.agent_id is not None:
            base["agentId"] = ctx.agent_id
        return base

    def _assistant(self, ctx: SessionCtx, block: dict[str, Any]) -> dict[str, Any]:
        rng = self.rng
        return self._base(ctx) | {
            "message": {
                "model": rng.choice(MODELS),
                "id": "msg_01" + "".join(rng.choices(_B62, k=22)),
                "type": "message",
                "role": "assistant",
                "content": [block],
                "stop_reason": None,
                "stop_sequence": None,
                "usage": {
                    "input_tokens": rng.randrange(1, 50),
                    "cache_creation_input_tokens": rng.randrange(0, 20_000),
                    "cache_read_input_tokens": rng.randrange(0, 200_000),
                    "cache_creation": {
                        "ephemeral_5m_input_tokens": rng.randrange(0, 20_000),
                        "ephemeral_1h_input_tokens": 0,
                    },
                    "output_tokens": rng.randrange(1, 4_000),
                    "service_tier": "standard",
                    "inference_geo": "global",
                },
            },
            "requestId": "req_011C" + "".join(rng.choices(_B62, k=20)),
            "type": "assistant",
        }

    def line(self, ctx: SessionCtx, kind: str | None = None, text: str | None = None) -> bytes:
        """One line (without newline) of ``kind`` (drawn from LINE_MIX when None)."""
        rng = self.rng
        kind = kind or rng.choices(self.kinds, self.weights)[0]
        ctx.clock += timedelta(milliseconds=rng.randrange(200, 30_000))
        ts = _ts(ctx.clock)
        my_uuid = _uuid(rng)
        long = kind in _TEXT_SIZES and rng.random() < LONG_LINE_RATE
        obj: dict[str, Any]
        if kind == "file_history":
            return _dumps(
                {
                    "type": "file-history-snapshot",
                    "messageId": my_uuid,
                    "snapshot": {
                        "messageId": my_uuid,
                        "trackedFileBackups": {},
                        "timestamp": ts,
                    },
                    "isSnapshotUpdate": False,
                }
            )
        if kind == "queue_operation":
            return _dumps(
                {
                    "type": "queue-operation",
                    "operation": "enqueue",
                    "timestamp": ts,
                    "sessionId": ctx.session_id,
                    "content": "<task-notification>\n<status>completed</status>\n"
                    "</task-notification>",
                }
            )
        if kind == "progress":
            hook = rng.choice(HOOKS)
            obj = self._base(ctx) | {
                "type": "progress",
                "data": {
                    "type": "hook_progress",
                    "hookEvent": hook,
                    "hookName": f"{hook}:startup",
                    "command": "/home/dev/.claude/hooks/tmux-waiting.sh clear",
                },
                "parentToolUseID": f"toolu_01{my_uuid[:22]}",
                "toolUseID": f"toolu_01{my_uuid[:22]}",
            }
        elif kind == "system":
            obj = self._base(ctx) | {
                "type": "system",
                "subtype": "stop_hook_summary",
                "hookCount": 1,
                "hookInfos": [{"command": "${CLAUDE_PLUGIN_ROOT}/hooks/stop-hook.sh"}],
                "hookErrors": [],
                "preventedContinuation": False,
                "stopReason": "",
                "hasOutput": True,
                "level": "suggestion",
            }
        elif kind == "user_prompt":
            obj = self._base(ctx) | {
                "type": "user",
                "message": {"role": "user", "content": text or self.text(kind, long)},
                "thinkingMetadata": {"maxThinkingTokens": 31999},
                "todos": [],
                "permissionMode": "bypassPermissions",
            }
        elif kind == "user_text_block":
            obj = self._base(ctx) | {
                "type": "user",
                "isMeta": True,
                "message": {
                    "role": "user",
                    "content": [{"type": "text", "text": text or self.text(kind, long)}],
                },
            }
        elif kind == "user_tool_result":
            result = self.text(kind, long)
            obj = self._base(ctx) | {
                "type": "user",
                "message": {
                    "role": "user",
                    "content": [
                        {
                            "tool_use_id": f"toolu_01{my_uuid[:22]}",
                            "type": "tool_result",
                            "content": result,
                            "is_error": False,
                        }
                    ],
                },
                "toolUseResult": {
                    "stdout": result[:2000],
                    "stderr": "",
                    "interrupted": False,
                    "isImage": False,
                },
                "sourceToolAssistantUUID": ctx.parent_uuid,
            }
        elif kind == "assistant_text":
            obj = self._assistant(ctx, {"type": "text", "text": text or self.text(kind, long)})
        elif kind == "assistant_blank":
            obj = self._assistant(ctx, {"type": "text", "text": "\n\n"})
        elif kind == "assistant_thinking":
            obj = self._assistant(
                ctx,
                {
                    "type": "thinking",
                    "thinking": self.text(kind, long),
                    "signature": "Eu8BCkYICxgCKkA" + "".join(rng.choices(_B62, k=300)),
                },
            )
        elif kind == "assistant_tool_use":
            tool = rng.choice(TOOLS)
            obj = self._assistant(
                ctx,
                {
                    "type": "tool_use",
                    "id": f"toolu_01{my_uuid[:22]}",
                    "name": tool,
                    "input": {"command": self.text(kind, long), "description": f"Run {tool}"},
                    "caller": {"type": "direct"},
                },
            )
        else:
            raise ValueError(kind)
        obj["uuid"] = my_uuid
        obj["timestamp"] = ts
        ctx.parent_uuid = my_uuid
        return _dumps(obj)


def generate_tree(
    root: Path,
    mb: float,
    seed: int = 20250601,
    *,
    recent: float = 0.1,
    now: datetime | None = None,
) -> TreeStats:
    """Write ≥ ``mb`` MB of transcripts under ``root`` (a ``~/.claude/projects`` look-alike).

    Sessions are log-normally sized (many small, a few large), ~30% have 1-3 sub-agents;
    ``recent`` is the share of sessions whose last line is within the last hour (still
    "active" for the watcher), the others ended days ago.
    """
    fac = TranscriptFactory(seed)
    rng = fac.rng
    now = now or datetime.now(UTC)
    stats = TreeStats(root)
    target = int(mb * 1e6)
    n_projects = max(3, int(mb * 0.4))
    projects: list[tuple[Path, str]] = []
    for i in range(n_projects):
        name = rng.choice(("api", "web", "infra", "spotter", "headspace", "tools", "docs"))
        cwd = f"/home/dev/projects/{name}-{i}"
        projects.append((root / cwd.replace("/", "-").replace(".", "-"), cwd))
    used: set[Path] = set()

    def write(ctx: SessionCtx, n_lines: int, first: str | None = None) -> None:
        ctx.path.parent.mkdir(parents=True, exist_ok=True)
        out: list[bytes] = []
        for j in range(n_lines):
            kind = first if j == 0 and first else None
            if kind is None:
                kind = rng.choices(fac.kinds, fac.weights)[0]
            raw = fac.line(ctx, kind)
            out.append(raw)
            stats.kinds[kind] += 1
            stats.turns += kind in TURN_KINDS
            stats.longest = max(stats.longest, len(raw))
            stats.long_lines += len(raw) >= 90_000
        data = b"\n".join(out) + b"\n"
        with open(ctx.path, "wb") as f:
            f.write(data)
        stats.files += 1
        stats.lines += n_lines
        stats.bytes += len(data)

    while stats.bytes < target:
        project_dir, cwd = rng.choice(projects)
        used.add(project_dir)
        n = max(3, min(6_000, int(rng.lognormvariate(math.log(120), 1.0))))
        span = timedelta(seconds=n * 15)
        if rng.random() < recent:
            start = now - span - timedelta(minutes=rng.uniform(1, 30))
        else:
            start = now - timedelta(days=rng.uniform(1, 60))
        version = rng.choice(("2.1.39", "2.1.29", "2.0.76"))
        ctx = fac.new_session(project_dir, cwd, start, version)
        write(ctx, n, first="user_prompt")
        stats.sessions += 1
        if rng.random() < 0.3:
            for _ in range(rng.randrange(1, 4)):
                sub = fac.new_subagent(ctx)
                write(sub, max(2, n // rng.randrange(3, 10)), first="user_prompt")
                stats.subagents += 1
    stats.projects = len(used)
    os.sync()  # its writeback must not compete with what is measured next
    return stats


def generate_shaped_tree(
    root: Path,
    files: int,
    lines_per_file: int,
    seed: int = 20250603,
    *,
    projects: int = 6,
    now: datetime | None = None,
) -> TreeStats:
    """``files`` main-session transcripts of exactly ``lines_per_file`` lines each, all ended.

    For comparing tree *shapes* at equal bytes (few big files against many small ones): the
    same line mix as ``generate_tree`` (drawn per line from one seeded factory, so two shapes
    with the same total lines have nearly the same bytes), no sub-agents, every session's
    last line days old (the watcher ends them all by timeout in the same catch-up).
    """
    fac = TranscriptFactory(seed)
    rng = fac.rng
    now = now or datetime.now(UTC)
    stats = TreeStats(root)
    dirs: list[tuple[Path, str]] = []
    for i in range(max(1, projects)):
        cwd = f"/home/dev/projects/shape-{i}"
        dirs.append((root / cwd.replace("/", "-"), cwd))
    for n in range(files):
        project_dir, cwd = dirs[n % len(dirs)]
        project_dir.mkdir(parents=True, exist_ok=True)
        start = now - timedelta(days=rng.uniform(2, 60))
        ctx = fac.new_session(project_dir, cwd, start, rng.choice(("2.1.39", "2.0.76")))
        out: list[bytes] = []
        for j in range(lines_per_file):
            kind = "user_prompt" if j == 0 else rng.choices(fac.kinds, fac.weights)[0]
            raw = fac.line(ctx, kind)
            out.append(raw)
            stats.kinds[kind] += 1
            stats.turns += kind in TURN_KINDS
            stats.longest = max(stats.longest, len(raw))
            stats.long_lines += len(raw) >= 90_000
        data = b"\n".join(out) + b"\n"
        ctx.path.write_bytes(data)
        stats.files += 1
        stats.sessions += 1
        stats.lines += lines_per_file
        stats.bytes += len(data)
    stats.projects = len(dirs[:files])
    os.sync()  # its writeback must not compete with what is measured next
    return stats


class CommitCounter:
    """Commits of one database (``pg_stat_database.xact_commit``), less this counter's own.

    A backend flushes its counts when it exits, and exits a moment after its client closed,
    so ``read()`` first waits (up to ``timeout``) until no other backend is connected to the
    database: then everything done by processes that have finished is counted. Each of its
    queries is a commit of its own (autocommit), counted by the next reading and subtracted;
    ``own(n)`` declares ``n`` more commits the caller made meanwhile (e.g. a count query).
    SQLAlchemy's read-only transactions end in ROLLBACK and are not counted, but its pool
    pre-ping (``SELECT 1`` in autocommit at each checkout) is: a commit without WAL. So
    ``read()`` also returns the WAL fsyncs of the whole server (``pg_stat_io``, PostgreSQL
    16+; -1 before), the durable-commit cost itself.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self._own = 0

    def own(self, commits: int) -> None:
        self._own += commits

    def read(self, timeout: float = 15.0) -> tuple[int, int]:
        """(commits of the database, WAL fsyncs of the server) now."""
        deadline = time.monotonic() + timeout
        with psycopg.connect(libpq(self.url), autocommit=True) as conn:
            queries = 0
            while True:
                row = conn.execute(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                ).fetchone()
                queries += 1
                if (row is not None and row[0] == 0) or time.monotonic() > deadline:
                    break
                time.sleep(0.05)  # backends of a finished client still exiting
            row = conn.execute(
                "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
            ).fetchone()
            queries += 1
            fsyncs = -1
            with contextlib.suppress(psycopg.Error):
                wal = conn.execute(
                    "SELECT sum(fsyncs) FROM pg_stat_io WHERE object = 'wal'"
                ).fetchone()
                queries += 1
                fsyncs = int(wal[0]) if wal and wal[0] is not None else -1
        value = (int(row[0]) if row else 0) - self._own
        self._own += queries
        return value, fsyncs


# --------------------------------------------------------------------------- the turn rule


def turn_payload(obj: Any) -> dict[str, Any] | None:
    """INTERFACE.md's rule and payload, independent of the package (naive/floor ingests)."""
    if not isinstance(obj, dict):
        return None
    kind = obj.get("type")
    if kind not in ("user", "assistant"):
        return None
    message = obj.get("message")
    if not isinstance(message, dict):
        return None
    content = message.get("content")
    if isinstance(content, str):
        if not content.strip():
            return None
        text = content
    elif isinstance(content, list):
        texts = [
            b["text"]
            for b in content
            if isinstance(b, dict) and b.get("type") == "text" and isinstance(b.get("text"), str)
        ]
        if not any(t.strip() for t in texts):
            return None
        text = "\n".join(texts)
    else:
        return None
    payload: dict[str, Any] = {
        "session_uuid": obj.get("sessionId"),
        "actor": "user" if kind == "user" else "agent",
        "text": text,
        "source": "polling",
        "turn_timestamp": obj.get("timestamp"),
    }
    for key, src in (
        ("message_uuid", obj.get("uuid")),
        ("parent_uuid", obj.get("parentUuid")),
        ("message_id", message.get("id")),
        ("model", message.get("model")),
        ("is_sidechain", obj.get("isSidechain")),
        ("is_meta", obj.get("isMeta")),
        ("subagent_id", obj.get("agentId")),
        ("cwd", obj.get("cwd")),
        ("git_branch", obj.get("gitBranch")),
        ("claude_version", obj.get("version")),
    ):
        if src is not None:
            payload[key] = src
    usage = message.get("usage")
    if isinstance(usage, dict):
        payload["usage"] = {
            k: usage[k]
            for k in (
                "input_tokens",
                "output_tokens",
                "cache_creation_input_tokens",
                "cache_read_input_tokens",
            )
            if isinstance(usage.get(k), int)
        }
    return payload


def transcript_files(root: Path) -> list[Path]:
    return sorted(root.glob("*/*.jsonl")) + sorted(root.glob("*/*/subagents/*.jsonl"))


# --------------------------------------------------------------------------- the service


def watcher_bin() -> str:
    candidate = Path(sys.executable).parent / "headspace-watcher"
    return str(candidate) if candidate.exists() else (shutil.which("headspace-watcher") or "")


def service_env(url: str, projects: Path, state_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        HEADSPACE_DATABASE_URL=url,
        HEADSPACE_PROJECTS_PATH=str(projects),
        HEADSPACE_STATE_DIR=str(state_dir),
    )
    return env


def start_service(
    url: str, projects: Path, state_dir: Path, log_path: Path, *args: str
) -> subprocess.Popen[bytes]:
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [watcher_bin(), "run", *args],
            env=service_env(url, projects, state_dir),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )


@contextlib.contextmanager
def running_service(url: str, projects: Path, base: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``headspace-watcher run`` (state and ``watcher.log`` in ``base``); SIGTERM after."""
    proc = start_service(url, projects, base / "state", base / "watcher.log")
    try:
        yield proc
    finally:
        code = stop_service(proc)
        print(f"watcher stopped with SIGTERM: exit {code}")


def stop_service(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> int | None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def log_tail(path: Path, limit: int = 3000) -> str:
    with contextlib.suppress(OSError):
        return path.read_bytes()[-limit:].decode("utf-8", "replace")
    return ""


def committed_lines(conn: psycopg.Connection[Any]) -> int:
    with contextlib.suppress(psycopg.errors.UndefinedTable):
        row = conn.execute("SELECT coalesce(sum(lines_committed), 0) FROM sources").fetchone()
        return int(row[0]) if row else 0
    return 0


def wait_caught_up(
    url: str, expected_lines: int, proc: subprocess.Popen[bytes], timeout: float
) -> float:
    """Poll (every 0.2 s) until the sources' committed lines reach ``expected_lines``."""
    t0 = time.monotonic()
    with psycopg.connect(libpq(url), autocommit=True) as conn:
        while True:
            if committed_lines(conn) >= expected_lines:
                return time.monotonic() - t0
            if proc.poll() is not None:
                raise RuntimeError(f"watcher exited with {proc.returncode}")
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"not caught up after {timeout:.0f} s")
            time.sleep(0.2)


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS/VmHWM (kB) and context switches from /proc/<pid>/status; open fds as "fds"."""
    out: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "voluntary_ctxt_switches", "nonvoluntary_ctxt_switches"):
                out[key] = int(value.split()[0])
    with contextlib.suppress(OSError):
        out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    return out


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` from /proc/<pid>/stat, in seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of stat(5)
