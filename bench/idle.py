"""Idle cost and memory of the live service: CPU while nothing happens, RSS after a catch-up.

``headspace-watcher run`` (a real subprocess) is started over a generated tree of realistic
transcripts (``--mb``, default 20 MB; a third of the sessions recent, so their inactivity
timers are pending), catches it up, and then sits idle for ``--seconds`` (default 60) while
nothing is appended. From ``/proc/<pid>``: CPU time consumed while idle (utime + stime of
``stat``, as % of one core), wake-ups (voluntary context switches), resident memory after
the catch-up (``VmRSS``) and its peak over the whole run (``VmHWM``).

Bars: idle CPU < 1 % of a core; RSS < 60 MB (checked on the steady RSS after the catch-up
and idle period; the peak during the catch-up is printed next to it).

Run: ``.venv/bin/python -m bench.idle [--mb 20] [--seconds 60] [--quick]``. Starts its own
throwaway PostgreSQL (fsync on) unless ``HEADSPACE_BENCH_DATABASE_URL`` is set.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import psycopg

from bench._common import (
    cpu_seconds,
    fresh_database,
    generate_tree,
    header,
    libpq,
    log_tail,
    proc_status,
    running_service,
    verdict,
    wait_caught_up,
    watcher_bin,
    workdir,
)

RSS_BAR_MB = 60.0
CPU_BAR_PCT = 1.0


def _mb(kb: int | None) -> str:
    return "?" if kb is None else f"{kb / 1024:.1f} MB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.idle", description=__doc__)
    parser.add_argument("--mb", type=float, default=20.0, help="size of the generated tree")
    parser.add_argument("--seconds", type=float, default=60.0, help="idle period")
    parser.add_argument("--seed", type=int, default=20250602)
    parser.add_argument("--quick", action="store_true", help="3 MB tree, 10 s idle")
    args = parser.parse_args(argv)
    if args.quick:
        args.mb, args.seconds = min(args.mb, 3.0), min(args.seconds, 10.0)

    with workdir("idle") as base:
        tree = base / "projects"
        stats = generate_tree(tree, args.mb, args.seed, recent=0.33)
        with fresh_database("idle") as (srv, url):
            header("idle", url, srv)
            print(f"data:     {stats.describe()}")
            print(f"watcher:  {watcher_bin()} run (live), idle {args.seconds:.0f} s\n", flush=True)
            with running_service(url, tree, base) as proc:
                return _measure(args, url, proc, stats, base / "watcher.log")


def _measure(args: argparse.Namespace, url: str, proc, stats, log: Path) -> int:  # type: ignore[no-untyped-def]
    pid = proc.pid
    t0 = time.monotonic()
    try:
        catchup_s = wait_caught_up(url, stats.lines, proc, timeout=600)
    except (RuntimeError, TimeoutError) as exc:
        print(f"catch-up failed: {exc}; log tail:\n{log_tail(log)}")
        return 1
    time.sleep(2.0)  # let the last status write / heartbeat happen
    after = proc_status(pid)
    print(
        f"catch-up: {stats.lines:,} lines in {catchup_s:.1f} s (incl. start-up); then "
        f"VmRSS {_mb(after.get('VmRSS'))}, peak so far VmHWM {_mb(after.get('VmHWM'))}",
        flush=True,
    )
    with psycopg.connect(libpq(url), autocommit=True) as conn:
        before_events = conn.execute("SELECT count(*) FROM events").fetchone()[0]  # type: ignore[index]
    cpu0 = cpu_seconds(pid)
    ctx0 = proc_status(pid)
    w0 = time.monotonic()
    time.sleep(args.seconds)
    cpu1 = cpu_seconds(pid)
    ctx1 = proc_status(pid)
    idle_s = time.monotonic() - w0
    if proc.poll() is not None:
        print(f"watcher exited during the idle period: {proc.returncode}\n{log_tail(log)}")
        return 1
    with psycopg.connect(libpq(url), autocommit=True) as conn:
        after_events = conn.execute("SELECT count(*) FROM events").fetchone()[0]  # type: ignore[index]

    cpu_pct = (cpu1 - cpu0) / idle_s * 100
    wakeups = ctx1.get("voluntary_ctxt_switches", 0) - ctx0.get("voluntary_ctxt_switches", 0)
    rss_kb = ctx1.get("VmRSS", 0)
    hwm_kb = ctx1.get("VmHWM", 0)
    print(
        f"idle:     {idle_s:.1f} s: CPU {cpu1 - cpu0:.2f} s = {cpu_pct:.3f} % of one core, "
        f"{wakeups} wake-ups ({wakeups / idle_s:.2f}/s), {after_events - before_events} "
        f"events written meanwhile"
    )
    print(f"memory:   VmRSS after catch-up {_mb(after.get('VmRSS'))}, after idle {_mb(rss_kb)}")
    print(f"          VmHWM (peak over the whole run, catch-up included) {_mb(hwm_kb)}")
    print(f"total run {time.monotonic() - t0:.0f} s\n")
    cpu_ok = cpu_pct < CPU_BAR_PCT
    rss_ok = max(rss_kb, after.get("VmRSS", 0)) / 1024 < RSS_BAR_MB
    print(f"idle CPU   {cpu_pct:7.3f} %   (bar: < {CPU_BAR_PCT:g} %)    {verdict(cpu_ok)}")
    print(f"steady RSS {rss_kb / 1024:7.1f} MB  (bar: < {RSS_BAR_MB:g} MB)   {verdict(rss_ok)}")
    print(
        f"peak RSS   {hwm_kb / 1024:7.1f} MB  (same bar, for information: "
        f"{verdict(hwm_kb / 1024 < RSS_BAR_MB)})"
    )
    ok = cpu_ok and rss_ok
    print("bar:", verdict(ok))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
