"""Engine creation: the one place that decides how we connect to PostgreSQL."""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import Engine, create_engine, event, exc
from sqlalchemy.engine import URL, Dialect, make_url
from sqlalchemy.pool import ConnectionPoolEntry

_TLS_SSLMODES = frozenset({"require", "verify-ca", "verify-full"})
# a connection back in the pool for less than this is used without a ping: the batches of a
# backlog follow each other within milliseconds (a ping each was a round trip per batch)
PING_AFTER_IDLE_S = 1.0
_CHECKED_IN_AT = "headspace_checked_in_at"


def auth_requirements(url: str | URL) -> dict[str, str]:
    """libpq options that keep a password from reaching a server that cannot prove it knows it.

    A squatter on the port (or any impostor) would otherwise just ask for the password in
    cleartext and libpq would send it.  ``require_auth=scram-sha-256`` makes libpq refuse
    cleartext, MD5 and "no authentication at all" with a clear error; over TLS,
    ``channel_binding=require`` also ties the SCRAM exchange to the certificate (no relay).
    A URL that sets either option itself is left alone (a deliberate choice of its owner).
    """
    parsed = make_url(url) if isinstance(url, str) else url
    if parsed.password is None:
        return {}
    query = parsed.query
    options: dict[str, str] = {}
    if "require_auth" not in query:
        options["require_auth"] = "scram-sha-256"
    if "channel_binding" not in query and query.get("sslmode") in _TLS_SSLMODES:
        options["channel_binding"] = "require"
    return options


def make_engine(
    url: str, *, connect_timeout: int = 5, ping_idle_s: float = 0.0, **kwargs: Any
) -> Engine:
    """An engine for the watcher: small pool, pre-ping (with ``ping_idle_s`` > 0 only of a
    connection idle that long: :func:`ping_when_idle`), bounded connect time, and no
    password for a server that does not prove it knows it (:func:`auth_requirements`)."""
    connect_args = {"connect_timeout": connect_timeout, "application_name": "headspace-watcher"}
    connect_args.update(auth_requirements(url))
    engine = create_engine(
        url,
        pool_size=kwargs.pop("pool_size", 2),
        max_overflow=kwargs.pop("max_overflow", 2),
        pool_pre_ping=ping_idle_s <= 0,
        connect_args=connect_args,
        **kwargs,
    )
    if ping_idle_s > 0:
        ping_when_idle(engine, ping_idle_s)
    return engine


def ping_when_idle(engine: Engine, idle_s: float = PING_AFTER_IDLE_S) -> None:
    """``pool_pre_ping``, but only for a connection idle in the pool for ``idle_s`` or more.

    A dead connection (server restarted, idle session killed) is found and replaced before
    use, as with ``pool_pre_ping`` (every pooled connection older is discarded too); one
    used a moment ago is not pinged. If that one died in between, the statement fails as a
    transient error and the writer's retry (or the loop's reconnect) takes a fresh one.
    """
    dialect = engine.dialect

    def checkin(_dbapi: Any, record: ConnectionPoolEntry) -> None:
        record.info[_CHECKED_IN_AT] = time.monotonic()

    def checkout(dbapi: Any, record: ConnectionPoolEntry, _proxy: Any) -> None:
        since = record.info.get(_CHECKED_IN_AT)
        if since is not None and time.monotonic() - since >= idle_s:
            _ping(dialect, dbapi)

    event.listen(engine.pool, "checkin", checkin)
    event.listen(engine.pool, "checkout", checkout)


def _ping(dialect: Dialect, dbapi: Any) -> None:
    """A round trip; a lost connection makes the pool reconnect (and drop older ones)."""
    try:
        dialect.do_ping(dbapi)
    except dialect.loaded_dbapi.Error as err:
        if dialect.is_disconnect(err, dbapi, None):
            raise exc.InvalidatePoolError() from err
        raise
