"""Configuration loading: file + environment, and errors an operator can act on.

A bad value must stop the service at start-up with a message naming the key and what was
expected — and a database password must never be echoed, whatever went wrong.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from headspace_watcher.config import (
    DEFAULTS,
    ENV_CONFIG,
    ENV_DATABASE_URL,
    ENV_PROJECTS_PATH,
    ENV_STATE_DIR,
    PROJECT_ROOT,
    ConfigError,
    load_config,
    mask_url,
)

SECRET = "s3cr3t-Pa55word"
SECRET_URL = f"postgresql+psycopg://watcher:{SECRET}@db.example:5432/headspace"


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


FULL = """
database:
  url: postgresql+psycopg://watcher@db.example:5433/headspace
  connect_timeout_seconds: 7
  embedded_port: 55000
  embedded_tcp: true
file_watcher:
  projects_path: {projects}
  mode: registered
  inactivity_timeout: 60
  max_line_bytes: 2048
  read_chunk_bytes: 8192
  batch_max_lines: 10
  batch_max_bytes: 8192
event_system:
  write_retry_attempts: 5
  write_retry_delay_ms: 250
  max_restarts_per_minute: 9
  shutdown_timeout_seconds: 4
health:
  state_dir: {state}
  heartbeat_interval_seconds: 2
logging:
  level: DEBUG
"""


# --------------------------------------------------------------------------- loading


def test_loads_every_key_from_file(tmp_path: Path) -> None:
    path = write(tmp_path, FULL.format(projects=tmp_path / "p", state=tmp_path / "s"))
    cfg = load_config(path, env={})
    assert cfg.source == str(path)
    assert cfg.database_url == "postgresql+psycopg://watcher@db.example:5433/headspace"
    assert not cfg.uses_embedded_database
    assert cfg.raw["database"] == {
        "url": "postgresql+psycopg://watcher@db.example:5433/headspace",
        "connect_timeout_seconds": 7,
        "embedded_port": 55000,
        "embedded_tcp": True,
    }
    assert cfg.embedded_tcp is True
    assert cfg.projects_path == tmp_path / "p"
    assert cfg.state_dir == (tmp_path / "s").resolve()
    assert cfg.file_watcher == {
        "projects_path": str(tmp_path / "p"),
        "mode": "registered",
        "inactivity_timeout": 60,
        "max_line_bytes": 2048,
        "read_chunk_bytes": 8192,
        "batch_max_lines": 10,
        "batch_max_bytes": 8192,
    }
    assert cfg.event_system == {
        "write_retry_attempts": 5,
        "write_retry_delay_ms": 250,
        "max_restarts_per_minute": 9,
        "shutdown_timeout_seconds": 4,
    }
    assert cfg.raw["health"]["heartbeat_interval_seconds"] == 2
    assert cfg.raw["logging"]["level"] == "DEBUG"


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, ""), env={})
    assert cfg.database_url is None
    assert cfg.uses_embedded_database
    assert cfg.event_system == DEFAULTS["event_system"]
    assert cfg.file_watcher["mode"] == "all"
    assert cfg.projects_path == Path("~/.claude/projects").expanduser()
    assert cfg.state_dir == (PROJECT_ROOT / "var").resolve()


def test_partial_section_keeps_other_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "event_system:\n  write_retry_attempts: 7\n"), env={})
    assert cfg.event_system["write_retry_attempts"] == 7
    assert (
        cfg.event_system["write_retry_delay_ms"] == DEFAULTS["event_system"]["write_retry_delay_ms"]
    )


def test_seed_section_is_accepted(tmp_path: Path) -> None:
    """The seed's ``event_system`` section (INTERFACE.md) must load unchanged."""
    seed = (
        "event_system:\n  write_retry_attempts: 3\n  write_retry_delay_ms: 100\n"
        "  max_restarts_per_minute: 5\n  shutdown_timeout_seconds: 2\n"
    )
    cfg = load_config(write(tmp_path, seed), env={})
    assert cfg.event_system == {
        "write_retry_attempts": 3,
        "write_retry_delay_ms": 100,
        "max_restarts_per_minute": 5,
        "shutdown_timeout_seconds": 2,
    }


def test_repository_config_yaml_is_valid() -> None:
    cfg = load_config(PROJECT_ROOT / "config.yaml", env={})
    assert cfg.source == str(PROJECT_ROOT / "config.yaml")


# --------------------------------------------------------------------------- env overrides


