"""The configured database for PostgreSQL's own tools: a libpq URL, and ``psql``/``pg_dump``
started on it with the password in their environment.

The service speaks SQLAlchemy URLs (``postgresql+psycopg://…``); psql, pg_dump and most other
tools want libpq's ``postgresql://…`` and do not know the embedded server's socket or its
generated password.  Both come from here, so a user never copies a password by hand.  The
password is never put on a command line (``ps`` shows those to every local user): libpq
reads ``PGPASSWORD`` from the environment, which only the same user (and root) can read.
``require_auth=scram-sha-256`` is kept (:func:`store.engine.auth_requirements`): the tool
refuses a server that asks for the password in cleartext instead of proving it knows it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from sqlalchemy.engine import URL, make_url

from headspace_watcher.config import Config
from headspace_watcher.store import embedded
from headspace_watcher.store.engine import auth_requirements

# libpq connection parameters that have an environment variable (libpq docs, 32.15)
_PARAM_ENV = {
    "host": "PGHOST",
    "hostaddr": "PGHOSTADDR",
    "port": "PGPORT",
    "dbname": "PGDATABASE",
    "user": "PGUSER",
    "password": "PGPASSWORD",
    "passfile": "PGPASSFILE",
    "require_auth": "PGREQUIREAUTH",
    "channel_binding": "PGCHANNELBINDING",
    "service": "PGSERVICE",
    "options": "PGOPTIONS",
    "application_name": "PGAPPNAME",
    "sslmode": "PGSSLMODE",
    "sslnegotiation": "PGSSLNEGOTIATION",
    "sslcompression": "PGSSLCOMPRESSION",
    "sslcert": "PGSSLCERT",
    "sslkey": "PGSSLKEY",
    "sslrootcert": "PGSSLROOTCERT",
    "sslcrl": "PGSSLCRL",
    "sslcrldir": "PGSSLCRLDIR",
    "sslsni": "PGSSLSNI",
    "requirepeer": "PGREQUIREPEER",
    "ssl_min_protocol_version": "PGSSLMINPROTOCOLVERSION",
    "ssl_max_protocol_version": "PGSSLMAXPROTOCOLVERSION",
    "gssencmode": "PGGSSENCMODE",
    "krbsrvname": "PGKRBSRVNAME",
    "gsslib": "PGGSSLIB",
    "gssdelegation": "PGGSSDELEGATION",
    "connect_timeout": "PGCONNECT_TIMEOUT",
    "client_encoding": "PGCLIENTENCODING",
    "target_session_attrs": "PGTARGETSESSIONATTRS",
    "load_balance_hosts": "PGLOADBALANCEHOSTS",
}
EMBEDDED_START_HINT = (
    "start it with `just run` (or, on its own: "
    ".venv/bin/python -m headspace_watcher.store.embedded serve)"
)


class ClientError(Exception):
    """The database cannot be handed to psql/pg_dump (the message says why and what to do)."""


def embedded_not_running(config: Config) -> str | None:
    """Why the embedded server cannot be reached now, with how to start it; None when it
    listens (or an external database is configured).  When its last start was refused
    (port taken…), that reason is given first."""
    if not config.uses_embedded_database:
        return None
    port = config.database.embedded_port
    try:
        socket_file: Path | None = embedded.embedded_socket_file(config.state_dir, port)
    except OSError:
        socket_file = None
    if socket_file is not None and socket_file.exists():
        return None
    try:
        embedded.database_url(config)
    except embedded.PgServerError as exc:  # a recorded refusal, or nothing set up yet
        return f"{exc}; then {EMBEDDED_START_HINT}"
    return (
        f"the embedded PostgreSQL is not running (state dir {config.state_dir}, no socket "
        f"{socket_file}): {EMBEDDED_START_HINT}"
    )


def libpq_url(config: Config) -> URL:
    """The configured database as a libpq URL (``postgresql://``), password included, with
    the same authentication requirement the service connects with."""
    problem = embedded_not_running(config)
    if problem:
        raise ClientError(problem)
    try:
        url = make_url(embedded.database_url(config))
    except embedded.PgServerError as exc:
        raise ClientError(str(exc)) from None
    query = dict(url.query)
    query.update(auth_requirements(url))
    return url.set(drivername="postgresql", query=query)


def render(url: URL, *, show_password: bool) -> str:
    """``postgresql://user:***@/db?host=…``; the password only when asked for."""
    return url.render_as_string(hide_password=not show_password)


def libpq_environment(url: URL, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: ours) with every ``PG*`` variable replaced by ``url``'s parameters,
    so nothing of another database leaks in and the tool's own arguments still win."""
    params: dict[str, str] = {}
    for key, value in url.query.items():
        params[key] = value if isinstance(value, str) else ",".join(value)
    for key, value in (
        ("host", url.host),
        ("port", url.port),
        ("user", url.username),
        ("password", url.password),
        ("dbname", url.database),
    ):
        if value is not None:
            params[key] = str(value)
    unknown = sorted(k for k in params if k not in _PARAM_ENV)
    if unknown:
        raise ClientError(
            f"the database URL has parameters libpq cannot take from the environment "
            f"({', '.join(unknown)}); use `headspace-watcher url --show-password` with the tool"
        )
    env = {
        k: v for k, v in (os.environ if base is None else base).items() if not k.startswith("PG")
    }
    env.update({_PARAM_ENV[k]: v for k, v in params.items()})
    env.setdefault("PGAPPNAME", "headspace-watcher-psql")
    return env


def exec_tool(name: str, config: Config | None, args: Sequence[str]) -> None:
    """Replace this process with PostgreSQL's ``name`` (psql, pg_dump) on the configured
    database (none: only for its ``--help``); its exit code is then the command's."""
    try:
        program = embedded.client_binary(name)
    except embedded.PgServerError as exc:
        raise ClientError(str(exc)) from None
    env = dict(os.environ) if config is None else libpq_environment(libpq_url(config))
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os.execve(program, [str(Path(program)), *args], env)
