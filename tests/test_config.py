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
    DatabaseConfig,
    EventSystemConfig,
    FileWatcherConfig,
    HealthConfig,
    LoggingConfig,
    load_config,
    mask_url,
    redact_text,
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
    assert not cfg.uses_embedded_database
    assert cfg.database == DatabaseConfig(
        url="postgresql+psycopg://watcher@db.example:5433/headspace",
        connect_timeout_seconds=7,
        embedded_port=55000,
        embedded_tcp=True,
    )
    assert cfg.projects_path == tmp_path / "p"
    assert cfg.state_dir == (tmp_path / "s").resolve()
    assert cfg.file_watcher == FileWatcherConfig(
        projects_path=tmp_path / "p",
        mode="registered",
        inactivity_timeout=60,
        max_line_bytes=2048,
        read_chunk_bytes=8192,
        batch_max_lines=10,
        batch_max_bytes=8192,
    )
    assert cfg.event_system == EventSystemConfig(
        write_retry_attempts=5,
        write_retry_delay_ms=250,
        max_restarts_per_minute=9,
        shutdown_timeout_seconds=4,
    )
    assert cfg.health == HealthConfig(
        state_dir=(tmp_path / "s").resolve(), heartbeat_interval_seconds=2
    )
    assert cfg.logging == LoggingConfig(level="DEBUG")


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, ""), env={})
    assert cfg.database.url is None
    assert cfg.uses_embedded_database
    assert cfg.event_system == EventSystemConfig(**DEFAULTS["event_system"])
    assert cfg.file_watcher.mode == "all"
    assert cfg.projects_path == Path("~/.claude/projects").expanduser()
    assert cfg.state_dir == (PROJECT_ROOT / "var").resolve()


def test_partial_section_keeps_other_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "event_system:\n  write_retry_attempts: 7\n"), env={})
    assert cfg.event_system.write_retry_attempts == 7
    assert cfg.event_system.write_retry_delay_ms == DEFAULTS["event_system"]["write_retry_delay_ms"]


def test_seed_section_is_accepted(tmp_path: Path) -> None:
    """The seed's ``event_system`` section (INTERFACE.md) must load unchanged."""
    seed = (
        "event_system:\n  write_retry_attempts: 3\n  write_retry_delay_ms: 100\n"
        "  max_restarts_per_minute: 5\n  shutdown_timeout_seconds: 2\n"
    )
    cfg = load_config(write(tmp_path, seed), env={})
    assert cfg.event_system == EventSystemConfig(
        write_retry_attempts=3,
        write_retry_delay_ms=100,
        max_restarts_per_minute=5,
        shutdown_timeout_seconds=2,
    )


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
    assert cfg.database.url == "postgresql+psycopg://other@h2:6000/db2"
    assert cfg.projects_path == tmp_path / "projects-env"
    assert cfg.state_dir == (tmp_path / "state-env").resolve()
    # keys without an env variable still come from the file
    assert cfg.file_watcher.mode == "registered"


def test_env_config_selects_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "logging:\n  level: WARNING\n", name="elsewhere.yaml")
    cfg = load_config(env={ENV_CONFIG: str(path)})
    assert cfg.source == str(path)
    assert cfg.logging.level == "WARNING"


def test_explicit_path_beats_env_config(tmp_path: Path) -> None:
    chosen = write(tmp_path, "logging:\n  level: ERROR\n", name="chosen.yaml")
    other = write(tmp_path, "logging:\n  level: WARNING\n", name="other.yaml")
    cfg = load_config(chosen, env={ENV_CONFIG: str(other)})
    assert cfg.logging.level == "ERROR"


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
    assert cfg.database.url == "postgresql+psycopg://watcher@db.example:5433/headspace"


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
    assert cfg.database.url == SECRET_URL  # the real one is still there to connect with
    shown = cfg.masked()
    assert shown["database"]["url"] == "postgresql+psycopg://watcher:***@db.example:5432/headspace"
    assert SECRET not in repr(shown)
    assert SECRET not in repr(cfg.masked())  # masking does not mutate the config
    assert cfg.database.url == SECRET_URL


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


# --------------------------------------------------------------------------- masking (issue 9 §4)