def test_env_overrides_file(tmp_path: Path) -> None:
    path = write(tmp_path, FULL.format(projects=tmp_path / "p", state=tmp_path / "s"))
    env = {
        ENV_DATABASE_URL: "postgresql+psycopg://other@h2:6000/db2",
        ENV_PROJECTS_PATH: str(tmp_path / "projects-env"),
        ENV_STATE_DIR: str(tmp_path / "state-env"),
    }
    cfg = load_config(path, env=env)
    assert cfg.database_url == "postgresql+psycopg://other@h2:6000/db2"
    assert cfg.raw["database"]["url"] == "postgresql+psycopg://other@h2:6000/db2"
    assert cfg.projects_path == tmp_path / "projects-env"
    assert cfg.state_dir == (tmp_path / "state-env").resolve()
    # keys without an env variable still come from the file
    assert cfg.file_watcher["mode"] == "registered"


def test_env_config_selects_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "logging:\n  level: WARNING\n", name="elsewhere.yaml")
    cfg = load_config(env={ENV_CONFIG: str(path)})
    assert cfg.source == str(path)
    assert cfg.raw["logging"]["level"] == "WARNING"


def test_explicit_path_beats_env_config(tmp_path: Path) -> None:
    chosen = write(tmp_path, "logging:\n  level: ERROR\n", name="chosen.yaml")
    other = write(tmp_path, "logging:\n  level: WARNING\n", name="other.yaml")
    cfg = load_config(chosen, env={ENV_CONFIG: str(other)})
    assert cfg.raw["logging"]["level"] == "ERROR"


def test_env_is_read_from_process_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, "")
    monkeypatch.setenv(ENV_CONFIG, str(path))
    monkeypatch.setenv(ENV_PROJECTS_PATH, str(tmp_path / "from-os-env"))
    monkeypatch.delenv(ENV_DATABASE_URL, raising=False)
    monkeypatch.delenv(ENV_STATE_DIR, raising=False)
    cfg = load_config()
    assert cfg.source == str(path)
    assert cfg.projects_path == tmp_path / "from-os-env"


def test_empty_env_value_does_not_override(tmp_path: Path) -> None:
    path = write(tmp_path, FULL.format(projects=tmp_path / "p", state=tmp_path / "s"))
    cfg = load_config(path, env={ENV_PROJECTS_PATH: "", ENV_DATABASE_URL: ""})
    assert cfg.projects_path == tmp_path / "p"
    assert cfg.database_url == "postgresql+psycopg://watcher@db.example:5433/headspace"


def test_bad_env_value_is_reported_with_its_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, ""), env={ENV_DATABASE_URL: "mysql://u@h/db"})
    assert "'database.url'" in str(info.value)
    assert "postgresql" in str(info.value)


# --------------------------------------------------------------------------- bad values

BAD_VALUES = [
    # (yaml, key named, expectation named)
    ("event_system:\n  write_retry_attempts: many\n", "event_system.write_retry_attempts",
     "integer from 0 to 20"),
    ("event_system:\n  write_retry_attempts: 2.5\n", "event_system.write_retry_attempts",
     "integer from 0 to 20"),
    ("event_system:\n  write_retry_attempts: true\n", "event_system.write_retry_attempts",
     "integer from 0 to 20"),
    ("event_system:\n  write_retry_attempts: 21\n", "event_system.write_retry_attempts",
     "integer from 0 to 20"),
    ("event_system:\n  write_retry_delay_ms: 0\n", "event_system.write_retry_delay_ms",
     "integer from 1 to 60000"),
    ("event_system:\n  max_restarts_per_minute: -1\n", "event_system.max_restarts_per_minute",
     "integer from 1 to 1000"),
    ("event_system:\n  shutdown_timeout_seconds: 301\n", "event_system.shutdown_timeout_seconds",
     "integer from 1 to 300"),
    ("database:\n  embedded_port: 80\n", "database.embedded_port", "integer from 1024 to 65535"),
    ("database:\n  connect_timeout_seconds: '5'\n", "database.connect_timeout_seconds",
     "integer from 1 to 300"),
    ("file_watcher:\n  inactivity_timeout: 0\n", "file_watcher.inactivity_timeout",
     "integer from 1 to"),
    ("file_watcher:\n  batch_max_lines: 0\n", "file_watcher.batch_max_lines",
     "integer from 1 to 1000000"),
    ("file_watcher:\n  read_chunk_bytes: 100\n", "file_watcher.read_chunk_bytes",
     "integer from 4096 to"),
    ("file_watcher:\n  mode: everything\n", "file_watcher.mode", "all, registered"),
    ("file_watcher:\n  mode: 1\n", "file_watcher.mode", "all, registered"),
    ("file_watcher:\n  projects_path: ''\n", "file_watcher.projects_path", "non-empty string"),
    ("file_watcher:\n  projects_path: [a]\n", "file_watcher.projects_path", "non-empty string"),
    ("health:\n  state_dir: 3\n", "health.state_dir", "non-empty string"),
    ("health:\n  heartbeat_interval_seconds: 0\n", "health.heartbeat_interval_seconds",
     "integer from 1 to 3600"),
    ("logging:\n  level: LOUD\n", "logging.level", "INFO"),
    ("database:\n  url: mysql://u@h/db\n", "database.url", "postgresql"),
    ("database:\n  url: not a url\n", "database.url", "SQLAlchemy URL"),
    ("database:\n  url: 5432\n", "database.url", "SQLAlchemy URL"),
    ("event_system:\n  retry_attempts: 3\n", "event_system.retry_attempts", "write_retry_attempts"),
    ("bogus_section: {}\n", "bogus_section", "event_system"),
    ("event_system: 5\n", "event_system", "mapping"),
    ("event_system: [1, 2]\n", "event_system", "mapping"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "key", "expected"), BAD_VALUES)
