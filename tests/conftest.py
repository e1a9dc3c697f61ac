"""Shared fixtures for the whole test suite.

PostgreSQL: one throwaway server per session (``pg_cluster``), a fresh database with the
schema per test (``database_url``), and a dedicated server a test may stop, kill and restart
(``own_pg_cluster``).  Set ``HEADSPACE_TEST_DATABASE_URL`` (a SQLAlchemy URL to a database
on a server whose user may CREATE/DROP DATABASE) to use an existing server instead of the
session one.

Clusters live under a fresh directory in ``/tmp`` made world-traversable, because when the
suite runs as root the server runs as an unprivileged user that must reach its data dir.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from pg_servers import ExternalServer, PgServer

from headspace_watcher.store.embedded import PgCluster

REPO_ROOT = Path(__file__).resolve().parents[1]
TEST_DATABASE_URL_ENV = "HEADSPACE_TEST_DATABASE_URL"
TRANSCRIPTS_ENV = "HEADSPACE_TEST_TRANSCRIPTS"

# --------------------------------------------------------------------------------------------
# PostgreSQL
# --------------------------------------------------------------------------------------------


def _unique_db_name(request: pytest.FixtureRequest, prefix: str = "t") -> str:
    """Readable (test name) and unique (random suffix); within PostgreSQL's 63 bytes."""
    stem = re.sub(r"[^a-z0-9]+", "_", request.node.name.lower()).strip("_")[:40]
    return f"{prefix}_{stem}_{uuid.uuid4().hex[:8]}"


def _init_schema(url: str) -> None:
    from headspace_watcher.store.engine import make_engine
    from headspace_watcher.store.migrate import init_db

    engine = make_engine(url)
    try:
        init_db(engine)
    finally:
        engine.dispose()


@pytest.fixture(scope="session")
def pg_tmp_root() -> Iterator[Path]:
    """A world-traversable directory for this session's clusters, removed at the end."""
    root = Path(tempfile.mkdtemp(prefix="headspace-pytest-", dir="/tmp"))
    os.chmod(root, 0o755)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_cluster(pg_tmp_root: Path) -> Iterator[PgServer]:
    """The session's server: a throwaway :class:`PgCluster` (fsync on), or the server of
    ``$HEADSPACE_TEST_DATABASE_URL`` when set.  Do not stop it; use ``own_pg_cluster``."""
    external = os.environ.get(TEST_DATABASE_URL_ENV)
    if external:
        yield ExternalServer(external)
        return
    cluster = PgCluster(pg_tmp_root / "session")
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture
def database_url(pg_cluster: PgServer, request: pytest.FixtureRequest) -> Iterator[str]:
    """SQLAlchemy URL of a fresh database holding the schema (``init_db``), dropped after
    the test (open sessions are terminated)."""
    name = _unique_db_name(request)
    pg_cluster.create_database(name)
    try:
        url = pg_cluster.url(name)
        _init_schema(url)
        yield url
    finally:
        pg_cluster.drop_database(name)


@pytest.fixture
def own_pg_cluster(pg_tmp_root: Path) -> Iterator[PgCluster]:
    """A running server of this test's own, free to ``stop()``/``kill()``/``start()``
    (outage tests; the port stays the same across restarts).  ``own_pg_cluster.url()`` is a
    database with the schema."""
    cluster = PgCluster(pg_tmp_root / f"own-{uuid.uuid4().hex[:8]}", dbname="headspace_test")
    try:
        cluster.start()
        cluster.create_database(cluster.dbname)
        _init_schema(cluster.url())
        yield cluster
    finally:
        cluster.destroy()


# --------------------------------------------------------------------------------------------
# Shared data
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def shared_transcripts() -> Path:
    """Real Claude Code transcripts: ``$HEADSPACE_TEST_TRANSCRIPTS``, else
    ``../shared/transcripts`` beside the checkout (read in place, never copied)."""
    override = os.environ.get(TRANSCRIPTS_ENV)
    path = Path(override) if override else REPO_ROOT.parent / "shared" / "transcripts"
    if not path.is_dir():
        pytest.skip(
            f"shared transcripts not available: {path} does not exist (set {TRANSCRIPTS_ENV})"
        )
    return path


