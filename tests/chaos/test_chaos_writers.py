"""Several writer processes appending to many sessions while the watcher runs, each line
often in several ``write()`` calls with small random gaps (partial lines on disk)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from gen import TreeGen, write_tree
from harness import ChaosEnv, make_rng, pick, wait_for
from invariants import assert_exact, snapshot

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(pick(240, 1800))]

APPENDER = Path(__file__).resolve().parent / "appender.py"


def test_concurrent_writer_processes_with_partial_lines(
    chaos_env: ChaosEnv, exactly_once: object
) -> None:
    env = chaos_env
    rng, seed = make_rng("concurrent writer processes")
    gen = TreeGen(rng, env.root, max_line_bytes=env.max_line)
    write_tree(gen, gen.tree(5), (10, 100))
    w = env.start()
    wait_for(lambda: not w.alive() or env.caught_up(), "the first catch-up", details=w.log)

    writers = pick(6, 12)
    lines = pick(500, 4000)
    procs = []
    for _ in range(writers):
        spec = {
            "seed": rng.getrandbits(32),
            "root": str(env.root),
            "sessions": rng.randint(2, 5),
            "lines": lines,
            "new_session_every": rng.choice([0, 150, 400]),
            "partial_tails": 1,
            "max_line": env.max_line,
            "line_gap_s": 0.004,
        }
        procs.append(subprocess.Popen([sys.executable, str(APPENDER), json.dumps(spec)]))
    try:
        wait_for(
            lambda: all(p.poll() is not None for p in procs) or not w.alive(),
            "the writers to finish",
            timeout=pick(120, 900),
        )
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert w.alive(), f"seed {seed}: {w.log()}"
    assert [p.returncode for p in procs] == [0] * writers

    env.wait_caught_up(w, timeout=pick(60, 300))
    code, _took = w.term()
    assert code == 0, w.log()
    files = snapshot(env.root)
    rep = assert_exact(env.engine, files, max_line_bytes=env.max_line)
    exactly_once(env.engine, env.root, max_line_bytes=env.max_line)  # type: ignore[operator]
    partial = sum(1 for d in files.values() if not d.endswith(b"\n"))
    assert partial >= writers  # every writer left an unfinished line: never consumed
    print(
        f"[chaos] seed {seed}: {writers} writers x {lines} lines; {rep.files} files "
        f"({partial} ending in a partial line), {rep.lines} lines, {rep.turns} turns"
    )
