"""The benchmarks stay runnable: each, at a small size, runs to its verdict without crashing.

Speed is not judged here (a test must not depend on wall-clock speed); the benchmarks'
own correctness checks are: the catch-up's exactly-once verification decides its exit code
at ``--quick`` size, the writer's exit code only says whether a speed bar was met.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from headspace_watcher.pgserver import PgServer

ROOT = Path(__file__).resolve().parent.parent


def run_bench(pg_cluster: PgServer, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, HEADSPACE_BENCH_DATABASE_URL=pg_cluster.url("postgres"))
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.timeout(320)
def test_writer_benchmark_runs_to_its_verdict(pg_cluster: PgServer) -> None:
    proc = run_bench(
        pg_cluster, "bench.writer", "--events", "1000", "--batch-size", "250",
        "--latency-writes", "20", "--repeat", "1",
    )  # fmt: skip

    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    assert proc.returncode in (0, 1), proc.stderr  # 1: a speed bar missed at this size
    assert "batch / naive =" in proc.stdout and "batch / COPY  =" in proc.stdout
    assert "bar: " in proc.stdout


@pytest.mark.timeout(320)
def test_catchup_benchmark_verifies_exactly_once(pg_cluster: PgServer) -> None:
    proc = run_bench(pg_cluster, "bench.catchup", "--quick", "--skip-naive")

    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "stored nothing new: True" in proc.stdout
    assert "PROBLEM" not in proc.stdout


@pytest.mark.timeout(320)
def test_catchup_benchmark_compares_tree_shapes_and_memory(pg_cluster: PgServer) -> None:
    proc = run_bench(pg_cluster, "bench.catchup", "--quick", "--parts", "shapes", "memory")

    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    rows = {line.split("  ")[0]: line.split() for line in out.splitlines()}
    big, small = rows["few big (4 x 300)"], rows["many small (40 x 30)"]
    # files, lines, and the commits/fsyncs columns counted from PostgreSQL (never zero)
    assert (big[5], big[6], small[5], small[6]) == ("4", "1,200", "40", "1,200"), out
    assert all(int(row[-6].replace(",", "")) > 0 for row in (big, small)), out  # fsyncs
    assert all(int(row[-7].replace(",", "")) > 0 for row in (big, small)), out  # commits
    assert "time ratio many small / few big = " in out
    for files in ("10", "50", "200"):  # the memory table: one row per tracked-file count
        assert any(line.split()[:1] == [files] and " MB " in line for line in out.splitlines())
    assert "PROBLEM" not in out


@pytest.mark.timeout(320)
def test_catchup_profile_runs_to_its_figures(pg_cluster: PgServer) -> None:
    proc = run_bench(pg_cluster, "bench.catchup_profile", "--quick", "--cprofile", "5")

    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "parsing: transcript.parse_line" in proc.stdout
    assert "B per extra tracked file" in proc.stdout