def test_bad_value_names_key_and_expectation(
    tmp_path: Path, text: str, key: str, expected: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), env={})
    message = str(info.value)
    assert f"'{key}'" in message
    assert expected in message


def test_every_error_is_reported_at_once(tmp_path: Path) -> None:
    text = "event_system:\n  write_retry_attempts: 99\nlogging:\n  level: LOUD\n"
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), env={})
    assert "'event_system.write_retry_attempts'" in str(info.value)
    assert "'logging.level'" in str(info.value)


def test_top_level_not_a_mapping(tmp_path: Path) -> None:
    path = write(tmp_path, "- a\n- b\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert str(path) in str(info.value)
    assert "expected a mapping at top level" in str(info.value)


def test_invalid_yaml(tmp_path: Path) -> None:
    path = write(tmp_path, "event_system:\n  write_retry_attempts: [1,\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert str(path) in str(info.value)
    assert "not valid YAML" in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert str(path) in str(info.value)
    assert "does not exist" in str(info.value)
    assert ENV_CONFIG in str(info.value)


def test_unreadable_file(tmp_path: Path) -> None:
    """A directory where the file should be: an OSError other than 'not found'."""
    path = tmp_path / "is-a-dir.yaml"
    path.mkdir()
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert str(path) in str(info.value)
    assert "cannot be read" in str(info.value)


# --------------------------------------------------------------------------- secrets


def test_masked_hides_password(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, f"database:\n  url: {SECRET_URL}\n"), env={})
    assert cfg.database_url == SECRET_URL  # the real one is still there to connect with
    shown = cfg.masked()
    assert shown["database"]["url"] == "postgresql+psycopg://watcher:***@db.example:5432/headspace"
    assert SECRET not in repr(shown)
    assert SECRET not in repr(cfg.masked())  # masking does not mutate the config
    assert cfg.raw["database"]["url"] == SECRET_URL


def test_masked_hides_password_from_env(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, ""), env={ENV_DATABASE_URL: SECRET_URL})
    assert SECRET not in repr(cfg.masked())
    assert cfg.masked()["source"] == str(tmp_path / "config.yaml")


def test_mask_url() -> None:
    assert SECRET not in mask_url(SECRET_URL)
    assert mask_url(SECRET_URL).startswith("postgresql+psycopg://watcher:***@")
    assert mask_url("postgresql+psycopg://user@h/db") == "postgresql+psycopg://user@h/db"


LEAKY = [
    # a valid-looking URL refused for its scheme
    f"database:\n  url: mysql://u:{SECRET}@h/db\n",
    # an unparseable one (bad port)
    f"database:\n  url: 'postgresql://u:{SECRET}@h:port/db'\n",
    # the right URL at the wrong type
    f"database:\n  url: [postgresql://u:{SECRET}@h/db]\n",
    # the URL where a section should be
    f"database: postgresql://u:{SECRET}@h/db\n",
    # the URL as the whole file
    f"postgresql://u:{SECRET}@h/db\n",
    # the URL on the line a YAML error quotes
    f'database:\n  url: "postgresql://u:{SECRET}@h/db\n',
    # a valid URL next to a different bad key
    f"database:\n  url: {SECRET_URL}\n  connect_timeout_seconds: 0\n",
]


@pytest.mark.parametrize("text", LEAKY)
def test_password_never_in_error(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), env={})
    assert SECRET not in str(info.value)
    assert SECRET not in repr(info.value.args)


def test_password_from_env_never_in_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, ""), env={ENV_DATABASE_URL: f"mysql://u:{SECRET}@h:5432/db"})
    assert "'database.url'" in str(info.value)
    assert SECRET not in str(info.value)
