"""Schema migrations (Alembic): revision 0001 is the pre-migration schema, ``init-db`` upgrades
a database made by the pre-migration code in place (every row kept, ingest continuing exactly
once), the migrated schema equals the tables of ``store.schema``, and the lock serialises upgrades.

"A database made by the pre-migration code" comes from tests/fixtures/schema_v1.py, the frozen
copy of that code.
"""

from __future__ import annotations

import contextlib
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from fixtures import schema_v1
from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url
from watcher_helpers import (
    WatcherEnv,
    append,
    assistant,
    conversation,
    new_uuid,
    other,
    project_dir,
    rows,
    scalar,
    turn_texts,
    user,
    wait_for,
)

from headspace_watcher.service import health
from headspace_watcher.store import heartbeats, migrations
from headspace_watcher.store import migrate as db
from headspace_watcher.store.engine import make_engine
from headspace_watcher.store.schema import metadata

OWNER_ROLE = "headspace_owner_nosuper"
OWNER_PASSWORD = "owner-pw-for-tests"  # the test cluster asks every other role for SCRAM


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def make_database(pg_cluster: Any, request: pytest.FixtureRequest) -> Iterator[Callable[..., str]]:
    """``make_database(owner=None)`` → URL of a new, empty database (no schema), dropped after
    the test; with ``owner`` the database belongs to that role and the URL logs in as it."""
    made: list[str] = []

    def make(owner: str | None = None) -> str:
        name = f"m_{request.node.name[:30].lower()}_{uuid.uuid4().hex[:8]}"
        name = "".join(ch if ch.isalnum() else "_" for ch in name)
        pg_cluster.create_database(name)
        made.append(name)
        url = pg_cluster.url(name)
        if owner is None:
            return url
        with pg_cluster.connect("postgres") as conn:
            conn.execute(f'ALTER DATABASE "{name}" OWNER TO {owner}')
        return (
            make_url(url)
            .set(username=owner, password=OWNER_PASSWORD)
            .render_as_string(hide_password=False)
        )

    try:
        yield make
    finally:
        for name in made:
            pg_cluster.drop_database(name)


@pytest.fixture
def engines() -> Iterator[Callable[[str], Engine]]:
    """``engines(url)`` → an engine disposed after the test."""
    made: list[Engine] = []

    def make(url: str) -> Engine:
        made.append(make_engine(url))
        return made[-1]

    try:
        yield make
    finally:
        for engine in made:
            engine.dispose()


@pytest.fixture
def owner_role(pg_cluster: Any) -> str:
    """A login role that is neither superuser nor allowed to create databases or roles."""
    with pg_cluster.connect("postgres") as conn:
        if not conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (OWNER_ROLE,)).fetchone():
            conn.execute(
                f"CREATE ROLE {OWNER_ROLE} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE "
                f"PASSWORD '{OWNER_PASSWORD}'"
            )
    return OWNER_ROLE


