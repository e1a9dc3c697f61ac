"""Catch-up throughput: ``headspace-watcher run --once`` over large transcript trees.

Three parts (``--parts``, all by default), one PostgreSQL:

**floor** (the bars). A tree of realistic Claude Code transcripts (``--mb``, default 100 MB:
many projects, sessions and sub-agents of both layouts, half the lines turns, a few ~100 KB
lines) is ingested, each time into a fresh database with the schema in place, by:

* **watcher**: ``headspace-watcher run --once`` as a real subprocess (HEADSPACE_DATABASE_URL,
  HEADSPACE_PROJECTS_PATH, HEADSPACE_STATE_DIR set), interpreter start-up included;
* **naive**: read each line, ``json.loads``, the turn rule, one ``INSERT`` + ``COMMIT`` per
  turn into the same ``events`` table (psycopg directly, project/agent ids upserted on first
  sight);
* **floor**: ``json.loads`` of every line and the turn rule, then ONE ``COPY`` of the turn
  rows, in one transaction; also a stricter **streamed floor** that sends each row to the
  COPY as soon as its line is parsed (the server works while Python parses).

Then: watcher/naive speed ratio (bar >= 4x) and watcher/floor time ratio (bar <= 2x; the
ratio to the streamed floor is printed too). The watcher's result is verified: turn events =
turns generated, committed lines = lines written, no rejection, and a second ``run --once``
stores nothing. Every run starts after ``CHECKPOINT`` and ``sync`` (no writeback of earlier
runs' dirty pages competing with it).

**shapes** (figures, issue 12). The same number of lines (so ~the same bytes) as few big
files (``--big``, default 60 x 1,500 lines) and as many small ones (``--small``, 3,000 x 30),
all sessions ended days ago; for each, ``run --once`` (subprocess): wall time, MB/s, CPU
user+sys, peak RSS (VmHWM), commits (``pg_stat_database.xact_commit`` delta) and WAL fsyncs
(``pg_stat_io``), then a no-op second run; and the many-small / few-big ratios. Verified like
the watcher above.

**memory** (figures, issue 12). The live service (``headspace-watcher run``, subprocess) over
N small ended sessions (``--memory-files``, default 100 / 1,000 / 10,000, ``--memory-lines``
4 lines each): once every line is committed and every ``session_ended`` stored, and
``--settle`` seconds of idle, its VmRSS (idle RSS) and VmHWM (peak); then the peak RSS of a
``run --once`` restart over the same caught-up tree (nothing new to read).

Speed and memory figures are printed, never asserted, except the floor part's bars.

Run: ``.venv/bin/python -m bench.catchup [--parts floor shapes memory] [--mb 100]
[--big 60x1500] [--small 3000x30] [--memory-files 100 1000 10000] [--quick]``. Starts its own
throwaway PostgreSQL (fsync on) unless ``HEADSPACE_BENCH_DATABASE_URL`` is set.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from bench._common import (
    CommitCounter,
    TreeStats,
    generate_shaped_tree,
    generate_tree,
    header,
    libpq,
    log_tail,
    proc_status,
    server,
    service_env,
    start_service,
    stop_service,
    transcript_files,
    turn_payload,
    verdict,
    wait_caught_up,
    watcher_bin,
)
from bench._common import checkpoint as pg_checkpoint
from headspace_watcher.store.engine import make_engine
from headspace_watcher.store.migrate import init_db

COLUMNS = "timestamp, event_type, payload, project_id, agent_id"
INSERT_SQL = (
    f"INSERT INTO events ({COLUMNS}) VALUES (%s::timestamptz, 'turn_detected', %s::jsonb, %s, %s)"
)
COPY_SQL = f"COPY events ({COLUMNS}) FROM STDIN"


def _dumps(payload: dict[str, Any]) -> str:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"))


class RefIds:
    """project/agent ids, upserted on first sight on ``conn`` (committed at once)."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.conn = conn
        self.projects: dict[str, int] = {}
        self.agents: dict[str, int] = {}

    def project(self, path: str | None) -> int | None:
        if not path:
            return None
        pid = self.projects.get(path)
        if pid is None:
            self.conn.execute(
                "INSERT INTO projects (path, name) VALUES (%s, %s) ON CONFLICT DO NOTHING",
                (path, path.rstrip("/").rsplit("/", 1)[-1] or path),
            )
            row = self.conn.execute("SELECT id FROM projects WHERE path = %s", (path,)).fetchone()
            self.conn.commit()
            assert row is not None
            pid = self.projects[path] = row[0]
        return pid

    def agent(self, session: str | None, project_id: int | None) -> int | None:
        if not session:
            return None
        aid = self.agents.get(session)
        if aid is None:
            self.conn.execute(
                "INSERT INTO agents (session_uuid, project_id) VALUES (%s, %s) "
                "ON CONFLICT DO NOTHING",
                (session, project_id),
            )
            row = self.conn.execute(
                "SELECT id FROM agents WHERE session_uuid = %s", (session,)
            ).fetchone()
            self.conn.commit()
            assert row is not None
            aid = self.agents[session] = row[0]
        return aid


