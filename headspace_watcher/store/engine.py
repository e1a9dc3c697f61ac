"""Engine creation: the one place that decides how we connect to PostgreSQL."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, create_engine
from sqlalchemy.engine import URL, make_url

_TLS_SSLMODES = frozenset({"require", "verify-ca", "verify-full"})


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


def make_engine(url: str, *, connect_timeout: int = 5, **kwargs: Any) -> Engine:
    """An engine for the watcher: small pool, pre-ping, bounded connect time, and no
    password for a server that does not prove it knows it (:func:`auth_requirements`)."""
    connect_args = {"connect_timeout": connect_timeout, "application_name": "headspace-watcher"}
    connect_args.update(auth_requirements(url))
    return create_engine(
        url,
        pool_size=kwargs.pop("pool_size", 2),
        max_overflow=kwargs.pop("max_overflow", 2),
        pool_pre_ping=True,
        connect_args=connect_args,
        **kwargs,
    )
