"""The console script as users and circus run it: check-config, init-db, status, run.

The database URL carries a real password (a role created with one) and no output of any
command may show it.
"""

from __future__ import annotations

import json
import subprocess
from datetime import UTC, datetime

from watcher_helpers import (
    WATCHER_TEST_PASSWORD,
    append,
    count,
    create_password_role,
    project_dir,
    user,
    wait_for,
)

S1 = "c0c0c0c0-d1d1-4e2e-8f3f-404040404040"
CONTRACT_FIELDS = (
    "state",
    "pid",
    "started_at",
    "database_reachable",
    "last_write_at",
    "events_written",
    "failed_writes",
    "rejected",
    "lag_bytes",
    "sessions_watched",
)


def no_secret(*outputs: str) -> None:
    for out in outputs:
        assert WATCHER_TEST_PASSWORD not in out


def main_in_process(watcher, monkeypatch, capsys, *args: str, **extra: str):  # type: ignore[no-untyped-def]
    """``headspace-watcher ARGS`` through ``cli.main`` in this process (quick commands)."""
    from headspace_watcher import cli

    for key, value in watcher.env_vars(**extra).items():
        if key.startswith("HEADSPACE_"):
            monkeypatch.setenv(key, value)
    capsys.readouterr()
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    no_secret(out, err)
    return code, out, err


def status(watcher) -> tuple[int, dict]:  # type: ignore[no-untyped-def,type-arg]
    done = watcher.cli("status", "--json")
    no_secret(done.stdout, done.stderr)
    return done.returncode, json.loads(done.stdout)


# =========================================================================== check-config


def test_check_config_prints_the_effective_config_masked(
    watcher, password_database_url, monkeypatch, capsys
) -> None:
    watcher.database_url = password_database_url

    code, out, _ = main_in_process(watcher, monkeypatch, capsys, "check-config")

    assert code == 0
    shown = json.loads(out)
    assert "***" in shown["database"]["url"]
    assert shown["file_watcher"]["projects_path"] == str(watcher.root)
    assert shown["health"]["state_dir"] == str(watcher.state_dir)
    assert shown["event_system"]["write_retry_attempts"] == 1


def test_check_config_bad_value_exits_2_naming_the_key(watcher) -> None:
    watcher.configure(file_watcher={"mode": "sometimes"})

    done = watcher.cli("check-config")  # the console script itself

    assert done.returncode == 2
    assert "file_watcher.mode" in done.stderr
    assert "all, registered" in done.stderr
    assert done.stdout == ""


def test_check_config_bad_url_names_the_key_without_its_password(
    watcher, monkeypatch, capsys
) -> None:
    bad = f"mysql://someone:{WATCHER_TEST_PASSWORD}@db.example/x"

    code, out, err = main_in_process(
        watcher, monkeypatch, capsys, "check-config", HEADSPACE_DATABASE_URL=bad
    )

    assert code == 2
    assert "database.url" in err
    assert out == ""


# =========================================================================== init-db


def test_init_db_twice_exits_0(watcher, password_database_url) -> None:
    watcher.database_url = password_database_url
    for _ in range(2):
        done = watcher.cli("init-db")
        assert done.returncode == 0, done.stderr
        assert "schema version" in done.stdout
        no_secret(done.stdout, done.stderr)


# =========================================================================== status


def test_status_when_not_running_is_stopped_exit_3(watcher, monkeypatch, capsys) -> None:
    code, out, _ = main_in_process(watcher, monkeypatch, capsys, "status", "--json")
    report = json.loads(out)
    assert code == 3
    assert report["state"] == "stopped"
    assert report["pid"] is None

    dead = subprocess.Popen(["true"])
    dead.wait()
    watcher.state_dir.mkdir(exist_ok=True)
    (watcher.state_dir / "headspace-watcher.pid").write_text(f"{dead.pid}\n")  # stale
    code, out, _ = main_in_process(watcher, monkeypatch, capsys, "status", "--json")
    assert (code, json.loads(out)["state"]) == (3, "stopped")


def test_status_when_running_is_healthy_with_the_contract_fields(
    watcher, password_database_url, db_engine
) -> None:
    watcher.database_url = password_database_url
    proc = watcher.start()
    append(project_dir(watcher.root) / f"{S1}.jsonl", user(S1, "hello", at=datetime.now(UTC)))
    wait_for(lambda: count(db_engine, "turn_detected") == 1, "the line", details=proc.log)
    append(project_dir(watcher.root) / f"{S1}.jsonl", b'{"type":"user","mess')  # partial: no lag

    def settled() -> dict | None:  # type: ignore[type-arg]
        st = proc.status_file()
        return st if st and st["events_written"] >= 2 and st["lag_bytes"] == 0 else None

    wait_for(settled, "status.json to show the write", details=proc.log)
    code, report = status(watcher)
    plain = watcher.cli("status")
    assert proc.stop() == 0

    assert code == 0
    assert all(key in report for key in CONTRACT_FIELDS), set(CONTRACT_FIELDS) - set(report)
    assert report["state"] == "healthy"
    assert report["pid"] == proc.pid
    assert report["database_reachable"] is True
    assert report["events_written"] >= 2  # session_registered + turn_detected
    assert report["failed_writes"] == 0
    assert report["rejected"] == 0
    assert report["lag_bytes"] == 0
    assert report["sessions_watched"] == 1
    assert report["last_write_at"] and report["started_at"]
    assert plain.returncode == 0 and "healthy" in plain.stdout
    no_secret(
        plain.stdout, plain.stderr, proc.log(), (watcher.state_dir / "status.json").read_text()
    )


