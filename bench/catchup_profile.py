"""Where a many-small-files catch-up spends its time and memory, per file (issue 12).

Opt-in (``python -m bench --only catchup_profile``): a diagnosis, not a benchmark with bars.
Everything runs in this process against the same throwaway PostgreSQL (fsync on):

1. **plain**: ``Service.run(once=True)`` over a tree of ``--files`` sessions of ``--lines``
   lines (default 3,000 x 30, ended days ago): the reference wall time, no instrumentation.
2. **timed**: the same catch-up into a fresh database with the service's steps wrapped in
   exclusive timers (a function's time minus that of the wrapped functions it calls), SQL
   statements and commits counted per step (psycopg ``Cursor.execute``/``executemany``/
   ``copy`` and ``Connection.commit``). Printed per file: microseconds, statements, commits.
3. **cProfile** (``--cprofile N``, default 25; 0 = skip): the top functions by own time.
4. **memory**: ``tracemalloc`` snapshots of a caught-up service object (after ``run --once``
   returned, still referenced, as a running service would hold it) with ``--memory-files``
   (default 100 and 10,000) tracked files; the difference, divided by the difference in file
   count, is the bytes each extra tracked file costs, by allocation site (the innermost
   ``headspace_watcher`` frame of each allocation), plus the package's objects per file.

Run: ``.venv/bin/python -m bench.catchup_profile [--files 3000] [--lines 30] [--quick]``.
Uses ``HEADSPACE_BENCH_DATABASE_URL`` when set (like the other benchmarks).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import functools
import gc
import io
import linecache
import logging
import os
import pstats
import sys
import time
import tracemalloc
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

import headspace_watcher
from bench._common import CommitCounter, generate_shaped_tree, header, server, workdir
from bench.catchup import db_counts, fresh_schema
from headspace_watcher.cli import _JsonishFormatter
from headspace_watcher.config import load_config
from headspace_watcher.ingest import derive as derive_mod
from headspace_watcher.ingest.derive import Deriving
from headspace_watcher.ingest.sessions import SessionTracker
from headspace_watcher.service.loop import Service
from headspace_watcher.sources import transcripts as transcripts_mod
from headspace_watcher.sources.transcripts import TranscriptSource
from headspace_watcher.sources.tree import TreeWatcher
from headspace_watcher.store import checkpoints as checkpoints_mod
from headspace_watcher.store import rows as rows_mod
from headspace_watcher.store import sessions as sessions_mod
from headspace_watcher.store.checkpoints import CheckpointStore
from headspace_watcher.store.references import References
from headspace_watcher.store.writer import BatchWriter

PACKAGE_DIR = str(Path(headspace_watcher.__file__).resolve().parent)

# (label, owner, attribute): each wrapped callable is one step of the timed run. Module
# functions are wrapped where their callers look them up (a module attribute at call time).
STEPS: tuple[tuple[str, Any, str], ...] = (
    ("other: Service.run (loop, start-up and close rest)", Service, "run"),
    ("discovery: TreeWatcher.start (walk, inotify watches)", TreeWatcher, "start"),
    ("start-up: Service._connect (schema, lock, load state)", Service, "_connect"),
    ("batch loop: Service._step (rest)", Service, "_step"),
    ("source reg.: TranscriptSource._register_new (rest)", TranscriptSource, "_register_new"),
    ("source reg.: CheckpointStore.register_many (bulk)", CheckpointStore, "register_many"),
    ("source reg.: CheckpointStore.register (per file)", CheckpointStore, "register"),
    ("source reg.: TranscriptSource._reconcile", TranscriptSource, "_reconcile"),
    ("tracking: TranscriptSource._track (rest: TrackedFile)", TranscriptSource, "_track"),
    ("stat: reader.identity", transcripts_mod, "identity"),
    ("file context: layout.file_context", transcripts_mod, "file_context"),
    ("reading: reader.read_lines", transcripts_mod, "read_lines"),
    ("parsing: transcript.parse_line", derive_mod, "parse_line"),
    ("sessions: SessionTracker.observe", SessionTracker, "observe"),
    ("event building: Deriving._lines (rest)", Deriving, "_lines"),
    ("writer: BatchWriter.write_batch (rest)", BatchWriter, "write_batch"),
    ("ref. upserts: References.resolve", References, "resolve"),
    ("guard: checkpoints.check_guard (FOR UPDATE)", checkpoints_mod, "check_guard"),
    ("session reg.: sessions.apply_changes", sessions_mod, "apply_changes"),
    ("events: rows.copy_events (validate+COPY)", rows_mod, "copy_events"),
    ("rejections: rows.insert_rejections", rows_mod, "insert_rejections"),
    ("checkpoints: checkpoints.advance (UPDATE)", checkpoints_mod, "advance"),
    ("commit: psycopg Connection.commit (WAL fsync)", psycopg.Connection, "commit"),
    ("post-commit: Service._committed", Service, "_committed"),
    ("session ends: Service._end_due_sessions (rest)", Service, "_end_due_sessions"),
    ("status: Service._write_status", Service, "_write_status"),
)
SQL_CALLS: tuple[tuple[Any, str], ...] = (
    (psycopg.Cursor, "execute"),
    (psycopg.Cursor, "executemany"),
    (psycopg.Cursor, "copy"),
)


@dataclass
class StepFigures:
    seconds: float = 0.0
    calls: int = 0
    statements: int = 0
    commits: int = 0


@dataclass
class StepTimer:
    """Exclusive time per step: a frame's time less that of the wrapped frames below it."""

    figures: dict[str, StepFigures] = field(default_factory=dict)
    stack: list[list[Any]] = field(default_factory=list)  # [label, child seconds]

    def wrap(self, label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        fig = self.figures.setdefault(label, StepFigures())
        commit = label.startswith("commit:")

        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            frame = [label, 0.0]
            self.stack.append(frame)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - t0
                self.stack.pop()
                fig.seconds += elapsed - frame[1]
                fig.calls += 1
                if self.stack:
                    self.stack[-1][1] += elapsed
                if commit:
                    self.caller().commits += 1

        return timed

    def caller(self) -> StepFigures:
        """The innermost running step (the one a statement or commit is charged to)."""
        label = self.stack[-1][0] if self.stack else "outside any step"
        return self.figures.setdefault(label, StepFigures())

    def count(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def counted(*args: Any, **kwargs: Any) -> Any:
            self.caller().statements += 1
            return fn(*args, **kwargs)

        return counted


@contextlib.contextmanager
def instrumented(timer: StepTimer) -> Iterator[None]:
    """STEPS and SQL_CALLS wrapped for the duration (restored after)."""
    saved: list[tuple[Any, str, Any]] = []
    try:
        for label, owner, name in STEPS:
            original = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
            saved.append((owner, name, original))
            setattr(owner, name, timer.wrap(label, original))
        for owner, name in SQL_CALLS:
            original = owner.__dict__[name]
            saved.append((owner, name, original))
            setattr(owner, name, timer.count(original))
        yield
    finally:
        for owner, name, original in reversed(saved):
            setattr(owner, name, original)


# --------------------------------------------------------------------------- one catch-up


def _logging_to(path: Path) -> None:
    """The CLI's log format, into a file (the per-session log lines are part of the cost)."""
    handler = logging.FileHandler(path)
    handler.setFormatter(_JsonishFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)


def catch_up(url: str, projects: Path, state: Path) -> tuple[Service, float, int]:
    """An in-process ``run --once``: (the service object, seconds, exit code)."""
    env = dict(
        os.environ,
        HEADSPACE_DATABASE_URL=url,
        HEADSPACE_PROJECTS_PATH=str(projects),
        HEADSPACE_STATE_DIR=str(state),
    )
    config = load_config(env=env)
    svc = Service(config)
    t0 = time.perf_counter()
    code = svc.run(once=True)
    return svc, time.perf_counter() - t0, code


def _check(url: str, lines: int, label: str) -> None:
    counts = db_counts(url)
    if counts["lines"] != lines or counts["rejected"]:
        raise SystemExit(f"{label}: committed {counts}, expected {lines} lines, 0 rejected")


# --------------------------------------------------------------------------- report


def print_steps(timer: StepTimer, files: int, wall: float, commits_db: int, fsyncs: int) -> None:
    rows = sorted(timer.figures.items(), key=lambda kv: -kv[1].seconds)
    total = sum(f.seconds for _l, f in rows)
    print(
        f"\n{'step (exclusive time)':<52} {'total':>8} {'us/file':>8} {'share':>6} "
        f"{'calls':>8} {'stmts/file':>10} {'commits/file':>12}"
    )
    for label, f in rows:
        print(
            f"{label:<52} {f.seconds:>6.2f} s {f.seconds / files * 1e6:>8,.0f} "
            f"{f.seconds / total:>6.1%} {f.calls:>8,} {f.statements / files:>10.3f} "
            f"{f.commits / files:>12.3f}"
        )
    statements = sum(f.statements for _l, f in rows)
    commits = sum(f.commits for _l, f in rows)
    print(
        f"{'total':<52} {total:>6.2f} s {total / files * 1e6:>8,.0f} {1:>6.0%} {'':>8} "
        f"{statements / files:>10.3f} {commits / files:>12.3f}"
    )
    print(
        f"timed run: {wall:.2f} s wall for {files:,} files; {statements:,} SQL statements "
        f"({statements / files:.2f}/file), {commits:,} commits by psycopg "
        f"({commits / files:.3f}/file); pg_stat: {commits_db:,} xact_commit (with the autocommit "
        f"pre-pings), {fsyncs:,} WAL fsyncs"
    )
    print(
        "commits/stmts of a step: issued while it was the innermost running step; the commit "
        "itself is timed as its own step",
        flush=True,
    )


def print_cprofile(prof: cProfile.Profile, top: int, files: int) -> None:
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out)
    stats.sort_stats("tottime").print_stats(top)
    print(f"\ncProfile, top {top} by own time (per file: divide by {files:,}):")
    lines = out.getvalue().splitlines()
    start = next((i for i, line in enumerate(lines) if "ncalls" in line), 0)
    for line in lines[start:]:
        if line.strip():
            print("  " + line.replace(PACKAGE_DIR + "/", "hw/").replace(sys.prefix, "<venv>"))


# --------------------------------------------------------------------------- memory


def _site(tb: tracemalloc.Traceback) -> str:
    """The innermost frame in the package (else the innermost frame): ``file:line  code``."""
    frames = list(tb)  # oldest first
    chosen = next((f for f in reversed(frames) if f.filename.startswith(PACKAGE_DIR)), None)
    if chosen is None:
        inner = frames[-1]
        return f"(outside the package) {Path(inner.filename).name}:{inner.lineno}"
    code = linecache.getline(chosen.filename, chosen.lineno).strip()
    rel = os.path.relpath(chosen.filename, PACKAGE_DIR)
    return f"{rel}:{chosen.lineno}  {code[:60]}"


def by_site(snapshot: tracemalloc.Snapshot) -> Counter[str]:
    sizes: Counter[str] = Counter()
    for stat in snapshot.statistics("traceback"):
        sizes[_site(stat.traceback)] += stat.size
    return sizes


def package_objects() -> Counter[str]:
    """Live instances (gc-tracked) of the package's classes, by class."""
    gc.collect()
    return Counter(
        type(o).__qualname__
        for o in gc.get_objects()
        if str(getattr(type(o), "__module__", "")).startswith("headspace_watcher")
    )


@dataclass
class MemoryPoint:
    files: int
    traced: int
    sites: Counter[str]
    objects: Counter[str]
    seconds: float


def memory_point(srv: Any, base: Path, files: int, lines: int, seed: int) -> MemoryPoint:
    root = base / f"mem-{files}"
    stats = generate_shaped_tree(root / "projects", files, lines, seed + files)
    url = fresh_schema(srv, "profile_memory")
    try:
        svc, seconds, code = catch_up(url, root / "projects", root / "state")
        if code != 0:
            raise SystemExit(f"memory run with {files} files exited with {code}")
        _check(url, stats.lines, f"memory {files}")
        gc.collect()
        if not tracemalloc.is_tracing():  # the warm-up run
            return MemoryPoint(files, 0, Counter(), Counter(), seconds)
        snapshot = tracemalloc.take_snapshot().filter_traces(
            (tracemalloc.Filter(False, tracemalloc.__file__),)
        )
        point = MemoryPoint(
            files,
            sum(s.size for s in snapshot.statistics("filename")),
            by_site(snapshot),
            package_objects(),
            seconds,
        )
        del svc
    finally:
        srv.drop(url)
    gc.collect()
    return point


def print_memory(small: MemoryPoint, big: MemoryPoint, top: int) -> None:
    extra = big.files - small.files
    print(
        f"\ntracemalloc: traced heap with the caught-up service object alive: "
        f"{small.files:,} files {small.traced / 1e6:.1f} MB ({small.seconds:.1f} s traced run), "
        f"{big.files:,} files {big.traced / 1e6:.1f} MB ({big.seconds:.1f} s); "
        f"{(big.traced - small.traced) / extra:,.0f} B per extra tracked file"
    )
    diff = Counter({k: big.sites[k] - small.sites.get(k, 0) for k in big.sites})
    print(f"\n{'B/file':>8} {'share':>6}  allocation site (innermost headspace_watcher frame)")
    grown = sum(v for v in diff.values() if v > 0)
    for site, size in diff.most_common(top):
        if size <= 0:
            break
        print(f"{size / extra:>8,.0f} {size / max(1, grown):>6.1%}  {site}")
    print(f"\n{'objects/file':>12}  package class (live, gc-tracked)")
    objects = Counter({k: big.objects[k] - small.objects.get(k, 0) for k in big.objects})
    for name, count in objects.most_common(12):
        if count <= 0:
            break
        print(f"{count / extra:>12.2f}  {name}")
    print(flush=True)


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.catchup_profile", description=__doc__)
    parser.add_argument("--files", type=int, default=3000, help="sessions in the tree")
    parser.add_argument("--lines", type=int, default=30, help="lines per session")
    parser.add_argument("--cprofile", type=int, default=25, metavar="N", help="0 = skip")
    parser.add_argument(
        "--memory-files", type=int, nargs=2, default=[100, 10000], metavar=("FEW", "MANY")
    )
    parser.add_argument("--memory-lines", type=int, default=4)
    parser.add_argument("--frames", type=int, default=16, help="tracemalloc frames kept")
    parser.add_argument("--seed", type=int, default=20250604)
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    args = parser.parse_args(argv)
    if args.quick:
        args.files, args.lines, args.memory_files = 60, 10, [10, 60]

    with workdir("profile") as base, server() as srv:
        probe = fresh_schema(srv, "profile_probe")
        header("catchup_profile", probe, srv)
        srv.drop(probe)
        _logging_to(base / "watcher.log")
        tree = base / "projects"
        stats = generate_shaped_tree(tree, args.files, args.lines, args.seed)
        print(f"data:     {stats.describe()}", flush=True)
        files = stats.files

        url = fresh_schema(srv, "profile_plain")
        _svc, plain_s, _code = catch_up(url, tree, base / "state-plain")
        _check(url, stats.lines, "plain")
        srv.drop(url)
        print(
            f"\nplain in-process run --once: {plain_s:.2f} s = {plain_s / files * 1e3:.2f} ms "
            f"per file ({stats.lines / plain_s:,.0f} lines/s)",
            flush=True,
        )

        url = fresh_schema(srv, "profile_timed")
        timer = StepTimer()
        commits = CommitCounter(url)
        c0 = commits.read()
        with instrumented(timer):
            svc, timed_s, _code = catch_up(url, tree, base / "state-timed")
        svc.store.close()  # its connections closed: their commits counted in c1
        c1 = commits.read()
        _check(url, stats.lines, "timed")
        srv.drop(url)
        print_steps(timer, files, timed_s, c1[0] - c0[0], c1[1] - c0[1])

        if args.cprofile:
            url = fresh_schema(srv, "profile_cprofile")
            prof = cProfile.Profile()
            prof.enable()
            catch_up(url, tree, base / "state-cprofile")
            prof.disable()
            _check(url, stats.lines, "cprofile")
            srv.drop(url)
            print_cprofile(prof, args.cprofile, files)

        few, many = args.memory_files
        memory_point(srv, base, 20, 2, args.seed)  # warm-up: imports and caches untraced
        tracemalloc.start(args.frames)
        try:
            small = memory_point(srv, base, few, args.memory_lines, args.seed)
            big = memory_point(srv, base, many, args.memory_lines, args.seed)
        finally:
            tracemalloc.stop()
        print_memory(small, big, 20)
    return 0


if __name__ == "__main__":
    sys.exit(main())
