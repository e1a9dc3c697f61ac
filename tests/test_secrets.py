"""No database password in any output of the real service (issue 9 §4).

The password reaches the watcher in the two shapes that leaked: as a URL query parameter
(``?password=…``, key any case or percent-encoded) and as a raw ``user:pa@ss@host`` userinfo.
The console script runs for real against a role that has that password; then every place
the URL is shown is searched for the password and for each of its ``@``-separated pieces:
``check-config``, the start log, ``status`` (text and ``--json``), ``status.json`` and the
heartbeat row's ``health`` JSON.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy.engine import make_url
from watcher_helpers import WATCHER_TEST_PASSWORD, rows, wait_for

from headspace_watcher.config import ConfigError, mask_url, redact_text

AT_ROLE = "headspace_at_user"
AT_PIECES = ("Frag1-q8Lw", "Frag2-z5Rn", "Frag3-k2Vx")
AT_PASSWORD = "@".join(AT_PIECES)  # two raw '@' inside the password


def at_password_url(pg_cluster: Any, database_url: str) -> str:
    """``postgresql://headspace_at_user:Frag1…@Frag2…@Frag3…@host:port/db``, written raw."""
    with pg_cluster.connect("postgres") as conn:
        if not conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (AT_ROLE,)).fetchone():
            conn.execute(f"CREATE ROLE {AT_ROLE} LOGIN SUPERUSER PASSWORD '{AT_PASSWORD}'")
    url = make_url(database_url)
    return f"postgresql://{AT_ROLE}:{AT_PASSWORD}@{url.host}:{url.port}/{url.database}"


def query_password_url(password_database_url: str, key: str) -> str:
    """The password-role URL with its password moved into the query string."""
    url = make_url(password_database_url)
    return (
        f"postgresql+psycopg://{url.username}@{url.host}:{url.port}/{url.database}"
        f"?sslmode=disable&{key}={WATCHER_TEST_PASSWORD}"
    )


def leaks(secrets: tuple[str, ...], **outputs: str) -> list[str]:
    return [f"{name} shows {s!r}" for name, text in outputs.items() for s in secrets if s in text]


def every_output(watcher: Any, db_engine: Any) -> dict[str, str]:
    """Start the real service, let it beat, and collect every place the URL is shown."""
    check = watcher.cli("check-config")
    assert check.returncode == 0, check.stderr
    proc = watcher.start()

    def beat_row() -> list[Any] | None:
        found = rows(db_engine, "SELECT health FROM watcher_heartbeats WHERE pid = :p", p=proc.pid)
        return found or None

    health_rows = wait_for(beat_row, "a heartbeat row", details=proc.log)
    plain, as_json = watcher.cli("status"), watcher.cli("status", "--json")
    status_file = (watcher.state_dir / "status.json").read_text()
    assert proc.stop() == 0
    assert plain.returncode == 0, plain.stdout + plain.stderr
    assert json.loads(as_json.stdout)["state"] == "healthy"
    assert "***" in json.loads(status_file)["database"]
    return {
        "check-config": check.stdout + check.stderr,
        "start log": proc.log(),
        "status": plain.stdout + plain.stderr,
        "status --json": as_json.stdout + as_json.stderr,
        "status.json": status_file,
        "watcher_heartbeats.health": json.dumps([r.health for r in health_rows]),
    }


@pytest.mark.parametrize("key", ["password", "p%61ssword"])  # what libpq accepts
def test_query_parameter_password_never_shown(
    watcher: Any, password_database_url: str, db_engine: Any, key: str
) -> None:
    watcher.database_url = query_password_url(password_database_url, key)

    outputs = every_output(watcher, db_engine)

    assert not leaks((WATCHER_TEST_PASSWORD,), **outputs)
    assert f"{key}=***" in outputs["check-config"]


def test_raw_at_signs_in_the_password_never_shown(
    watcher: Any, pg_cluster: Any, database_url: str, db_engine: Any
) -> None:
    """The service also connects with it: the raw '@'s are taken as part of the password."""
    try:
        watcher.database_url = at_password_url(pg_cluster, database_url)
    except Exception as exc:  # an external test server whose user may not create roles
        pytest.skip(f"cannot create a role with a password: {exc}")

    outputs = every_output(watcher, db_engine)

    assert not leaks((AT_PASSWORD, *AT_PIECES), **outputs)
    assert f"{AT_ROLE}:***@" in outputs["check-config"]


def test_driver_error_quoting_the_password_is_redacted(watcher: Any) -> None:
    """A real libpq error that repeats part of the conninfo, password included."""
    url = (
        "postgresql+psycopg://someone@127.0.0.1:1/db"
        f"?sslmode=require%20password%3D{WATCHER_TEST_PASSWORD}"
    )

    done = watcher.cli("init-db", HEADSPACE_DATABASE_URL=url)

    assert done.returncode == 1
    assert "invalid sslmode value" in done.stderr
    assert "password=***" in done.stderr
    assert WATCHER_TEST_PASSWORD not in done.stdout + done.stderr


# --------------------------------------------------------------------------- hostile input

HOSTILE_SHAPES: dict[str, Callable[[int], str]] = {
    # the worst cases of the old masking regex (3.2 s at 80,000 characters)
    "letters": lambda n: "a" * n,
    "scheme then letters": lambda n: "a://" + "a" * (n - 4),
    "userinfo without @": lambda n: "a://b:" + "c" * (n - 6),
    "many short urls": lambda n: "a://b: " * (n // 7),
    "many password=": lambda n: "password=" * (n // 9),
    "many ://": lambda n: "://" * (n // 3),
    "many @": lambda n: "postgresql://u:" + "@" * (n - 15),
}
TAIL = f" then postgresql://u:{WATCHER_TEST_PASSWORD}@h/db?password={WATCHER_TEST_PASSWORD}x"


def python_lines_run(call: Callable[[], object]) -> int:
    """Lines of headspace_watcher.config executed by ``call``: the work done, not its speed."""
    executed = 0

    def tracer(frame: Any, event: str, _arg: Any) -> Any:
        nonlocal executed
        if frame.f_code.co_filename.endswith("config.py"):
            if event == "line":
                executed += 1
            return tracer
        return None

    sys.settrace(tracer)
    try:
        call()
    finally:
        sys.settrace(None)
    return executed


@pytest.mark.parametrize("shape", sorted(HOSTILE_SHAPES))
def test_hostile_text_is_masked_in_linear_work(shape: str) -> None:
    make = HOSTILE_SHAPES[shape]
    small, big = make(10_000) + TAIL, make(80_000) + TAIL

    work_small = python_lines_run(lambda: redact_text(small))
    work_big = python_lines_run(lambda: redact_text(big))
    message = str(ConfigError(big))

    assert work_big <= 10 * max(work_small, 100), (work_small, work_big)  # 8x input: linear
    assert WATCHER_TEST_PASSWORD not in redact_text(big)
    assert WATCHER_TEST_PASSWORD not in mask_url(big)
    assert WATCHER_TEST_PASSWORD not in message
    assert len(message) <= 4000
