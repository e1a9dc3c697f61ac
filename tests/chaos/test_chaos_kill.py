"""``kill -9`` of the watcher at random instants during a catch-up, restarted each time."""

from __future__ import annotations

import time

import pytest
from gen import TreeGen, append, partial_tail, write_tree
from harness import ChaosEnv, make_rng, pick, wait_for
from invariants import assert_exact, snapshot

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(pick(240, 1800))]

KILLS = pick(20, 200)


def _top_up(env: ChaosEnv, gen: TreeGen, min_lag: int) -> None:
    """Appended while the watcher is down: keeps every kill inside a catch-up."""
    while env.lag() < min_lag:
        if gen.rng.random() < 0.3:
            gen.new_session_files()
        files = gen.rng.sample(gen.files, k=min(len(gen.files), 12))
        write_tree(gen, files, (5, 60))


def test_kill9_during_catch_up(chaos_env: ChaosEnv, exactly_once: object) -> None:
    env = chaos_env
    rng, seed = make_rng("kill -9 during catch-up")
    gen = TreeGen(rng, env.root, oversized_every=997, max_line_bytes=env.max_line)
    write_tree(gen, gen.tree(30), (20, 200))
    for tf in rng.sample(gen.files, k=5):  # trailing partial lines: never consumed
        append(tf.path, partial_tail(gen, tf))
        gen.files.remove(tf)  # no more appends after an unfinished line

    min_lag = 1_500_000
    kills = mid_catch_up = 0
    durations: list[float] = []
    while kills < KILLS:
        _top_up(env, gen, min_lag)
        before = env.committed()
        w = env.start()
        if rng.random() < 0.5:
            # Kill just after a commit, plus a few milliseconds: lands mid-batch.
            wait_for(
                lambda w=w, b=before: not w.alive() or env.committed() > b,
                "progress",
                timeout=30,
                details=w.log,
            )
            time.sleep(rng.uniform(0, 0.03))  # fault schedule
        else:
            time.sleep(rng.uniform(0, 0.8))  # fault schedule: may land in start-up
        assert w.alive(), f"seed {seed}: watcher died on its own:\n{w.log()}"
        lag = env.lag()
        w.kill9()
        durations.append(time.monotonic() - w.started)
        kills += 1
        mid_catch_up += lag > 0
        min_lag = max(min_lag, 2 * (env.committed() - before))  # a faster machine: more
        # Between faults the database must be self-consistent: rows == committed prefix.
        if kills % pick(1, 5) == 0:
            assert_exact(env.engine, snapshot(env.root), max_line_bytes=env.max_line, final=False)

    w = env.start()
    env.wait_caught_up(w, timeout=pick(60, 300))
    code, _took = w.term()
    assert code == 0, f"seed {seed}: exit {code}\n{w.log()}"
    files = snapshot(env.root)
    rep = assert_exact(env.engine, files, max_line_bytes=env.max_line)
    exactly_once(env.engine, env.root, max_line_bytes=env.max_line)  # type: ignore[operator]
    print(
        f"[chaos] seed {seed}: {kills} kills ({mid_catch_up} mid-catch-up, after "
        f"{min(durations):.2f}-{max(durations):.2f}s of life), "
        f"{rep.files} files, {rep.lines} lines, {rep.turns} turns, {rep.rejects} rejected"
    )
    assert mid_catch_up >= kills * 0.75, (
        f"seed {seed}: only {mid_catch_up}/{kills} kills mid-catch-up"
    )
