"""Catch-up throughput: ``headspace-watcher run --once`` over a large transcript tree.

A tree of realistic Claude Code transcripts (``--mb``, default 100 MB: many projects, sessions
and sub-agents of both layouts, half the lines turns, a few ~100 KB lines) is ingested, each
time into a fresh database with the schema in place, by:

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

Run: ``.venv/bin/python -m bench.catchup [--mb 100] [--repeat 1] [--quick]``. Starts its own
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
from pathlib import Path
from typing import Any

import psycopg

from bench._common import checkpoint as pg_checkpoint
from bench._common import (
    generate_tree,
    header,
    libpq,
    log_tail,
    proc_status,
    server,
    service_env,
    transcript_files,
    turn_payload,
    verdict,
    watcher_bin,
)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.catchup", description=__doc__)
    parser.add_argument("--mb", type=float, default=100.0, help="size of the generated tree")
    parser.add_argument("--seed", type=int, default=20250601)
    parser.add_argument(
        "--repeat", type=int, default=1, help="alternating watcher/floor runs (best is kept)"
    )
    parser.add_argument("--skip-naive", action="store_true", help="no naive ingest (slow)")
    parser.add_argument("--quick", action="store_true", help="small tree (5 MB)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary tree")
    args = parser.parse_args(argv)
    if args.quick:
        args.mb = min(args.mb, 5.0)

    base = Path(tempfile.mkdtemp(prefix="headspace-bench-catchup-", dir="/tmp"))
    tree = base / "projects"
    try:
        t0 = time.perf_counter()
        stats = generate_tree(tree, args.mb, args.seed)
        gen_s = time.perf_counter() - t0
        files = transcript_files(tree)
        assert len(files) == stats.files, (len(files), stats.files)
        with server() as srv:
            url = fresh_schema(srv, "catchup_probe")
            header("catchup", url, srv)
            srv.drop(url)
            print(f"data:     {stats.describe()}")
            print(f"          generated in {gen_s:.1f} s under {tree} (seed {args.seed})")
            print(f"watcher:  {watcher_bin()} run --once, config {_config_desc()}\n", flush=True)
            return _compare(args, srv, stats, files, base)
    finally:
        if args.keep:
            print(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)


def _config_desc() -> str:
    from headspace_watcher.config import load_config

    fw = load_config().file_watcher
    return (
        f"batch_max_lines={fw['batch_max_lines']} batch_max_bytes={fw['batch_max_bytes']} "
        f"read_chunk_bytes={fw['read_chunk_bytes']}"
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


if __name__ == "__main__":
    sys.exit(main())