def turn_rows(files: list[Path], refs: RefIds) -> Iterator[tuple[str, str, int | None, int | None]]:
    """(turn_timestamp, payload JSON, project id, agent id) of every turn, in file order."""
    for path in files:
        with open(path, "rb") as f:
            for line in f:
                payload = turn_payload(json.loads(line))
                if payload is None:
                    continue
                pid = refs.project(payload.get("cwd"))
                aid = refs.agent(payload["session_uuid"], pid)
                yield payload["turn_timestamp"], _dumps(payload), pid, aid


def run_naive(url: str, files: list[Path]) -> tuple[float, int]:
    """One INSERT + COMMIT per turn. Returns (seconds, turns stored)."""
    turns = 0
    with psycopg.connect(libpq(url)) as conn, psycopg.connect(libpq(url)) as ref_conn:
        refs = RefIds(ref_conn)
        t0 = time.perf_counter()
        for row in turn_rows(files, refs):
            conn.execute(INSERT_SQL, row)
            conn.commit()
            turns += 1
        return time.perf_counter() - t0, turns


def run_floor(url: str, files: list[Path], *, streamed: bool) -> tuple[float, int]:
    """json.loads of every line + ONE COPY of the turn rows, in one transaction.

    ``streamed=False``: parse everything, then COPY the rows (the literal "parse + COPY").
    ``streamed=True``: each row is sent as soon as its line is parsed, so the server works
    while Python parses: a stricter floor on a machine with a core to spare.
    """
    with psycopg.connect(libpq(url)) as conn, psycopg.connect(libpq(url)) as ref_conn:
        refs = RefIds(ref_conn)
        t0 = time.perf_counter()
        rows = (
            (ts, "turn_detected", doc, pid, aid) for ts, doc, pid, aid in turn_rows(files, refs)
        )
        source = rows if streamed else list(rows)
        turns = 0
        with conn.cursor() as cur, cur.copy(COPY_SQL) as copy:
            for row in source:
                copy.write_row(row)
                turns += 1
        conn.commit()
        return time.perf_counter() - t0, turns


def run_watcher(url: str, tree: Path, state: Path, log: Path) -> tuple[float, Any, int, int]:
    """``headspace-watcher run --once`` as a subprocess: (seconds, rusage, exit, peak RSS kB).

    The peak is VmHWM sampled every 20 ms once the child runs the watcher (the child's own
    ru_maxrss would count the pages it shared with this process between fork and exec).
    """
    env = service_env(url, tree, state)
    peak = [0]
    with open(log, "ab") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            [watcher_bin(), "run", "--once"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
        )
        done = threading.Event()
        sampler = threading.Thread(target=_sample_hwm, args=(proc.pid, done, peak), daemon=True)
        sampler.start()
        _pid, status, rusage = os.wait4(proc.pid, 0)
        elapsed = time.perf_counter() - t0
        done.set()
        sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    return elapsed, rusage, proc.returncode, peak[0]


def _sample_hwm(pid: int, done: threading.Event, peak: list[int]) -> None:
    while not done.wait(0.02):
        try:
            if b"headspace-watcher" not in Path(f"/proc/{pid}/cmdline").read_bytes():
                continue  # not exec'd yet
        except OSError:
            return
        peak[0] = max(peak[0], proc_status(pid).get("VmHWM", 0))


