"""``kill -9`` of the watcher at random instants during a catch-up, restarted each time."""

from __future__ import annotations

import random
import time
from typing import Any

import pytest
from gen import TreeGen, append, partial_tail, write_tree
from harness import ChaosEnv, make_rng, pick, wait_for
from invariants import assert_epochs, assert_exact, lifecycle_epochs, snapshot

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
        w, lag = _start_and_kill(env, rng, seed, mid_batch=0.5, otherwise_within=0.8)
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


MANY_SESSIONS = pick(300, 3000)
MANY_KILLS = pick(8, 60)


def _all_ended(env: ChaosEnv) -> bool:
    epochs = lifecycle_epochs(env.engine).values()
    return all(ends and ends[-1] == regs[-1] for regs, ends in epochs)


def test_kill9_during_many_file_catch_up(chaos_env: ChaosEnv, exactly_once: object) -> None:
    """A tree of many small sessions (many files per batch: bulk registration of streams
    and sessions), sessions timing out between catch-ups (their files forgotten, then
    re-created from the store when appended to): kill -9 at random instants, restarted
    each time; nothing lost, nothing twice, every epoch registered and ended once."""
    env = chaos_env
    env.configure(file_watcher={"inactivity_timeout": 1})  # every catch-up ends its sessions
    rng, seed = make_rng("kill -9 during a many-file catch-up")
    gen = TreeGen(rng, env.root, max_line_bytes=env.max_line)
    write_tree(gen, gen.tree(MANY_SESSIONS), (1, 6))

    kills = mid_catch_up = 0
    while kills < MANY_KILLS:
        if kills:  # while it is down: new sessions, and lines for ended ones
            gen.tree(rng.randrange(1, MANY_SESSIONS // 4))
            write_tree(gen, rng.sample(gen.files, k=len(gen.files) // 3), (1, 4))
        w, lag = _start_and_kill(env, rng, seed, mid_batch=0.6, otherwise_within=1.5)
        kills += 1
        mid_catch_up += lag > 0
        assert_exact(env.engine, snapshot(env.root), max_line_bytes=env.max_line, final=False,
                     sessions_once=False)  # fmt: skip
        assert_epochs(env.engine, f"seed {seed}, after kill {kills}")

    w = env.start()
    env.wait_caught_up(w, timeout=pick(120, 600))
    wait_for(lambda: _all_ended(env), "every session ended", timeout=pick(60, 300), details=w.log)
    # the files of ended sessions are forgotten by now: appending re-creates them from the
    # store, and their sessions come back as the next epoch
    before = lifecycle_epochs(env.engine)
    again = rng.sample(gen.files, k=min(20, len(gen.files)))
    for tf in again:
        append(tf.path, gen._message(tf, "user", "after the session ended"))
    env.wait_caught_up(w, timeout=pick(60, 300))
    wait_for(lambda: _all_ended(env), "every session ended again", timeout=60, details=w.log)
    code, _took = w.term()
    assert code == 0, f"seed {seed}: exit {code}\n{w.log()}"
    rep = assert_exact(env.engine, snapshot(env.root), max_line_bytes=env.max_line,
                       sessions_once=False)  # fmt: skip
    epochs = assert_epochs(env.engine, f"seed {seed}, final")
    regs_before = {s: len(regs) for s, (regs, _ends) in before.items()}
    stale = [s for s in {tf.session for tf in again} if len(epochs[s][0]) <= regs_before.get(s, 0)]
    assert not stale, f"seed {seed}: not registered again after their end: {stale[:5]}"
    exactly_once(env.engine, env.root, max_line_bytes=env.max_line)  # type: ignore[operator]
    print(
        f"[chaos] seed {seed}: {kills} kills ({mid_catch_up} mid-catch-up), {rep.files} files, "
        f"{rep.lines} lines, {rep.turns} turns, {len(epochs)} sessions, "
        f"{sum(len(r) for r, _e in epochs.values())} registrations"
    )
    assert mid_catch_up >= kills // 3, f"seed {seed}: only {mid_catch_up}/{kills} mid-catch-up"


def _start_and_kill(
    env: ChaosEnv, rng: random.Random, seed: int, *, mid_batch: float, otherwise_within: float
) -> tuple[Any, int]:
    """Start a watcher and kill -9 it: with probability ``mid_batch`` just after a commit plus
    a few milliseconds (mid-batch), else at a random instant up to ``otherwise_within`` s
    (start-up, catch-up or session ends). Returns the watcher and the lag at the kill."""
    before = env.committed()
    w = env.start()
    if rng.random() < mid_batch:
        wait_for(
            lambda: not w.alive() or env.committed() > before,
            "progress",
            timeout=30,
            details=w.log,
        )
        time.sleep(rng.uniform(0, 0.03))  # fault schedule
    else:
        time.sleep(rng.uniform(0, otherwise_within))  # fault schedule
    assert w.alive(), f"seed {seed}: watcher died on its own:\n{w.log()}"
    lag = env.lag()
    w.kill9()
    return w, lag
