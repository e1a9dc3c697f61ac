"""The benchmarks stay runnable: each, at a small size, runs to its verdict without crashing.

Speed is not judged here (a test must not depend on wall-clock speed); the benchmarks'
own correctness checks are: the catch-up's exactly-once verification decides its exit code
at ``--quick`` size, the writer's exit code only says whether a speed bar was met.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from pg_servers import PgServer

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


def figure(pattern: str, out: str) -> str:
    """The one match of ``pattern``'s group in the benchmark's output (fails if absent)."""
    found = re.findall(pattern, out, flags=re.MULTILINE)
    assert len(found) == 1, f"expected one line matching {pattern!r}:\n{out}"
    return found[0]


def rate(text: str) -> float:
    return float(text.replace(",", ""))


@pytest.mark.timeout(320)
def test_writer_benchmark_reports_its_figures_and_a_verdict_that_matches_them(
    pg_cluster: PgServer,
) -> None:
    proc = run_bench(
        pg_cluster, "bench.writer", "--events", "1000", "--batch-size", "250",
        "--latency-writes", "20", "--repeat", "2",
    )  # fmt: skip
    out = proc.stdout

    assert "Traceback" not in proc.stderr + out, proc.stderr
    events_s = r"\s+1000 events\s+[\d.]+ s\s+([\d,]+) events/s$"
    naive = rate(figure(r"^\(a\) naive: INSERT \+ COMMIT per event" + events_s, out))
    batches = [rate(figure(rf"^\(b\) BatchWriter.write_batch \(250/batch\) #{r}{events_s}", out))
               for r in (1, 2)]  # fmt: skip
    copies = [rate(figure(rf"^\(c\) floor: one COPY, one transaction #{r}{events_s}", out))
              for r in (1, 2)]  # fmt: skip
    best_batch, best_copy = figure(
        r"^best of 2: batch ([\d,]+) events/s, COPY ([\d,]+) events/s$", out
    )
    assert (rate(best_batch), rate(best_copy)) == (max(batches), max(copies))
    vs_naive = float(figure(r"^batch / naive = +([\d.]+)x   \(bar: >= 5x\)$", out))
    vs_copy = float(figure(r"^batch / COPY  = +([\d.]+)x   \(bar: >= 0.7x\)$", out))
    assert vs_naive == pytest.approx(max(batches) / naive, rel=0.02, abs=0.01)
    assert vs_copy == pytest.approx(max(batches) / max(copies), rel=0.02, abs=0.01)
    p50, p99, worst = figure(
        r"^producer write commit latency over 20 writes: "
        r"p50 ([\d.]+) ms, p99 ([\d.]+) ms, max ([\d.]+) ms$",
        out,
    )
    assert 0 < float(p50) <= float(p99) <= float(worst)

    # The verdict and the exit code say the same thing, and follow from the figures (a
    # ratio printed within rounding of its bar could go either way: not judged).
    verdict = figure(r"^bar: (met|MISSED)$", out)
    assert proc.returncode == (0 if verdict == "met" else 1), (verdict, proc.returncode)
    if abs(vs_naive - 5) > 0.02 and abs(vs_copy - 0.7) > 0.02:
        assert (verdict == "met") == (vs_naive >= 5 and vs_copy >= 0.7), out


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
