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

from headspace_watcher.pgserver import ExternalServer, PgCluster, PgServer

REPO_ROOT = Path(__file__).resolve().parents[1]
TEST_DATABASE_URL_ENV = "HEADSPACE_TEST_DATABASE_URL"

# --------------------------------------------------------------------------------------------
# PostgreSQL
# --------------------------------------------------------------------------------------------


def _unique_db_name(request: pytest.FixtureRequest, prefix: str = "t") -> str:
    """Readable (test name) and unique (random suffix); within PostgreSQL's 63 bytes."""
    stem = re.sub(r"[^a-z0-9]+", "_", request.node.name.lower()).strip("_")[:40]
    return f"{prefix}_{stem}_{uuid.uuid4().hex[:8]}"


def _init_schema(url: str) -> None:
    from headspace_watcher.db import init_db, make_engine

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
    """Real Claude Code transcripts in ``../shared/transcripts`` beside the checkout."""
    path = Path(__file__).resolve().parents[1].parent / "shared" / "transcripts"
    if not path.is_dir():
        pytest.skip(f"shared transcripts not available: {path} does not exist")
    return path