def test_status_degraded_while_the_database_is_down_then_recovers(watcher, own_pg_cluster) -> None:
    from headspace_watcher.store.engine import make_engine

    url = create_password_role(own_pg_cluster, own_pg_cluster.dbname)
    watcher.database_url = url
    proc = watcher.start()
    path = project_dir(watcher.root) / f"{S1}.jsonl"
    assert status(watcher)[0] == 0

    own_pg_cluster.stop()
    try:
        code, report = status(watcher)
        assert code == 1
        assert report["state"] == "degraded"
        assert report["database_reachable"] is False
        append(path, user(S1, "written during the outage", at=datetime.now(UTC)))
        wait_for(
            lambda: (proc.status_file() or {}).get("state") == "degraded",
            "the service to report degraded itself",
            details=proc.log,
        )
        assert proc.popen.poll() is None  # stays up
    finally:
        own_pg_cluster.start()

    engine = make_engine(url)
    try:
        wait_for(lambda: count(engine, "turn_detected") == 1, "recovery", details=proc.log)
    finally:
        engine.dispose()
    wait_for(
        lambda: (proc.status_file() or {}).get("state") == "healthy",
        "the service to report healthy again",
        details=proc.log,
    )
    code, report = status(watcher)
    assert (code, report["state"], report["database_reachable"]) == (0, "healthy", True)
    assert proc.stop() == 0
    no_secret(proc.log())


def test_run_once_with_the_database_unreachable_exits_non_zero(watcher) -> None:
    from headspace_watcher.store.embedded import free_port

    append(project_dir(watcher.root) / f"{S1}.jsonl", user(S1, "x"))
    url = f"postgresql+psycopg://someone:{WATCHER_TEST_PASSWORD}@127.0.0.1:{free_port()}/db"

    done = watcher.cli("run", "--once", HEADSPACE_DATABASE_URL=url)

    assert done.returncode not in (0, None)
    no_secret(done.stdout, done.stderr)


def test_register_never_prints_the_password(watcher, password_database_url) -> None:
    watcher.database_url = password_database_url

    done = watcher.cli("register", S1, "--project-path", "/p", "--working-directory", "/p")

    assert done.returncode == 0, done.stderr
    assert S1 in done.stdout
    no_secret(done.stdout, done.stderr)


# =========================================================================== secrets (issue 9 §4)


def test_check_config_masks_query_and_raw_at_passwords_from_the_file(watcher) -> None:
    for url in (
        f"postgres://someone@db.example/x?sslmode=require&password={WATCHER_TEST_PASSWORD}",
        f"postgres://someone:pa@{WATCHER_TEST_PASSWORD}@db.example/x",
    ):
        watcher.configure(database={"url": url})

        done = watcher.cli("check-config", HEADSPACE_DATABASE_URL="")  # the file's URL

        assert done.returncode == 0, done.stderr
        shown = json.loads(done.stdout)["database"]["url"]
        assert shown.startswith("postgresql+psycopg://someone")
        assert "***" in shown
        no_secret(done.stdout, done.stderr)


def test_yaml_error_names_file_line_and_column_not_the_line(watcher) -> None:
    watcher.config_path.write_text(
        f'database:\n  url: "postgresql://u:{WATCHER_TEST_PASSWORD}@h/db\nlogging: [\n'
    )

    done = watcher.cli("check-config", HEADSPACE_DATABASE_URL="")

    assert done.returncode == 2
    assert f"config file {watcher.config_path} is not valid YAML" in done.stderr
    assert "at line 4, column 1" in done.stderr
    assert done.stderr.count("\n") == 1  # one line, no snippet
    no_secret(done.stdout, done.stderr)


def test_config_pointing_at_a_foreign_file_never_prints_it(watcher) -> None:
    shadow = watcher.tmp / "shadow"
    shadow.write_text(f"root:$6$salt${WATCHER_TEST_PASSWORD}:19000:0:99999:7:::\n")
    binary = watcher.tmp / "binary"
    binary.write_bytes(b"\x7fELF\x02\x01\xff" + WATCHER_TEST_PASSWORD.encode())

    for path, said in ((shadow, "is unknown"), (binary, "not UTF-8 text")):
        done = watcher.cli("check-config", HEADSPACE_CONFIG=str(path))

        assert done.returncode == 2
        assert said in done.stderr
        assert "19000" not in done.stderr and "ELF" not in done.stderr
        no_secret(done.stdout, done.stderr)