MASKED_URLS = [
    # (url, what must be shown, what must not)
    ("postgresql+psycopg://user:pa@ss@host/db", "postgresql+psycopg://user:***@host/db", "ss"),
    ("postgresql://u:a/b@c@h:5/db", "postgresql://u:***@h:5/db", "a/b"),
    ("postgresql://u@h/db?password=pw1secret", "postgresql://u@h/db?password=***", "pw1secret"),
    ("postgresql://u@h/db?sslmode=require&PASSWORD=pw1secret&x=1", "&PASSWORD=***&x=1",
     "pw1secret"),
    ("postgresql://u@h/db?p%61ssword=pw1secret", "?p%61ssword=***", "pw1secret"),
    ("postgresql://u@h/db?SslPassword=pw1secret", "?SslPassword=***", "pw1secret"),
    ("postgresql://u@h/db?password=pw1@secret", "?password=***", "secret"),
    ("postgresql://u@h/db?x=1?password=pw1?secret&y=2", "password=***&y=2", "secret"),
    ("postgresql://u@/db?host=/run/pg&password=pw1secret", "host=/run/pg&password=***",
     "pw1secret"),
    ("postgresql://u:pw1secret@h/db?password=pw2secret", "u:***@h/db?password=***", "secret"),
]  # fmt: skip


@pytest.mark.parametrize(("url", "shown", "hidden"), MASKED_URLS)
def test_mask_url_hides_every_password(url: str, shown: str, hidden: str) -> None:
    masked = mask_url(url)
    assert shown in masked
    assert hidden not in masked


@pytest.mark.parametrize("url", ["not a url", f"u:{SECRET}@h/db", f"1x://u:{SECRET}@h", ""])
def test_unparseable_url_is_never_echoed(url: str) -> None:
    assert mask_url(url) == "<unparseable database URL>"


def test_redact_text_masks_urls_and_conninfo_in_free_text() -> None:
    text = (
        f"failed: 'postgresql://u:{SECRET} x@h/db' then host=h password={SECRET} "
        f"and PGPASSWORD='{SECRET} y' and sslmode: \"require password={SECRET}\""
    )
    redacted = redact_text(text)
    assert SECRET not in redacted
    assert "postgresql://u:***@h/db'" in redacted
    assert 'password=***"' in redacted
    assert "password authentication failed" in redact_text("password authentication failed")


# --------------------------------------------------------------------------- issue 11 paper cuts


@pytest.mark.parametrize("level", ["debug", "Warning", "error", "INFO"])
def test_logging_level_any_case_is_normalised(tmp_path: Path, level: str) -> None:
    cfg = load_config(write(tmp_path, f"logging:\n  level: {level}\n"), env={})
    assert cfg.logging.level == level.upper()


@pytest.mark.parametrize("scheme", ["postgres", "postgresql", "POSTGRES"])
def test_postgres_urls_are_accepted_for_psycopg(tmp_path: Path, scheme: str) -> None:
    cfg = load_config(write(tmp_path, f"database:\n  url: {scheme}://u@h:5/db\n"), env={})
    assert cfg.database.url == "postgresql+psycopg://u@h:5/db"


def test_raw_at_in_the_password_is_encoded_so_the_host_is_right(tmp_path: Path) -> None:
    from sqlalchemy.engine import make_url

    cfg = load_config(write(tmp_path, ""), env={ENV_DATABASE_URL: "postgres://u:pa@ss@h/db"})
    url = make_url(cfg.database.url or "")
    assert (url.password, url.host, url.database) == ("pa@ss", "h", "db")
    assert "ss" not in cfg.masked()["database"]["url"]


def test_all_errors_reported_at_once_unknown_keys_sections_and_values(tmp_path: Path) -> None:
    text = (
        "bogus: 1\nother: 2\nevent_system: 5\nlogging:\n  level: LOUD\n  extra: 1\n"
        "database:\n  embedded_port: 1\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), env={})
    message = str(info.value)
    for key in ("'bogus'", "'other'", "'event_system'", "'logging.extra'", "'logging.level'",
                "'database.embedded_port'"):  # fmt: skip
        assert key in message, key


def test_error_count_and_length_are_bounded(tmp_path: Path) -> None:
    text = "".join(f"key{i}: {'x' * 500}\n" for i in range(2000))
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), env={})
    message = str(info.value)
    assert len(message) <= 4000
    assert "'key0' is unknown" in message
    assert "and 1980 more problems" in message or "more characters" in message


def test_echoed_values_are_capped(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, f"file_watcher:\n  mode: {'y' * 5000}\n"), env={})
    assert "'file_watcher.mode'" in str(info.value)
    assert len(str(info.value)) < 300


# --------------------------------------------------------------------------- hostile files