def revision_of(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return migrations.current(conn)


def create_v1(engine: Engine) -> None:
    """A database exactly as the pre-migration ``init_db`` left it."""
    assert schema_v1.init_db(engine) == 1
    assert revision_of(engine) is None


# --------------------------------------------------------------------------- catalog


def catalog(engine: Engine) -> dict[str, list[tuple[Any, ...]]]:
    """Everything about the public schema that create_all decides: columns (types, defaults,
    nullability, identity), constraints (names, definitions), indexes (names, definitions),
    sequences — without Alembic's own version table."""
    queries = {
        "columns": """
            SELECT table_name, column_name, ordinal_position, data_type, is_nullable,
                   column_default, is_identity, identity_generation
            FROM information_schema.columns
            WHERE table_schema = 'public' AND table_name <> 'alembic_version'
            ORDER BY 1, 3""",
        "constraints": """
            SELECT conrelid::regclass::text, conname, contype, pg_get_constraintdef(oid)
            FROM pg_constraint
            WHERE connamespace = 'public'::regnamespace
              AND conrelid::regclass::text <> 'alembic_version'
            ORDER BY 1, 2""",
        "indexes": """
            SELECT tablename, indexname, indexdef FROM pg_indexes
            WHERE schemaname = 'public' AND tablename <> 'alembic_version'
            ORDER BY 1, 2""",
        "sequences": """
            SELECT sequencename, data_type, start_value, increment_by FROM pg_sequences
            WHERE schemaname = 'public' ORDER BY 1""",
        "schema_rows": "SELECT id, version FROM headspace_schema ORDER BY id",
    }
    with engine.connect() as conn:
        return {k: [tuple(r) for r in conn.execute(text(q))] for k, q in queries.items()}


def snapshot(engine: Engine) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every pre-migration table (its pre-migration columns), by primary key."""
    out: dict[str, list[tuple[Any, ...]]] = {}
    with engine.connect() as conn:
        for table in schema_v1.metadata.sorted_tables:
            cols = ", ".join(f'"{c.name}"' for c in table.columns)
            keys = ", ".join(f'"{c.name}"' for c in table.primary_key.columns)
            sql = f'SELECT {cols} FROM "{table.name}" ORDER BY {keys}'
            out[table.name] = [tuple(r) for r in conn.execute(text(sql))]
    return out


# --------------------------------------------------------------------------- revision 0001


def test_revision_files_are_the_chain_alembic_reads() -> None:
    """``head()`` comes from the file names (no Alembic import on every connect): the files
    must be exactly Alembic's chain, numbered in order."""
    chain = migrations.alembic_chain()
    assert list(migrations.shipped()) == chain
    assert chain == [f"{n:04d}" for n in range(1, len(chain) + 1)]
    assert migrations.head() == chain[-1]


def test_revision_0001_is_exactly_the_pre_migration_schema(make_database, engines) -> None:
    migrated, frozen = engines(make_database()), engines(make_database())
    with migrated.begin() as conn:  # what init_db did when 0001 was head
        migrations.upgrade(conn, migrations.BASELINE)
        conn.execute(text("INSERT INTO headspace_schema (id, version) VALUES (1, 1)"))
    create_v1(frozen)

    got, want = catalog(migrated), catalog(frozen)
    for part in want:
        assert got[part] == want[part], f"{part} differ between revision 0001 and create_all"
    assert {r[0] for r in want["columns"]} == migrations.BASELINE_TABLES


def test_migrated_schema_equals_db_metadata(db_engine) -> None:
    """The drift guard: a change to db.py's tables without a revision fails here."""
    with db_engine.connect() as conn:
        context = MigrationContext.configure(
            conn, opts={"compare_type": True, "compare_server_default": True}
        )
        diff = compare_metadata(context, metadata)
    assert diff == [], f"store.schema.metadata and the migrations disagree (add a revision): {diff}"
    assert revision_of(db_engine) == migrations.head()


# --------------------------------------------------------------------------- upgrade in place


PENDING = 20  # bytes of the last line of s1 not yet written when init-db runs


def _tree(root: Path) -> tuple[dict[str, Path], bytes]:
    """Two projects, three sessions and a subagent: turns, rejected lines, skipped lines, and
    a last line still being written (its missing tail is returned)."""
    s1, s2, s3 = new_uuid(), new_uuid(), new_uuid()
    demo, other_project = project_dir(root), project_dir(root, "-home-dev-src-other")
    files = {
        "s1": demo / f"{s1}.jsonl",
        "s2": demo / f"{s2}.jsonl",
        "s3": other_project / f"{s3}.jsonl",
        "sub": demo / s1 / "subagents" / "agent-a1.jsonl",
    }
    last = user(s1, "s1 last")
    append(files["s1"], *conversation(s1, 6), b"{not json\n", other(s1), last[:-PENDING])
    append(files["s2"], *conversation(s2, 3), b"\xff\xfe invalid utf-8\n")
    append(files["s3"], other(s3), *conversation(s3, 4, cwd="/home/dev/src/other"))
    append(files["sub"], assistant(s1, "subagent says", agentId="a1"), b"[1, 2]\n")
    return files, last[-PENDING:]


def _append_more(files: dict[str, Path], pending: bytes) -> list[str]:
    """Finish the half-written line and add turns, a rejection and a new session file."""
    append(files["s1"], pending, assistant(files["s1"].stem, "after upgrade s1"))
    append(files["s2"], user(files["s2"].stem, "after upgrade s2"), b"nope\n")
    s4 = new_uuid()
    append(files["s1"].parent / f"{s4}.jsonl", *conversation(s4, 2))
    return ["s1 last", "after upgrade s1", "after upgrade s2", f"turn 1 of {s4[:8]}"]


def _frozen_init_writable(engine: Engine) -> int:
    version = schema_v1.init_db(engine)
    schema_v1.add_later_columns(engine)
    return version


def test_pre_migration_database_upgrades_in_place_and_ingest_continues_exactly_once(
    tmp_path, make_database, engines, monkeypatch, exactly_once
) -> None:
    url = make_database()
    engine = engines(url)
    create_v1(engine)
    watcher = WatcherEnv.create(tmp_path, url)
    try:
        files, pending = _tree(watcher.root)
        # Ingest as the pre-migration service did: its connect ran the frozen init_db. The
        # columns later revisions add exist only while it writes, as main's code never
        # wrote them; they are dropped again, so the database is exactly main's shape.
        with monkeypatch.context() as patch:
            patch.setattr("headspace_watcher.store.migrate.init_db", _frozen_init_writable)
            service = watcher.run_once()
        # `run --once` never beats; a running watcher does, with this call.
        heartbeats.beat(engine, health.watcher_id(watcher.config()), service.snapshot())
        schema_v1.drop_later_columns(engine)
        assert revision_of(engine) is None, "the first ingest must stay pre-migration"
        before = snapshot(engine)
        empty = [t for t, r in before.items() if not r]
        assert empty == [], f"no rows to keep in {empty}: the fixture tree is too thin"
        exactly_once(engine, watcher.root, max_line_bytes=watcher.max_line_bytes)

        added = _append_more(files, pending)
        for _ in range(2):  # the second run finds the database at head
            done = watcher.cli("init-db")
            assert done.returncode == 0, done.stderr
            assert f"schema version {migrations.schema_version(migrations.head())} " in done.stdout
        assert revision_of(engine) == migrations.head()
        after = snapshot(engine)
        head_version = migrations.schema_version(migrations.head())
        assert [r[1] for r in after.pop("headspace_schema")] == [head_version]
        before.pop("headspace_schema")
        assert after == before, "init-db changed or lost rows"

        events_before = len(before["events"])
        watcher.run_once()
        exactly_once(engine, watcher.root, max_line_bytes=watcher.max_line_bytes)
        texts = turn_texts(engine)
        for turn in added:
            assert texts.count(turn) == 1, f"{turn!r} stored {texts.count(turn)} times"
        new_rows = scalar(engine, "SELECT count(*) FROM events WHERE id > :m", m=max_id(before))
        assert scalar(engine, "SELECT count(*) FROM events") == events_before + new_rows
        kept = rows(engine, "SELECT id FROM events WHERE id <= :m ORDER BY id", m=max_id(before))
        assert [r.id for r in kept] == [r[0] for r in before["events"]]
    finally:
        watcher.close()


def max_id(snap: dict[str, list[tuple[Any, ...]]]) -> int:
    return max(r[0] for r in snap["events"])


# --------------------------------------------------------------------------- the lock


@contextlib.contextmanager
def holding_init_lock(engine: Engine) -> Iterator[None]:
    """Another init-db run, mid-upgrade: init_db's advisory lock held by a second session."""
    with engine.connect() as conn:
        conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": db._INIT_LOCK_KEY})
        try:
            yield
        finally:
            conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": db._INIT_LOCK_KEY})


def _in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(fn())
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def test_init_db_at_head_does_not_wait_for_the_lock(db_engine) -> None:
    """The path every service connect and every test fixture takes: no lock, no upgrade."""
    with holding_init_lock(db_engine):
        _thread, outcome = _in_thread(lambda: db.init_db(db_engine))
        wait_for(lambda: outcome, "init_db at head to return while another run holds the lock")
    assert outcome == [migrations.schema_version(migrations.head())]


def test_upgrade_waits_for_a_concurrent_init_db(make_database, engines) -> None:
    engine = engines(make_database())
    with holding_init_lock(engine):
        thread, outcome = _in_thread(lambda: db.init_db(engine))
        wait_for(
            lambda: scalar(
                engine,
                "SELECT count(*) FROM pg_locks "
                "WHERE locktype = 'advisory' AND objid = :k AND NOT granted",
                k=db._INIT_LOCK_KEY,
            ),
            "the upgrade to wait for the advisory lock",
            details=lambda: repr(outcome),
        )
        assert revision_of(engine) is None
    thread.join(timeout=30)
    assert outcome == [migrations.schema_version(migrations.head())]
    assert revision_of(engine) == migrations.head()


def test_concurrent_init_db_commands_on_an_empty_database(tmp_path, make_database) -> None:
    watcher = WatcherEnv.create(tmp_path, make_database())
    procs = [
        subprocess.Popen(
            [*watcher.command(), "init-db"],
            env=watcher.env_vars(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    results = [(p.wait(timeout=60), *p.communicate()) for p in procs]
    assert [r[0] for r in results] == [0, 0, 0], results


# --------------------------------------------------------------------------- roles, refusals


@pytest.mark.parametrize("start", ["empty", "pre-migration"])
def test_init_db_as_a_non_superuser_database_owner(
    start, tmp_path, make_database, engines, owner_role
) -> None:
    url = make_database(owner=owner_role)
    engine = engines(url)
    assert scalar(engine, "SELECT rolsuper FROM pg_roles WHERE rolname = current_user") is False
    if start == "pre-migration":
        create_v1(engine)
    done = WatcherEnv.create(tmp_path, url).cli("init-db")
    assert done.returncode == 0, done.stderr
    assert revision_of(engine) == migrations.head()


def test_tables_without_a_schema_version_are_refused_untouched(make_database, engines) -> None:
    engine = engines(make_database())
    with engine.begin() as conn:
        schema_v1.projects.create(conn)
    with pytest.raises(db.SchemaError, match="refusing"):
        db.init_db(engine)
    assert revision_of(engine) is None
    tables = rows(engine, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    assert [r.tablename for r in tables] == ["projects"]


def test_a_database_ahead_of_the_code_is_refused_untouched(db_engine) -> None:
    with db_engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    refusal = f"revision 9999, newer than this code's {migrations.head()}"
    with pytest.raises(db.SchemaError, match=refusal):
        db.init_db(db_engine)
    assert revision_of(db_engine) == "9999"