# --------------------------------------------------------------------------------------------
# Transcripts: the contract's rule computed independently, and the exactly-once invariant
# (used by the tailer/service/CLI tests and meant for the chaos tests too)
# --------------------------------------------------------------------------------------------

DEFAULT_MAX_LINE_BYTES = 64 * 1024 * 1024


def classify_transcript_line(raw: bytes, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> str:
    """``turn`` | ``reject`` | ``skip`` for one complete line (without its ``\\n``), straight
    from INTERFACE.md — written apart from ``transcript.py`` on purpose."""
    import json

    if len(raw) > max_line_bytes:
        return "reject"
    try:
        decoded = raw.decode("utf-8")
    except UnicodeDecodeError:
        return "reject"
    if not decoded.strip():
        return "skip"
    try:
        obj = json.loads(decoded)
    except (ValueError, RecursionError):
        return "reject"
    if not isinstance(obj, dict):
        return "reject"
    if obj.get("type") not in ("user", "assistant"):
        return "skip"
    message = obj.get("message")
    content = message.get("content") if isinstance(message, dict) else None
    if isinstance(content, str):
        return "turn" if content.strip() else "skip"
    if isinstance(content, list):
        for block in content:
            if (
                isinstance(block, dict)
                and block.get("type") == "text"
                and isinstance(block.get("text"), str)
                and block["text"].strip()
            ):
                return "turn"
    return "skip"


class ExpectedFile:
    """What the contract says one transcript file must produce, line by line."""

    def __init__(self, path: str, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> None:
        with open(path, "rb") as f:
            data = f.read()
        self.path = path
        self.size = len(data)
        self.committed_offset = data.rfind(b"\n") + 1  # bytes up to the last newline
        self.turns: list[int] = []
        self.rejects: list[int] = []
        self.skips: list[int] = []
        self.lengths: dict[int, int] = {}
        offset = 0
        for raw in data.split(b"\n")[:-1]:  # the last piece is partial (or empty)
            kind = classify_transcript_line(raw, max_line_bytes)
            {"turn": self.turns, "reject": self.rejects, "skip": self.skips}[kind].append(offset)
            self.lengths[offset] = len(raw)
            offset += len(raw) + 1

    @property
    def complete_lines(self) -> int:
        return len(self.turns) + len(self.rejects) + len(self.skips)


def transcript_files(projects_root: Path) -> list[str]:
    """Every watched file per INTERFACE.md: ``<project>/*.jsonl`` and
    ``<project>/<uuid>/subagents/*.jsonl``."""
    root = Path(os.path.abspath(projects_root))
    found = [*root.glob("*/*.jsonl"), *root.glob("*/*/subagents/*.jsonl")]
    return sorted(str(p) for p in found if p.is_file())


def assert_exactly_once(
    engine,  # type: ignore[no-untyped-def]
    projects_root: Path,
    *,
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
    files: list[str] | None = None,
) -> dict[str, ExpectedFile]:
    """Every complete line of every watched file accounted for exactly once.

    Per file (its current generation): ``committed_offset`` == bytes up to the last ``\\n``,
    ``lines_committed`` == complete lines, one ``turn_detected`` row at exactly each turn line,
    one ``rejected_events`` row (with the line's full length) at exactly each rejected line,
    neither at a skipped line; and no two rows anywhere share a source position.
    Returns the expectations per path (for totals).
    """
    from sqlalchemy import text

    paths = transcript_files(projects_root) if files is None else sorted(files)
    expected = {p: ExpectedFile(p, max_line_bytes) for p in paths}
    with engine.connect() as conn:
        dup_events = conn.execute(
            text(
                "SELECT source_id, source_generation, source_offset, source_seq, count(*) "
                "FROM events WHERE source_id IS NOT NULL "
                "GROUP BY 1, 2, 3, 4 HAVING count(*) > 1"
            )
        ).all()
        dup_rejects = conn.execute(
            text(
                "SELECT source_id, source_generation, byte_offset, source_seq, count(*) "
                "FROM rejected_events WHERE source_id IS NOT NULL "
                "GROUP BY 1, 2, 3, 4 HAVING count(*) > 1"
            )
        ).all()
        srcs = {
            r.path: r
            for r in conn.execute(
                text(
                    "SELECT id, path, generation, committed_offset, lines_committed "
                    "FROM sources WHERE path = ANY(:p)"
                ),
                {"p": paths},
            )
        }
        ids = [r.id for r in srcs.values()]
        turn_rows = conn.execute(
            text(
                "SELECT source_id, source_generation, source_offset FROM events "
                "WHERE event_type = 'turn_detected' AND source_id = ANY(:ids)"
            ),
            {"ids": ids},
        ).all()
        reject_rows = conn.execute(
            text(
                "SELECT source_id, source_generation, byte_offset, raw_length "
                "FROM rejected_events WHERE source_id = ANY(:ids)"
            ),
            {"ids": ids},
        ).all()
    assert not dup_events, f"events stored twice at one source position: {dup_events}"
    assert not dup_rejects, f"rejections stored twice at one source position: {dup_rejects}"

    # grouped once by stream and generation: a scan per file is quadratic in a large tree
    turns_of: dict[tuple[int, int], list[int]] = {}
    for r in turn_rows:
        turns_of.setdefault((r.source_id, r.source_generation), []).append(r.source_offset)
    rejects_of: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for r in reject_rows:
        key = (r.source_id, r.source_generation)
        rejects_of.setdefault(key, []).append((r.byte_offset, r.raw_length))
    problems: list[str] = []
    for path, exp in expected.items():
        src = srcs.get(path)
        if src is None:
            if exp.complete_lines:
                problems.append(f"{path}: {exp.complete_lines} complete lines, never ingested")
            continue
        turns = sorted(turns_of.get((src.id, src.generation), []))
        rejects = sorted(rejects_of.get((src.id, src.generation), []))
        want_rejects = [(o, exp.lengths[o]) for o in exp.rejects]
        if src.committed_offset != exp.committed_offset:
            problems.append(
                f"{path}: committed_offset {src.committed_offset} != {exp.committed_offset}"
            )
        if src.lines_committed != exp.complete_lines:
            problems.append(
                f"{path}: lines_committed {src.lines_committed} != {exp.complete_lines}"
            )
        if turns != exp.turns:
            problems.append(
                f"{path}: {len(turns)} turn rows, expected {len(exp.turns)} "
                f"(missing at {sorted(set(exp.turns) - set(turns))[:5]}, "
                f"unexpected at {sorted(set(turns) - set(exp.turns))[:5]})"
            )
        if rejects != want_rejects:
            problems.append(f"{path}: rejected rows {rejects[:5]} != expected {want_rejects[:5]}")
    assert not problems, "exactly-once violated:\n" + "\n".join(problems)
    return expected


@pytest.fixture
def exactly_once():  # type: ignore[no-untyped-def]
    """The invariant as a fixture: ``exactly_once(engine, projects_root, max_line_bytes=…)``."""
    return assert_exactly_once


@pytest.fixture
def expected_transcript():  # type: ignore[no-untyped-def]
    """``expected_transcript(path, max_line_bytes)`` → :class:`ExpectedFile` (INTERFACE rule)."""
    return ExpectedFile


# --------------------------------------------------------------------------------------------
# The watcher under test (tests/watcher_helpers.py)
# --------------------------------------------------------------------------------------------


@pytest.fixture
def db_engine(database_url: str) -> Iterator[object]:
    """A SQLAlchemy engine on the test's fresh database."""
    from headspace_watcher.store.engine import make_engine

    engine = make_engine(database_url)
    try:
        yield engine
    finally:
        engine.dispose()


@pytest.fixture
def watcher(tmp_path: Path, database_url: str) -> Iterator[object]:
    """A :class:`watcher_helpers.WatcherEnv`: ``root`` (projects path, empty), ``state_dir``,
    a config file with small limits, ``run_once()`` in-process, ``start()`` / ``cli()`` as the
    real console script. Processes started are stopped at the end."""
    from watcher_helpers import WatcherEnv

    env = WatcherEnv.create(tmp_path, database_url)
    try:
        yield env
    finally:
        env.close()


@pytest.fixture
def password_database_url(pg_cluster: PgServer, database_url: str) -> str:
    """``database_url`` reached as a role that has a password (secrets-masking tests)."""
    from sqlalchemy.engine import make_url
    from watcher_helpers import create_password_role

    try:
        return create_password_role(pg_cluster, make_url(database_url).database or "")
    except Exception as exc:  # e.g. an external server whose user may not create roles
        pytest.skip(f"cannot create a role with a password: {exc}")
