"""Files truncated, deleted and replaced while the service reads them (and while it is down).

The documented behaviour, and the exact expectation each case is held to:

* truncated (in place, to 0 or to a shorter line boundary below the checkpoint) or replaced
  by different content (rename over it, or deleted and re-created — the inode may even be
  reused): read from 0 as a new source generation. Generation 0 keeps exactly the rows of a
  prefix of the old content; generation 1 holds exactly the new content's lines.
* replaced by a same-content copy (plus new lines): continues at the checkpoint, one
  generation, every line once.
* deleted: its rows remain (an exact prefix of what it held, up to its checkpoint) and its
  session is ended once with reason ``closed``. Re-created afterwards: the session is
  registered again (twice in all) and the new content is a new generation.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from gen import TranscriptFile, TreeGen, append, partial_tail, write_tree
from harness import ChaosEnv, make_rng, pick, wait_for
from invariants import DbView, assert_exact, expected_lines, snapshot

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(pick(240, 1800))]

CASES = (
    "truncate_rewrite",
    "truncate_shorter_append",
    "rename_different",
    "rename_same_copy",
    "delete",
    "delete_recreate",
)


def _replace(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")  # not *.jsonl: not a transcript
    tmp.write_bytes(data)
    os.rename(tmp, path)


def _ended(env: ChaosEnv, session: str) -> list[str]:
    return [e.reason for e in DbView.load(env.engine).ended if e.session == session]


def test_truncate_delete_replace_while_reading(chaos_env: ChaosEnv, exactly_once: object) -> None:
    env = chaos_env
    env.configure(file_watcher={"batch_max_lines": 20})
    rng, seed = make_rng("truncate / delete / replace")
    gen = TreeGen(rng, env.root, max_line_bytes=env.max_line)
    write_tree(gen, gen.tree(4), (50, 150))
    cases = list(CASES) * pick(1, 5)
    rng.shuffle(cases)
    victims = []
    for case in cases:
        tf = gen.new_session_files(subagents=False)[0]
        gen.files.remove(tf)  # only the test appends to victims
        append(tf.path, gen.lines(tf, rng.randint(500, 1500)))
        victims.append((case, tf))

    old_gens: dict[Path, list[bytes]] = {}
    down: list[tuple[str, Path]] = []
    deleted: dict[Path, bytes] = {}
    registrations: dict[str, int] = {}
    closed: set[str] = set()
    mid_read = 0

    def being_read() -> tuple[str, TranscriptFile, int] | None:
        """A victim the watcher has started on, preferably one it is in the middle of."""
        assert w.alive(), w.log()
        cps = env.checkpoints()
        started = [(c, t, cps[str(t.path)]) for c, t in pending if cps.get(str(t.path), 0) > 0]
        mid = [v for v in started if v[2] < v[1].path.stat().st_size]
        return (mid or started or [None])[0]

    w = env.start()
    pending = list(victims)
    while pending:
        case, tf, cp = wait_for(being_read, "the watcher to read a victim", timeout=60)
        pending.remove((case, tf))
        path = str(tf.path)
        time.sleep(rng.uniform(0, 0.02))  # fault schedule
        old = tf.path.read_bytes()
        mid_read += env.checkpoints().get(path, 0) < len(old)
        new = gen.lines(tf, rng.randint(20, 1200))
        if case == "truncate_rewrite":
            with open(tf.path, "wb") as f:  # O_TRUNC: same inode
                f.write(new)
            old_gens[tf.path] = [old]
        elif case == "truncate_shorter_append":
            bounds = [ln.offset for ln in expected_lines(old, env.max_line)[0] if ln.offset < cp]
            os.truncate(tf.path, rng.choice(bounds))
            append(tf.path, new)
            old_gens[tf.path] = [old]
        elif case == "rename_different":
            _replace(tf.path, new)
            old_gens[tf.path] = [old]
        elif case == "rename_same_copy":
            _replace(tf.path, old + new)
        elif case == "delete":
            tf.path.unlink()
            deleted[tf.path] = old
            closed.add(tf.session)
        elif case == "delete_recreate":
            tf.path.unlink()
            wait_for(lambda s=tf.session: _ended(env, s), "session_ended", timeout=30)
            append(tf.path, new)
            old_gens[tf.path] = [old]
            registrations[tf.session] = 2
            closed.add(tf.session)
        if case not in ("delete",) and rng.random() < 0.5:
            append(tf.path, gen.lines(tf, rng.randint(1, 50)))  # and it keeps growing

    env.wait_caught_up(w, timeout=pick(60, 300), files=snapshot(env.root))
    code, _took = w.term()
    assert code == 0, w.log()

    def check(context: str) -> None:
        files = {**snapshot(env.root), **deleted}
        try:
            assert_exact(
                env.engine,
                files,
                max_line_bytes=env.max_line,
                old_generations=old_gens,
                prefix_only=deleted,
                registrations=registrations,
            )
        except AssertionError as exc:
            cases_of = {str(tf.path): case for case, tf in victims}
            cases_of.update({str(p): f"{case} while down" for case, p in down})
            named = "\n".join(f"  {p}: {c}" for p, c in cases_of.items() if p in str(exc))
            raise AssertionError(f"seed {seed} ({context}): {exc}\n{named}\n{w.log()}") from None
        ended = DbView.load(env.engine).ended
        assert sorted((e.session, e.reason) for e in ended) == sorted(
            (s, "closed") for s in closed
        ), f"seed {seed}: sessions ended {ended}, expected closed: {closed}"

    check("while running")

    # The same while the service is down: found at start-up, not through inotify.
    present = [tf for case, tf in victims if case != "delete"] + gen.files
    for case in (
        "truncate_rewrite",
        "truncate_shorter_append",
        "rename_different",
        "rename_same_copy",
    ):
        tf = rng.choice([t for t in present if t.path.stat().st_size > 0])
        present.remove(tf)
        old = tf.path.read_bytes()
        new = gen.lines(tf, rng.randint(20, 400))
        if case == "truncate_rewrite":  # in place, and longer than before: same inode, size
            while len(new) <= len(old):
                new += gen.lines(tf, 50)
            tf.path.write_bytes(new)
        elif case == "truncate_shorter_append":
            bounds = [ln.offset for ln in expected_lines(old, env.max_line)[0]]
            os.truncate(tf.path, rng.choice(bounds))
            append(tf.path, new)
        elif case == "rename_different":
            _replace(tf.path, new)
        else:
            _replace(tf.path, old + new)
        if case != "rename_same_copy":
            old_gens[tf.path] = [*old_gens.get(tf.path, []), old]
        down.append((case, tf.path))
    tail = rng.choice(present)
    append(tail.path, partial_tail(gen, tail))

    w = env.start()
    env.wait_caught_up(w, timeout=pick(60, 300), files=snapshot(env.root))
    code, _took = w.term()
    assert code == 0, w.log()
    check("after a restart")
    exactly_once(env.engine, env.root, max_line_bytes=env.max_line)  # type: ignore[operator]
    print(
        f"[chaos] seed {seed}: {len(victims)} files changed while read ({mid_read} mid-read), "
        f"{len(down)} while down ({', '.join(c for c, _p in down)})"
    )