YAML_ERRORS_WITH_THE_PASSWORD = [
    f'database:\n  url: "postgresql://u:{SECRET}@h/db\nlogging: [\n',  # unclosed quote
    f"database:\n  url: postgresql://u:{SECRET}@h/db\n   bad: indent: {SECRET}\n",
    f"database:\n  url: !{SECRET} postgresql://u@h/db\n",  # unknown tag
    f"database:\n  url: *{SECRET}\n",  # undefined alias
    f'database:\n  url: "\\q{SECRET}"\n',  # bad escape
    f"database:\n\turl: {SECRET}\n",  # tab indentation
]


@pytest.mark.parametrize("text", YAML_ERRORS_WITH_THE_PASSWORD)
def test_yaml_error_names_file_line_column_never_the_line(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    message = str(info.value)
    assert f"config file {path} is not valid YAML: " in message
    assert "at line " in message and ", column " in message
    assert SECRET not in message
    assert "postgresql://" not in message and "^" not in message  # no snippet of the line


def secret_file(tmp_path: Path, name: str, content: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(content)
    return path


FOREIGN_FILES = [
    ("shadow", f"root:$6$salt${SECRET}:19000:0:99999:7:::\ndaemon:*:19000::::::\n".encode(),
     "is unknown"),
    ("id_rsa", f"-----BEGIN OPENSSH PRIVATE KEY-----\n{SECRET}\n-----END-----\n".encode(),
     "found a string"),
    ("binary", b"\x7fELF\x02\x01\x01\x00\xff\xfe" + SECRET.encode(), "not UTF-8 text"),
    ("nul", b"a: " + SECRET.encode() + b"\x00\n", "not valid YAML"),
    ("list.json", f'["postgresql://u:{SECRET}@h/db", "{SECRET}"]'.encode(), "found a list"),
    ("number", b"12345\n", "found a number"),
    ("keys.yaml", f"{SECRET}{SECRET}{SECRET}: 1\n".encode(), "is unknown"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "content", "said"), FOREIGN_FILES)
def test_non_config_file_content_never_echoed(
    tmp_path: Path, name: str, content: bytes, said: str
) -> None:
    path = secret_file(tmp_path, name, content)
    with pytest.raises(ConfigError) as info:
        load_config(env={ENV_CONFIG: str(path)})
    message = str(info.value)
    assert said in message
    assert SECRET not in message
    assert "19000" not in message and "ELF" not in message and "BEGIN" not in message


def test_non_regular_and_oversized_files_are_refused_unread(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a regular file"):
        load_config("/dev/zero", env={})
    big = write(tmp_path, "logging:\n  level: INFO\n" + "#" * (2 << 20), name="big.yaml")
    with pytest.raises(ConfigError, match="larger than"):
        load_config(big, env={})


def anchor_bomb(depth: int) -> str:
    """A "billion laughs" as one flow list: ``depth`` levels of nine aliases each, the last
    level expanded 9**depth times; a few hundred bytes of YAML."""
    levels = ['&l0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    levels += [f"&l{i} [{','.join([f'*l{i - 1}'] * 9)}]" for i in range(1, depth)]
    return f"[{', '.join(levels)}]"


@pytest.mark.parametrize(
    "where", ["database: {}", "logging:\n  level: {}", "file_watcher:\n  projects_path: {}"]
)
def test_anchor_bomb_is_refused_with_bounded_message_and_memory(tmp_path: Path, where: str) -> None:
    import tracemalloc

    # 9**7 = 4.8 million "lol"s once expanded (the old message: ~40 MB; at depth 9, 282 MB)
    path = write(tmp_path, where.format(anchor_bomb(7)) + "\n")
    tracemalloc.start()
    try:
        with pytest.raises(ConfigError) as info:
            load_config(path, env={})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "expands to more than" in str(info.value)
    assert len(str(info.value)) < 500
    assert peak < 5 * 1024 * 1024, peak


def test_self_referencing_alias_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="expands to more than"):
        load_config(write(tmp_path, "database: &a {url: [*a]}\n"), env={})


# --------------------------------------------------------------------------- typed sections


def test_sections_are_typed_and_frozen(tmp_path: Path) -> None:
    import dataclasses

    cfg = load_config(write(tmp_path, "file_watcher:\n  batch_max_lines: 7\n"), env={})
    assert cfg.file_watcher.batch_max_lines == 7
    assert isinstance(cfg.file_watcher.projects_path, Path)
    assert isinstance(cfg.health.state_dir, Path)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.file_watcher.batch_max_lines = 8  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.event_system = cfg.event_system  # type: ignore[misc]


def test_masked_has_the_shape_of_the_file_plus_source(tmp_path: Path) -> None:
    """``check-config`` prints this: the documented effective config, keys in file order."""
    cfg = load_config(write(tmp_path, ""), env={ENV_STATE_DIR: str(tmp_path / "s")})
    shown = cfg.masked()
    assert list(shown) == [*DEFAULTS, "source"]
    for section, keys in DEFAULTS.items():
        assert list(shown[section]) == list(keys), section
    assert shown["health"]["state_dir"] == str((tmp_path / "s").resolve())
    assert shown["file_watcher"]["projects_path"] == str(Path("~/.claude/projects").expanduser())
    assert shown["event_system"] == DEFAULTS["event_system"]


def test_config_error_is_the_one_root_config_error(tmp_path: Path) -> None:
    from headspace_watcher import errors

    with pytest.raises(errors.ConfigError) as info:
        load_config(write(tmp_path, f"database:\n  url: mysql://u:{SECRET}@h/db\n"), env={})
    assert isinstance(info.value, errors.HeadspaceError)
    assert SECRET not in str(info.value)


def _our_imports(path: Path) -> set[str]:
    """Every module of ours that ``path`` imports, at top level or inside a function."""
    import ast

    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return {name for name in found if name.startswith("headspace_watcher")}


def test_config_is_at_the_bottom_of_the_import_graph() -> None:
    """config imports nothing of ours but errors: the store (which finds the embedded
    server) is above it, and an upward import would tie every layer to the store."""
    assert _our_imports(PROJECT_ROOT / "headspace_watcher" / "config.py") == {
        "headspace_watcher.errors"
    }


def test_the_store_says_which_url_to_connect_to(tmp_path: Path) -> None:
    from headspace_watcher.store.embedded import database_url

    cfg = load_config(write(tmp_path, ""), env={ENV_DATABASE_URL: SECRET_URL})
    assert database_url(cfg) == SECRET_URL  # the configured one, as it is (password and all)


# --------------------------------------------------------------------------- event_system env

EVENT_SYSTEM_ENV = {
    # key: (a value other than the file's and the default's, its variable)
    "write_retry_attempts": 11,
    "write_retry_delay_ms": 1234,
    "max_restarts_per_minute": 17,
    "shutdown_timeout_seconds": 9,
}


def test_every_event_system_key_has_its_variable() -> None:
    assert set(EVENT_SYSTEM_ENV) == set(DEFAULTS["event_system"])


@pytest.mark.parametrize(("key", "value"), sorted(EVENT_SYSTEM_ENV.items()))
def test_event_system_env_overrides_the_file(tmp_path: Path, key: str, value: int) -> None:
    path = write(tmp_path, FULL.format(projects=tmp_path / "p", state=tmp_path / "s"))
    variable = f"HEADSPACE_EVENT_SYSTEM_{key.upper()}"
    cfg = load_config(path, env={variable: str(value)})
    assert getattr(cfg.event_system, key) == value  # an int, parsed from the string
    assert type(getattr(cfg.event_system, key)) is int
    others = {k: getattr(cfg.event_system, k) for k in EVENT_SYSTEM_ENV if k != key}
    file_values = {"write_retry_attempts": 5, "write_retry_delay_ms": 250,
                   "max_restarts_per_minute": 9, "shutdown_timeout_seconds": 4}  # fmt: skip
    assert others == {k: v for k, v in file_values.items() if k != key}  # the rest: the file's
    assert cfg.masked()["event_system"][key] == value  # check-config shows the effective one


def test_empty_event_system_variable_does_not_override(tmp_path: Path) -> None:
    cfg = load_config(
        write(tmp_path, "event_system:\n  write_retry_attempts: 7\n"),
        env={"HEADSPACE_EVENT_SYSTEM_WRITE_RETRY_ATTEMPTS": ""},
    )
    assert cfg.event_system.write_retry_attempts == 7


BAD_EVENT_SYSTEM_ENV = [
    ("WRITE_RETRY_ATTEMPTS", "many", "expected an integer from 0 to 20"),
    ("WRITE_RETRY_ATTEMPTS", "21", "expected an integer from 0 to 20"),
    ("WRITE_RETRY_ATTEMPTS", "true", "expected an integer from 0 to 20"),
    ("WRITE_RETRY_DELAY_MS", "2.5", "expected an integer from 1 to 60000"),
    ("WRITE_RETRY_DELAY_MS", "0x10", "expected an integer from 1 to 60000"),
    ("MAX_RESTARTS_PER_MINUTE", "0", "expected an integer from 1 to 1000"),
    ("SHUTDOWN_TIMEOUT_SECONDS", " 5", "expected an integer from 1 to 300"),
    ("SHUTDOWN_TIMEOUT_SECONDS", "9" * 5000, "expected an integer from 1 to 300"),
]


@pytest.mark.parametrize(("suffix", "value", "expected"), BAD_EVENT_SYSTEM_ENV)
def test_bad_event_system_variable_names_the_variable_key_and_expectation(
    tmp_path: Path, suffix: str, value: str, expected: str
) -> None:
    variable = f"HEADSPACE_EVENT_SYSTEM_{suffix}"
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, ""), env={variable: value})
    message = str(info.value)
    assert f"'event_system.{suffix.lower()}': {expected}, got " in message
    assert message.endswith(f" (from {variable})")
    assert len(message) < 300  # a huge value is echoed capped


def test_unknown_event_system_variable_is_reported_with_the_known_ones(tmp_path: Path) -> None:
    env = {
        "HEADSPACE_EVENT_SYSTEM_RETRY_ATTEMPTS": "3",  # a typo would otherwise do nothing
        f"HEADSPACE_EVENT_SYSTEM_{SECRET.upper()}x": "1",  # not a name: only described
        "HEADSPACE_EVENT_SYSTEM_MAX_RESTARTS_PER_MINUTE": "-1",
    }
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, "logging:\n  level: LOUD\n"), env=env)
    message = str(info.value)
    assert "environment variable HEADSPACE_EVENT_SYSTEM_RETRY_ATTEMPTS is unknown" in message
    assert "HEADSPACE_EVENT_SYSTEM_WRITE_RETRY_ATTEMPTS" in message  # what was meant
    assert SECRET.upper() not in message
    # every problem at once: the unknown ones, a bad value from the environment, the file's
    assert "(from HEADSPACE_EVENT_SYSTEM_MAX_RESTARTS_PER_MINUTE)" in message
    assert "'logging.level'" in message


