"""The exact check every chaos test ends with.

Expectations come from the bytes on disk and the contract's rule (``INTERFACE.md``, "Events
derived from transcripts"), written here independently of the service's parser:

* every complete line of a file's current generation is accounted for exactly once: one
  ``turn_detected`` row (at its byte offset, with its ``uuid`` and ``sessionId``) when it is a
  turn, one ``rejected_events`` row when it is not valid UTF-8 / JSON / an object or is over
  the line-size limit, and nothing otherwise;
* no two events share a source position, no two turns of one file generation share
  (session_uuid, message_uuid), no two rejections share a position;
* each file's checkpoint (``sources.committed_offset``) is its length up to its last newline;
* each session with a turn was registered exactly once (unless a test says otherwise).

``check_prefix`` is the same check against whatever prefix is committed now (used between
faults: the database must be self-consistent at every instant, not only at the end).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, text


@dataclass(frozen=True, slots=True)
class Line:
    offset: int
    kind: str  # turn | skip | reject
    session: str | None = None
    message_uuid: str | None = None


def _visible(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def classify(raw: bytes, max_line_bytes: int) -> Line:
    """The contract's rule for one complete line (without its newline); offset left 0."""
    if len(raw) > max_line_bytes:
        return Line(0, "reject")
    try:
        decoded = raw.decode("utf-8")
    except UnicodeDecodeError:
        return Line(0, "reject")
    if not decoded.strip():
        return Line(0, "skip")
    try:
        obj = json.loads(decoded)
    except ValueError:
        return Line(0, "reject")
    if not isinstance(obj, dict):
        return Line(0, "reject")
    if obj.get("type") not in ("user", "assistant") or not isinstance(obj.get("message"), dict):
        return Line(0, "skip")
    content = obj["message"].get("content")
    turn = _visible(content) or (
        isinstance(content, list)
        and any(
            isinstance(b, dict) and b.get("type") == "text" and _visible(b.get("text"))
            for b in content
        )
    )
    if not turn:
        return Line(0, "skip")
    return Line(0, "turn", obj.get("sessionId"), obj.get("uuid"))


def expected_lines(data: bytes, max_line_bytes: int) -> tuple[list[Line], int]:
    """Every complete line of ``data`` classified, and the offset after the last newline."""
    out: list[Line] = []
    pos = 0
    while True:
        nl = data.find(b"\n", pos)
        if nl < 0:
            return out, pos
        c = classify(data[pos:nl], max_line_bytes)
        out.append(Line(pos, c.kind, c.session, c.message_uuid))
        pos = nl + 1


def complete_length(data: bytes) -> int:
    return data.rfind(b"\n") + 1


# ---------------------------------------------------------------------- database view