def db_counts(url: str) -> dict[str, int]:
    with psycopg.connect(libpq(url)) as conn:
        row = conn.execute(
            "SELECT count(*) FILTER (WHERE event_type = 'turn_detected'), "
            "count(*) FILTER (WHERE event_type = 'session_registered'), "
            "count(*) FILTER (WHERE event_type = 'session_ended'), count(*) FROM events"
        ).fetchone()
        lines = conn.execute("SELECT coalesce(sum(lines_committed), 0) FROM sources").fetchone()
        rejected = conn.execute("SELECT count(*) FROM rejected_events").fetchone()
    assert row is not None and lines is not None and rejected is not None
    return {
        "turns": int(row[0]),
        "registered": int(row[1]),
        "ended": int(row[2]),
        "events": int(row[3]),
        "lines": int(lines[0]),
        "rejected": int(rejected[0]),
    }


def fresh_schema(srv: Any, prefix: str) -> str:
    url = srv.fresh(prefix)
    engine = make_engine(url)
    try:
        init_db(engine)
    finally:
        engine.dispose()
    pg_checkpoint(url)
    os.sync()  # no writeback of earlier runs' (or the generator's) dirty pages mid-run
    return url


PARTS = ("floor", "shapes", "memory")


def _shape(text: str) -> tuple[int, int]:
    """``FILESxLINES`` (e.g. ``60x1500``) as (files, lines per file)."""
    try:
        files, lines = (int(x.replace(",", "").replace("_", "")) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected FILESxLINES (60x1500): {text!r}") from None
    if files < 1 or lines < 1:
        raise argparse.ArgumentTypeError("FILESxLINES: both must be >= 1")
    return files, lines


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.catchup", description=__doc__)
    parser.add_argument(
        "--parts", nargs="+", choices=PARTS, default=list(PARTS), help="what to run (all)"
    )
    parser.add_argument("--mb", type=float, default=100.0, help="floor: size of the tree")
    parser.add_argument("--seed", type=int, default=20250601)
    parser.add_argument(
        "--repeat", type=int, default=1, help="floor: alternating watcher/floor runs (best kept)"
    )
    parser.add_argument("--skip-naive", action="store_true", help="floor: no naive ingest (slow)")
    parser.add_argument(
        "--big", type=_shape, default=(60, 1500), metavar="FxL", help="shapes: few big files"
    )
    parser.add_argument(
        "--small", type=_shape, default=(3000, 30), metavar="FxL", help="shapes: many small"
    )
    parser.add_argument(
        "--memory-files",
        type=int,
        nargs="+",
        default=[100, 1000, 10000],
        metavar="N",
        help="memory: tracked-file counts of the live service",
    )
    parser.add_argument(
        "--memory-lines", type=int, default=4, help="memory: lines per (small) session"
    )
    parser.add_argument(
        "--settle", type=float, default=3.0, help="memory: idle seconds before reading the RSS"
    )
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary trees")
    args = parser.parse_args(argv)
    if args.quick:
        args.mb = min(args.mb, 5.0)
        args.big, args.small = (4, 300), (40, 30)
        args.memory_files, args.settle = [10, 50, 200], min(args.settle, 1.0)
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    base = Path(tempfile.mkdtemp(prefix="headspace-bench-catchup-", dir="/tmp"))
    try:
        with server() as srv:
            url = fresh_schema(srv, "catchup_probe")
            header("catchup", url, srv)
            srv.drop(url)
            print(f"watcher:  {watcher_bin()} run --once, config {_config_desc()}", flush=True)
            code = 0
            problems: list[str] = []
            if "floor" in args.parts:
                code = _floor_part(args, srv, base)
            if "shapes" in args.parts:
                problems += _shapes_part(args, srv, base)
            if "memory" in args.parts:
                problems += _memory_part(args, srv, base)
            for problem in problems:
                print(f"PROBLEM: {problem}")
            return 1 if problems else code
    finally:
        if args.keep:
            print(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)


def _floor_part(args: argparse.Namespace, srv: Any, base: Path) -> int:
    """The watcher against the naive and floor ingests, on one realistic tree (the bars)."""
    print(f"\n{' watcher vs naive vs floor (realistic tree) ':=^100}")
    tree = base / "projects"
    t0 = time.perf_counter()
    stats = generate_tree(tree, args.mb, args.seed)
    gen_s = time.perf_counter() - t0
    files = transcript_files(tree)
    assert len(files) == stats.files, (len(files), stats.files)
    print(f"data:     {stats.describe()}")
    print(f"          generated in {gen_s:.1f} s under {tree} (seed {args.seed})\n", flush=True)
    try:
        return _compare(args, srv, stats, files, base)
    finally:
        shutil.rmtree(tree, ignore_errors=True)


def _config_desc() -> str:
    from headspace_watcher.config import load_config

    fw = load_config().file_watcher
    return (
        f"batch_max_lines={fw.batch_max_lines} batch_max_bytes={fw.batch_max_bytes} "
        f"read_chunk_bytes={fw.read_chunk_bytes}"
    )


def _row(label: str, seconds: float, stats: Any, turns: int) -> None:
    print(
        f"{label:<40} {seconds:8.2f} s  {stats.lines / seconds:>9,.0f} lines/s  "
        f"{stats.bytes / 1e6 / seconds:7.2f} MB/s  {turns / seconds:>9,.0f} turns/s",
        flush=True,
    )


def _compare(args: argparse.Namespace, srv: Any, stats: Any, files: list[Path], base: Path) -> int:
    problems: list[str] = []
    watcher_times: list[float] = []
    floor_times: list[float] = []
    streamed_times: list[float] = []
    log = base / "watcher.log"
    last: dict[str, Any] = {}
    for r in range(1, args.repeat + 1):
        url = fresh_schema(srv, "catchup_watcher")
        state = base / f"state-{r}"
        seconds, rusage, code, peak_kb = run_watcher(url, base / "projects", state, log)
        if code != 0:
            print(f"watcher exited with {code}; log tail:\n{log_tail(log)}")
            return 1
        counts = db_counts(url)
        _row(f"watcher: run --once #{r}", seconds, stats, counts["turns"])
        watcher_times.append(seconds)
        if counts["turns"] != stats.turns:
            problems.append(f"watcher stored {counts['turns']} turns, expected {stats.turns}")
        if counts["lines"] != stats.lines:
            problems.append(f"watcher committed {counts['lines']} lines, expected {stats.lines}")
        if counts["rejected"]:
            problems.append(f"watcher rejected {counts['rejected']} lines, expected 0")
        if r == args.repeat:
            again_s, _ru, code2, _peak = run_watcher(url, base / "projects", state, log)
            after = db_counts(url)
            last = {
                "counts": counts,
                "rusage": rusage,
                "again_s": again_s,
                "after": after,
                "peak_kb": peak_kb,
            }
            if code2 != 0 or after != counts:
                problems.append(f"second run --once changed the database: {counts} -> {after}")
        srv.drop(url)

        for streamed, times in ((False, floor_times), (True, streamed_times)):
            url = fresh_schema(srv, "catchup_floor")
            seconds, turns = run_floor(url, files, streamed=streamed)
            label = (
                "streamed floor: COPY while parsing" if streamed else "floor: parse all, one COPY"
            )
            _row(f"{label} #{r}", seconds, stats, turns)
            times.append(seconds)
            if turns != stats.turns:
                problems.append(f"floor stored {turns} turns, expected {stats.turns}")
            srv.drop(url)

    naive_s = None
    if not args.skip_naive:
        url = fresh_schema(srv, "catchup_naive")
        naive_s, turns = run_naive(url, files)
        _row("naive: INSERT + COMMIT per turn", naive_s, stats, turns)
        if turns != stats.turns:
            problems.append(f"naive stored {turns} turns, expected {stats.turns}")
        srv.drop(url)

    watcher_s, floor_s = min(watcher_times), min(floor_times)
    counts, ru = last["counts"], last["rusage"]
    print()
    print(
        f"watcher: {counts['turns']:,} turn_detected (expected {stats.turns:,}), "
        f"{counts['registered']} session_registered, {counts['ended']} session_ended, "
        f"{counts['lines']:,} lines committed (expected {stats.lines:,}), "
        f"{counts['rejected']} rejected"
    )
    print(
        f"         process CPU {ru.ru_utime:.1f} s user + {ru.ru_stime:.1f} s sys "
        f"({(ru.ru_utime + ru.ru_stime) / watcher_times[-1]:.0%} of one core), "
        f"peak RSS (VmHWM) {last['peak_kb'] / 1024:.1f} MB; second run --once: "
        f"{last['again_s']:.2f} s, stored nothing new: {last['after'] == counts}"
    )
    ok = not problems
    if naive_s is not None:
        speedup = naive_s / watcher_s
        print(
            f"watcher / naive speed = {speedup:6.2f}x   (bar: >= 4x)      {verdict(speedup >= 4)}"
        )
        ok = ok and speedup >= 4
    ratio = watcher_s / floor_s
    print(f"watcher / floor time  = {ratio:6.2f}x   (bar: <= 2x)      {verdict(ratio <= 2)}")
    strict = watcher_s / min(streamed_times)
    print(f"watcher / streamed floor time = {strict:5.2f}x   (stricter floor, information)")
    ok = ok and ratio <= 2
    for problem in problems:
        print(f"PROBLEM: {problem}")
    if args.quick:  # ~0.6 s of interpreter start-up dominates a few MB: ratios mean little
        print("bar: not assessed at --quick size (start-up dominates); correctness", end=" ")
        print(verdict(not problems))
        return 0 if not problems else 1
    print("bar:", verdict(ok))
    return 0 if ok else 1


# --------------------------------------------------------------------------- tree shapes


@dataclass
class ShapeRun:
    """One shape's ``run --once``: its tree, time, CPU, peak RSS and commits."""

    label: str
    stats: TreeStats
    seconds: float
    cpu: float
    peak_kb: int
    commits: int
    fsyncs: int
    counts: dict[str, int]
    rerun_s: float
    rerun_commits: int
    rerun_fsyncs: int

    @property
    def mb_s(self) -> float:
        return self.stats.bytes / 1e6 / self.seconds


def _shapes_part(args: argparse.Namespace, srv: Any, base: Path) -> list[str]:
    """Few big files and many small ones, same lines (and ~bytes), same server, one run."""
    print(f"\n{' tree shapes: few big files vs many small files, same bytes ':=^100}")
    problems: list[str] = []
    runs: list[ShapeRun] = []
    for label, (files, lines) in (("few big", args.big), ("many small", args.small)):
        root = base / f"shape-{files}x{lines}"
        try:
            stats = generate_shaped_tree(root / "projects", files, lines, args.seed)
            print(f"{label + ':':<11} {stats.describe()}", flush=True)
            run = _shape_run(f"{label} ({files:,} x {lines:,})", srv, root, stats, problems)
        finally:
            shutil.rmtree(root, ignore_errors=True)
        if run is not None:
            runs.append(run)
    if len(runs) == 2:
        _shape_table(*runs)
    return problems


def _shape_run(
    label: str, srv: Any, root: Path, stats: TreeStats, problems: list[str]
) -> ShapeRun | None:
    """``run --once`` then a no-op second one; commits from ``pg_stat_database`` deltas."""
    url = fresh_schema(srv, "catchup_shape")
    log = root / "watcher.log"
    commits = CommitCounter(url)
    try:
        c0 = commits.read()
        seconds, ru, code, peak_kb = run_watcher(url, root / "projects", root / "state", log)
        c1 = commits.read()
        if code != 0:
            problems.append(f"{label}: watcher exited with {code}; log tail:\n{log_tail(log)}")
            return None
        counts = db_counts(url)
        commits.own(1)  # db_counts' transaction
        rerun_s, _ru, code2, _peak = run_watcher(url, root / "projects", root / "state", log)
        c2 = commits.read()
        after = db_counts(url)
    finally:
        srv.drop(url)
    if counts["lines"] != stats.lines or counts["turns"] != stats.turns:
        problems.append(
            f"{label}: committed {counts['lines']} lines / {counts['turns']} turns, "
            f"expected {stats.lines} / {stats.turns}"
        )
    if counts["rejected"]:
        problems.append(f"{label}: {counts['rejected']} lines rejected, expected 0")
    if code2 != 0 or after != counts:
        problems.append(f"{label}: second run --once changed the database: {counts} -> {after}")
    return ShapeRun(
        label,
        stats,
        seconds,
        ru.ru_utime + ru.ru_stime,
        peak_kb,
        c1[0] - c0[0],
        c1[1] - c0[1],
        counts,
        rerun_s,
        c2[0] - c1[0],
        c2[1] - c1[1],
    )


def _shape_table(big: ShapeRun, small: ShapeRun) -> None:
    print(
        f"\n{'tree':<26} {'files':>6} {'lines':>7} {'MB':>6} {'run --once':>10} {'MB/s':>5} "
        f"{'CPU u+s':>8} {'peak RSS':>8} {'commits':>7} {'fsyncs':>6} {'lines/fsync':>11} "
        f"{'no-op rerun: s, commits, fsyncs':>31}"
    )
    for r in (big, small):
        print(
            f"{r.label:<26} {r.stats.files:>6,} {r.stats.lines:>7,} {r.stats.bytes / 1e6:>6.1f} "
            f"{r.seconds:>8.2f} s {r.mb_s:>5.1f} {r.cpu:>6.2f} s {r.peak_kb / 1024:>5.1f} MB "
            f"{r.commits:>7,} {r.fsyncs:>6,} {r.stats.lines / max(1, r.fsyncs):>11,.0f} "
            f"{r.rerun_s:>14.2f} s {r.rerun_commits:>6,} {r.rerun_fsyncs:>6,}"
        )

    def ratio(a: float, b: float) -> str:
        return f"{a / b:.2f}x" if b else "n/a"

    print(
        f"{'many small / few big':<26} {ratio(small.stats.files, big.stats.files):>6} "
        f"{ratio(small.stats.lines, big.stats.lines):>7} "
        f"{ratio(small.stats.bytes, big.stats.bytes):>6} "
        f"{ratio(small.seconds, big.seconds):>10} {ratio(small.mb_s, big.mb_s):>5} "
        f"{ratio(small.cpu, big.cpu):>8} {ratio(small.peak_kb, big.peak_kb):>8} "
        f"{ratio(small.commits, big.commits):>7} {ratio(small.fsyncs, big.fsyncs):>6}"
    )
    for r in (small, big):
        print(
            f"{r.label}: {r.commits / r.stats.files:.2f} commits and "
            f"{r.fsyncs / r.stats.files:.2f} WAL fsyncs per file; "
            f"{r.seconds / r.stats.files * 1e3:.2f} ms wall, "
            f"{r.cpu / r.stats.files * 1e3:.2f} ms CPU per file"
        )
    print(
        f"time ratio many small / few big = {small.seconds / big.seconds:.2f}x "
        "(issue 12 target <= 1.3x: information, not a bar)"
    )
    print(
        "commits = pg_stat_database.xact_commit delta of the run's database (write "
        "transactions + one autocommit pool pre-ping per connection checkout); fsyncs = "
        "pg_stat_io WAL fsyncs of the server (the durable commits)",
        flush=True,
    )


# --------------------------------------------------------------------------- memory


def _memory_part(args: argparse.Namespace, srv: Any, base: Path) -> list[str]:
    """RSS of a caught-up live ``run`` with N tracked (small, ended) sessions."""
    print(f"\n{' memory of the live service by tracked files ':=^100}")
    print(
        f"each: N sessions x {args.memory_lines} lines (ended days ago), `headspace-watcher run` "
        f"until every line is committed and every session_ended stored, then {args.settle:g} s "
        "idle; RSS = VmRSS then, peak = VmHWM",
        flush=True,
    )
    problems: list[str] = []
    rows: list[tuple[int, TreeStats, float, int, int, int | None, int]] = []
    for n in args.memory_files:
        root = base / f"memory-{n}"
        try:
            stats = generate_shaped_tree(root / "projects", n, args.memory_lines, args.seed + n)
            row = _memory_run(srv, root, stats, args.settle, problems)
        finally:
            shutil.rmtree(root, ignore_errors=True)
        if row is not None:
            rows.append((n, stats, *row))
    print(
        f"\n{'tracked files':>13} {'lines':>8} {'MB':>6} {'catch-up':>9} {'idle RSS':>9} "
        f"{'peak RSS':>9} {'files_watched':>13} {'idle RSS per file over first':>29} "
        f"{'restart peak':>12}"
    )
    first = rows[0] if rows else None
    for n, stats, seconds, rss, hwm, watched, restart in rows:
        watched_text = "?" if watched is None else str(watched)
        per_file = ""
        if first is not None and n > first[0]:
            per_file = f"{(rss - first[3]) * 1024 / (n - first[0]):,.0f} B"
        print(
            f"{n:>13,} {stats.lines:>8,} {stats.bytes / 1e6:>6.1f} {seconds:>7.1f} s "
            f"{rss / 1024:>6.1f} MB {hwm / 1024:>6.1f} MB {watched_text:>13} "
            f"{per_file:>29} {restart / 1024:>9.1f} MB"
        )
    if len(rows) >= 2:
        last = rows[-1]
        print(
            f"idle RSS {last[0]:,} files - {first[0]:,} files = "  # type: ignore[index]
            f"{(last[3] - first[3]) / 1024:+.1f} MB; peak {last[4] / 1024:.1f} MB "  # type: ignore[index]
            "(issue 12 targets: idle <= first + 5 MB, peak < 60 MB; information, not a bar)",
            flush=True,
        )
    return problems


def _memory_run(
    srv: Any, root: Path, stats: TreeStats, settle: float, problems: list[str]
) -> tuple[float, int, int, int | None, int] | None:
    """(catch-up seconds, idle VmRSS kB, VmHWM kB, status files_watched, restart peak kB):
    one live run, then a ``run --once`` restart over the same caught-up tree."""
    url = fresh_schema(srv, "catchup_memory")
    log = root / "watcher.log"
    state = root / "state"
    proc = start_service(url, root / "projects", state, log)
    try:
        t0 = time.monotonic()
        wait_caught_up(url, stats.lines, proc, timeout=900)
        _wait_ended(url, stats.sessions, proc, timeout=300)
        seconds = time.monotonic() - t0
        time.sleep(settle)  # idle period: the figure is the RSS of a service at rest
        if proc.poll() is not None:
            raise RuntimeError(f"watcher exited with {proc.returncode}")
        status = proc_status(proc.pid)
        watched = _files_watched(state)
        stop_service(proc)
        restart_peak = _restart_peak_kib(url, root, state, log)
    except (RuntimeError, TimeoutError) as exc:
        problems.append(f"memory, {stats.files} files: {exc}; log tail:\n{log_tail(log)}")
        return None
    finally:
        stop_service(proc)
        srv.drop(url)
    return seconds, status.get("VmRSS", 0), status.get("VmHWM", 0), watched, restart_peak


def _restart_peak_kib(url: str, root: Path, state: Path, log: Path) -> int:
    """Peak RSS (kB, sampled VmHWM) of ``run --once`` over a tree it has already caught up:
    what a restart costs (sessions and checkpoints looked up, nothing new to read)."""
    _seconds, _usage, code, peak = run_watcher(url, root / "projects", state, log)
    if code != 0:
        raise RuntimeError(f"restart run --once exited with {code}")
    return peak


def _wait_ended(url: str, sessions: int, proc: Any, timeout: float) -> None:
    """Poll (every 0.2 s) until every session's ``session_ended`` is stored."""
    deadline = time.monotonic() + timeout
    with psycopg.connect(libpq(url), autocommit=True) as conn:
        while True:
            row = conn.execute(
                "SELECT count(*) FROM events WHERE event_type = 'session_ended'"
            ).fetchone()
            if row is not None and row[0] >= sessions:
                return
            if proc.poll() is not None:
                raise RuntimeError(f"watcher exited with {proc.returncode}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"sessions not all ended after {timeout:.0f} s")
            time.sleep(0.2)


def _files_watched(state: Path) -> int | None:
    """``files_watched`` of the service's status.json (None when unreadable)."""
    try:
        value = json.loads((state / "status.json").read_text()).get("files_watched")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) else None


if __name__ == "__main__":
    sys.exit(main())
