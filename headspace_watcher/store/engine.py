"""Engine creation: the one place that decides how we connect to PostgreSQL."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, create_engine


def make_engine(url: str, *, connect_timeout: int = 5, **kwargs: Any) -> Engine:
    """An engine for the watcher: small pool, pre-ping, bounded connect time."""
    return create_engine(
        url,
        pool_size=kwargs.pop("pool_size", 2),
        max_overflow=kwargs.pop("max_overflow", 2),
        pool_pre_ping=True,
        connect_args={"connect_timeout": connect_timeout, "application_name": "headspace-watcher"},
        **kwargs,
    )