class _CircusWatcher:
    """What the hooks read of a circus watcher: its name, env, status and options."""

    def __init__(self, env: dict[str, str]) -> None:
        self.name = "headspace-watcher"
        self.env = env
        self.state = "starting"

    def status(self) -> str:
        return self.state

    def options(self) -> list[tuple[str, str]]:
        return []


def test_circus_crash_loop_limit_takes_the_environment_override(tmp_path: Path) -> None:
    """circus_hooks reads ``max_restarts_per_minute`` from the watcher's environment (what
    circus gives the service): the override is what stops a crash loop."""
    from headspace_watcher import circus_hooks

    path = write(tmp_path, "event_system:\n  max_restarts_per_minute: 5\n")
    watcher = _CircusWatcher(
        {
            ENV_CONFIG: str(path),
            ENV_STATE_DIR: str(tmp_path / "var"),
            "HEADSPACE_EVENT_SYSTEM_MAX_RESTARTS_PER_MINUTE": "2",
        }
    )
    assert circus_hooks.restart_limits(watcher) == (2, 60.0)
    assert circus_hooks.before_spawn(watcher, None, "before_spawn")  # the start itself
    watcher.state = "active"
    spawns = [circus_hooks.before_spawn(watcher, None, "before_spawn") for _ in range(3)]
    assert spawns == [True, True, False]  # 2 restarts, not the file's 5


