"""Fixtures of the chaos suite: a :class:`harness.ChaosEnv` on a fresh database."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import ChaosEnv

from headspace_watcher.store.embedded import PgCluster
from headspace_watcher.store.engine import make_engine


@pytest.fixture
def chaos_env(tmp_path: Path, database_url: str) -> Iterator[ChaosEnv]:
    """A tree, state dir and config for the real service, on the test's own database."""
    engine = make_engine(database_url, pool_size=2, max_overflow=4)
    env = ChaosEnv(tmp_path, database_url, engine)
    try:
        yield env
    finally:
        env.close()
        engine.dispose()


@pytest.fixture
def chaos_env_own_pg(tmp_path: Path, own_pg_cluster: PgCluster) -> Iterator[ChaosEnv]:
    """Like ``chaos_env``, on a PostgreSQL server of the test's own (``own_pg_cluster``),
    which the test may stop, kill and start."""
    url = own_pg_cluster.url()
    engine = make_engine(url, pool_size=2, max_overflow=4, connect_timeout=2)
    env = ChaosEnv(tmp_path, url, engine)
    try:
        yield env
    finally:
        env.close()
        engine.dispose()