@dataclass
class DbView:
    sources: dict[str, Any]  # path -> row (id, generation, committed_offset, lines_committed)
    turns: list[Any]  # source_id, source_generation, source_offset, source_seq, session, muuid
    registered: list[Any]  # session_uuid, source_id, source_generation, source_offset
    ended: list[Any]  # session_uuid, reason
    rejected: list[Any]  # source_id, source_generation, byte_offset, source_seq, source_path
    other_positioned: int  # events with a position that are neither turn nor registration

    @classmethod
    def load(cls, engine: Engine) -> DbView:
        with engine.connect() as conn:
            # One snapshot for all reads: the service may be committing meanwhile.
            conn.execute(text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ"))
            src = conn.execute(
                text("SELECT id, path, generation, committed_offset, lines_committed FROM sources")
            ).all()
            turns = conn.execute(
                text(
                    "SELECT source_id, source_generation, source_offset, source_seq, "
                    "payload->>'session_uuid' AS session, payload->>'message_uuid' AS muuid "
                    "FROM events WHERE event_type = 'turn_detected'"
                )
            ).all()
            registered = conn.execute(
                text(
                    "SELECT payload->>'session_uuid' AS session, source_id, source_generation, "
                    "source_offset FROM events WHERE event_type = 'session_registered'"
                )
            ).all()
            ended = conn.execute(
                text(
                    "SELECT payload->>'session_uuid' AS session, payload->>'reason' AS reason "
                    "FROM events WHERE event_type = 'session_ended'"
                )
            ).all()
            rejected = conn.execute(
                text(
                    "SELECT source_id, source_generation, byte_offset, source_seq, source_path "
                    "FROM rejected_events"
                )
            ).all()
            other = conn.execute(
                text(
                    "SELECT count(*) FROM events WHERE source_id IS NOT NULL AND event_type "
                    "NOT IN ('turn_detected', 'session_registered')"
                )
            ).scalar()
            conn.rollback()
        return cls({r.path: r for r in src}, turns, registered, ended, rejected, int(other or 0))


def _dupes(items: Iterable[Any]) -> list[Any]:
    return [k for k, n in Counter(items).items() if n > 1]


@dataclass
class Report:
    """What the check found; ``problems`` empty means exact."""

    problems: list[str] = field(default_factory=list)
    turns: int = 0
    rejects: int = 0
    lines: int = 0
    files: int = 0

    def add(self, msg: str) -> None:
        if len(self.problems) < 40:
            self.problems.append(msg)

    def raise_if_any(self, context: str = "") -> None:
        if self.problems:
            head = f"exactly-once check failed{' (' + context + ')' if context else ''}:\n  "
            raise AssertionError(head + "\n  ".join(self.problems))


def _check_generation(
    rep: Report,
    path: str,
    expected: list[Line],
    turns: list[Any],
    rejects: list[Any],
    label: str,
) -> None:
    want_turns = {ln.offset: ln for ln in expected if ln.kind == "turn"}
    want_rejects = {ln.offset for ln in expected if ln.kind == "reject"}
    got_turns = Counter(t.source_offset for t in turns)
    got_rejects = Counter(r.byte_offset for r in rejects)
    rep.turns += sum(got_turns.values())
    rep.rejects += sum(got_rejects.values())
    for off, n in got_turns.items():
        if n > 1:
            rep.add(f"{path} {label}: {n} turn rows at offset {off}")
    for off, n in got_rejects.items():
        if n > 1:
            rep.add(f"{path} {label}: {n} rejected rows at offset {off}")
    missing = sorted(set(want_turns) - set(got_turns))
    extra = sorted(set(got_turns) - set(want_turns))
    if missing:
        rep.add(f"{path} {label}: {len(missing)} turns missing, first offsets {missing[:5]}")
    if extra:
        rep.add(f"{path} {label}: {len(extra)} unexpected turn rows at offsets {extra[:5]}")
    missing_r = sorted(want_rejects - set(got_rejects))
    extra_r = sorted(set(got_rejects) - want_rejects)
    if missing_r:
        rep.add(f"{path} {label}: rejected rows missing at offsets {missing_r[:5]}")
    if extra_r:
        rep.add(f"{path} {label}: unexpected rejected rows at offsets {extra_r[:5]}")
    for t in turns:
        want = want_turns.get(t.source_offset)
        if want is not None and (t.session, t.muuid) != (want.session, want.message_uuid):
            rep.add(
                f"{path} {label} offset {t.source_offset}: turn row is "
                f"({t.session}, {t.muuid}), the line is ({want.session}, {want.message_uuid})"
            )
    for key in _dupes((t.session, t.muuid) for t in turns):
        rep.add(f"{path} {label}: two turns with (session, message uuid) {key}")


def check(
    engine: Engine,
    files: dict[Path, bytes] | Iterable[Path],
    *,
    max_line_bytes: int,
    final: bool = True,
    old_generations: dict[Path, list[bytes]] | None = None,
    sessions_once: bool = True,
    prefix_only: Iterable[Path] = (),
    registrations: dict[str, int] | None = None,
) -> Report:
    """Compare the database with the files (path → content, or paths read now).

    ``final``: checkpoints must equal each file's complete length (else: any line boundary,
    and the rows must match exactly the committed prefix). ``old_generations``: for a path,
    the content of each earlier generation in order; its rows must be an exact prefix of it.
    Every source row in the database must belong to one of ``files`` or
    ``old_generations``; sources of files not listed are an error. ``prefix_only``: paths
    (e.g. deleted files, given with their last content) checked as a committed prefix.
    """
    prefix_only = set(prefix_only)
    old_generations = old_generations or {}
    view = DbView.load(engine)  # before reading the files: they may only have grown since
    contents = files if isinstance(files, dict) else {p: p.read_bytes() for p in files}
    rep = Report()
    turns_by: dict[tuple[int, int], list[Any]] = {}
    for t in view.turns:
        turns_by.setdefault((t.source_id, t.source_generation), []).append(t)
    rej_by: dict[tuple[int, int], list[Any]] = {}
    for r in view.rejected:
        rej_by.setdefault((r.source_id, r.source_generation), []).append(r)

    for key in _dupes(
        (t.source_id, t.source_generation, t.source_offset, t.source_seq) for t in view.turns
    ):
        rep.add(f"two events at one source position {key}")
    for key in _dupes(
        (r.source_id, r.source_generation, r.byte_offset, r.source_seq) for r in view.rejected
    ):
        rep.add(f"two rejected rows at one source position {key}")
    unsourced = [r for r in view.rejected if r.source_id is None]
    if unsourced:
        rep.add(f"{len(unsourced)} rejected rows without a source position: {unsourced[:3]}")
    if view.other_positioned:
        rep.add(f"{view.other_positioned} events of other types carry a source position")

    known_ids: set[int] = set()
    generations: dict[int, set[int]] = {}  # source id -> generations rows were stored under
    for sid, g in (*turns_by, *rej_by):
        generations.setdefault(sid, set()).add(g)
    for path in sorted(set(contents) | set(old_generations)):
        src = view.sources.get(str(path))
        data = contents.get(path)
        olds = old_generations.get(path, [])
        if src is None:
            if final and path not in prefix_only and data is not None and complete_length(data):
                rep.add(f"{path}: no sources row for a file with complete lines")
            continue
        known_ids.add(src.id)
        rep.files += 1
        # Earlier generations: an exact prefix of what the file held then.
        for gen, old in enumerate(olds):
            lines, _end = expected_lines(old, max_line_bytes)
            t, r = turns_by.get((src.id, gen), []), rej_by.get((src.id, gen), [])
            offsets = [x.source_offset for x in t] + [x.byte_offset for x in r]
            upto = max(offsets, default=-1)
            _check_generation(
                rep, str(path), [ln for ln in lines if ln.offset <= upto], t, r, f"generation {gen}"
            )
        data_now = data
        gen = src.generation
        if gen != len(olds):
            rep.add(f"{path}: source is at generation {gen}, expected {len(olds)}")
        for g in generations.get(src.id, ()):
            if g > gen or (g < gen and g >= len(olds)):
                rep.add(f"{path}: rows of unexpected generation {g} (current {gen})")
        if data_now is None:
            continue
        lines, end = expected_lines(data_now, max_line_bytes)
        committed = src.committed_offset
        boundaries = {0} | {ln.offset for ln in lines} | {end}
        if final and path not in prefix_only and committed != end:
            rep.add(
                f"{path}: checkpoint {committed} != complete length {end} (size {len(data_now)})"
            )
        elif committed not in boundaries:
            rep.add(f"{path}: checkpoint {committed} is not at a line boundary")
        prefix = [ln for ln in lines if ln.offset < committed]
        rep.lines += len(prefix)
        if src.lines_committed != len(prefix):
            rep.add(
                f"{path}: lines_committed {src.lines_committed} != "
                f"{len(prefix)} lines below the checkpoint"
            )
        _check_generation(
            rep,
            str(path),
            prefix,
            turns_by.get((src.id, gen), []),
            rej_by.get((src.id, gen), []),
            f"generation {gen}",
        )

    stray = [p for p, s in view.sources.items() if s.id not in known_ids]
    if stray:
        rep.add(f"sources rows for files the test does not know: {stray[:5]}")
    stray_rows = [k for k in list(turns_by) + list(rej_by) if k[0] not in known_ids]
    if stray_rows:
        rep.add(f"rows of unknown sources: {stray_rows[:5]}")

    # Sessions: every session with a turn registered exactly once; never twice.
    reg = Counter(r.session for r in view.registered)
    for key in _dupes((r.source_id, r.source_generation, r.source_offset) for r in view.registered):
        rep.add(f"two session_registered rows at one source position {key}")
    registrations = registrations or {}
    for session, n in registrations.items():
        if reg.get(session, 0) != n:
            rep.add(f"session {session} registered {reg.get(session, 0)} times, expected {n}")
    if sessions_once:
        for session, n in reg.items():
            if n > 1 and session not in registrations:
                rep.add(f"session {session} registered {n} times")
        for session in {t.session for t in view.turns} - set(reg):
            rep.add(f"session {session} has turns but no session_registered")
    return rep


def assert_exact(engine: Engine, files: dict[Path, bytes] | Iterable[Path], **kw: Any) -> Report:
    rep = check(engine, files, **kw)
    rep.raise_if_any("final" if kw.get("final", True) else "prefix")
    return rep


def transcript_files(root: Path) -> list[Path]:
    """Every watched file: ``<project>/*.jsonl`` and ``<project>/<uuid>/subagents/*.jsonl``."""
    return sorted([*root.glob("*/*.jsonl"), *root.glob("*/*/subagents/*.jsonl")])


def snapshot(root: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in transcript_files(root)}


def lifecycle_epochs(engine: Engine) -> dict[str, tuple[list[int], list[int]]]:
    """Per session: the epochs of its ``session_registered`` and of its ``session_ended``
    rows (from their idempotency keys ``kind:session:epoch``), sorted."""
    with engine.connect() as conn:
        keys = conn.execute(
            text(
                "SELECT idempotency_key FROM events WHERE event_type IN "
                "('session_registered', 'session_ended')"
            )
        ).scalars()
        out: dict[str, tuple[list[int], list[int]]] = {}
        for key in keys:
            kind, session, epoch = key.rsplit(":", 2)
            regs, ends = out.setdefault(session, ([], []))
            (regs if kind == "session_registered" else ends).append(int(epoch))
    return {s: (sorted(r), sorted(e)) for s, (r, e) in out.items()}


def assert_epochs(engine: Engine, context: str) -> dict[str, tuple[list[int], list[int]]]:
    """Each session's registrations are epochs 1..n, each once; each ended epoch was
    registered, ended once, and every epoch but the last one ended (before the next)."""
    epochs = lifecycle_epochs(engine)
    bad = []
    for session, (regs, ends) in epochs.items():
        n = len(regs)
        once = regs == list(range(1, n + 1)) and len(set(ends)) == len(ends)
        if not once or not set(range(1, n)) <= set(ends) <= set(regs):
            bad.append((session, regs, ends))
    assert not bad, f"{context}: session epochs wrong (session, registered, ended): {bad[:5]}"
    return epochs