def test_console_script_takes_and_checks_event_system_variables(tmp_path: Path) -> None:
    """The real process: ``check-config`` shows the override; a bad one exits 2 naming it."""
    import json
    import os
    import subprocess

    from watcher_helpers import WatcherEnv

    env = {k: v for k, v in os.environ.items() if not k.startswith("HEADSPACE_")}
    env |= {ENV_CONFIG: str(write(tmp_path, "")), ENV_STATE_DIR: str(tmp_path / "var")}

    def check_config(value: str) -> subprocess.CompletedProcess[str]:
        variables = {**env, "HEADSPACE_EVENT_SYSTEM_SHUTDOWN_TIMEOUT_SECONDS": value}
        command = [*WatcherEnv.command(), "check-config"]
        return subprocess.run(command, env=variables, capture_output=True, text=True, check=False)

    good = check_config("7")
    assert good.returncode == 0, good.stderr
    assert json.loads(good.stdout)["event_system"]["shutdown_timeout_seconds"] == 7

    bad = check_config("soon")
    assert bad.returncode == 2
    assert "(from HEADSPACE_EVENT_SYSTEM_SHUTDOWN_TIMEOUT_SECONDS)" in bad.stderr
    assert "expected an integer from 1 to 300, got 'soon' (from" in bad.stderr
    assert bad.stdout == ""
