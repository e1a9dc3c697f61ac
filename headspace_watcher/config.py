"""Configuration: ``config.yaml`` plus environment overrides, validated up front.

A service that starts with a bad value fails later in a confusing way, so every key is
checked at load time and the error names the key, the value and what was expected.
"""

from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy.engine import make_url
from voluptuous import All, In, Invalid, Length, MultipleInvalid, Range, Required, Schema
from voluptuous import Any as AnyOf

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG_PATH = PROJECT_ROOT / "config.yaml"
DEFAULT_EMBEDDED_PORT = 54329

ENV_CONFIG = "HEADSPACE_CONFIG"
ENV_DATABASE_URL = "HEADSPACE_DATABASE_URL"
ENV_PROJECTS_PATH = "HEADSPACE_PROJECTS_PATH"
ENV_STATE_DIR = "HEADSPACE_STATE_DIR"

DEFAULTS: dict[str, Any] = {
    "database": {
        "url": None,
        "connect_timeout_seconds": 5,
        "embedded_port": DEFAULT_EMBEDDED_PORT,
        "embedded_tcp": False,
    },
    "file_watcher": {
        "projects_path": "~/.claude/projects",
        "mode": "all",
        "inactivity_timeout": 5400,
        "max_line_bytes": 64 * 1024 * 1024,
        "read_chunk_bytes": 256 * 1024,
        "batch_max_lines": 1000,
        "batch_max_bytes": 1024 * 1024,
    },
    "event_system": {
        "write_retry_attempts": 3,
        "write_retry_delay_ms": 100,
        "max_restarts_per_minute": 5,
        "shutdown_timeout_seconds": 2,
    },
    "health": {"state_dir": None, "heartbeat_interval_seconds": 5},
    "logging": {"level": "INFO"},
}


class ConfigError(Exception):
    """A configuration value is wrong; the message names key, value and expectation.

    Any ``scheme://user:password@`` in the message is masked here, once for every raise
    site: a misplaced URL can be echoed back as "the value got" or in a YAML error snippet.
    """

    def __init__(self, message: str) -> None:
        super().__init__(_URL_PASSWORD.sub(r"\1***@", message))


_URL_PASSWORD = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^:/@\s]*:)[^@\s]*@")


def _not_bool(value: Any) -> Any:
    # YAML `true` is a Python bool, which is an int: without this `attempts: true` passes as 1.
    if isinstance(value, bool):
        raise Invalid("expected an integer, not a boolean")
    return value


def _int(lo: int, hi: int) -> Any:
    return All(_not_bool, int, Range(min=lo, max=hi), msg=f"expected an integer from {lo} to {hi}")


def _url(value: Any) -> str | None:
    # Handles None itself: wrapped in AnyOf(None, …) its message became "not a valid value".
    if value is None:
        return None
    if not isinstance(value, str):
        raise Invalid("expected a SQLAlchemy URL string such as postgresql+psycopg://user@host/db")
    try:
        url = make_url(value)
    except Exception as exc:
        raise Invalid(f"expected a SQLAlchemy URL ({exc.__class__.__name__})") from None
    if not url.drivername.startswith("postgresql"):
        raise Invalid("expected a postgresql URL (postgresql+psycopg://user:password@host:port/db)")
    return value


_STR = All(str, Length(min=1), msg="expected a non-empty string")
SCHEMA = Schema(
    {
        Required("database"): {
            "url": _url,
            "connect_timeout_seconds": _int(1, 300),
            "embedded_port": _int(1024, 65535),
            "embedded_tcp": All(bool, msg="expected true or false"),
        },
        Required("file_watcher"): {
            "projects_path": _STR,
            "mode": AnyOf("all", "registered", msg="expected one of: all, registered"),
            "inactivity_timeout": _int(1, 30 * 24 * 3600),
            "max_line_bytes": _int(1024, 1 << 40),
            "read_chunk_bytes": _int(4096, 256 * 1024 * 1024),
            "batch_max_lines": _int(1, 1_000_000),
            "batch_max_bytes": _int(4096, 1 << 32),
        },
        Required("event_system"): {
            "write_retry_attempts": _int(0, 20),
            "write_retry_delay_ms": _int(1, 60_000),
            "max_restarts_per_minute": _int(1, 1000),
            "shutdown_timeout_seconds": _int(1, 300),
        },
        Required("health"): {
            "state_dir": AnyOf(None, _STR, msg="expected null or a non-empty string"),
            "heartbeat_interval_seconds": _int(1, 3600),
        },
        Required("logging"): {
            "level": In(["DEBUG", "INFO", "WARNING", "ERROR"]),
        },
    }
)


@dataclass(frozen=True, slots=True)
class Config:
    """The effective, validated configuration."""

    raw: dict[str, Any]
    source: str
    database_url: str | None
    projects_path: Path
    state_dir: Path

    @property
    def file_watcher(self) -> dict[str, Any]:
        return self.raw["file_watcher"]

    @property
    def event_system(self) -> dict[str, Any]:
        return self.raw["event_system"]

    @property
    def uses_embedded_database(self) -> bool:
        return self.database_url is None

    @property
    def embedded_tcp(self) -> bool:
        """Whether the embedded server also listens on 127.0.0.1 (the service never uses it)."""
        return bool(self.raw["database"]["embedded_tcp"])

    def resolved_database_url(self) -> str:
        """The URL to connect to: the configured one, or the embedded server's — its
        non-superuser service role over the private unix socket (never TCP, which another
        local user could squat)."""
        if self.database_url is not None:
            return self.database_url
        from headspace_watcher.store import embedded as pgserver

        port = self.raw["database"]["embedded_port"]
        return pgserver.embedded_url(self.state_dir, port)

    def masked(self) -> dict[str, Any]:
        """The effective config with the password hidden, for printing and logging."""
        shown = copy.deepcopy(self.raw)
        shown["database"]["url"] = mask_url(self.database_url) if self.database_url else None
        shown["file_watcher"]["projects_path"] = str(self.projects_path)
        shown["health"]["state_dir"] = str(self.state_dir)
        shown["source"] = self.source
        return shown


def mask_url(url: str) -> str:
    """Render a database URL with its password replaced by ``***``."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<unparseable database URL>"


def _merge(base: dict[str, Any], override: dict[str, Any], path: str = "") -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        where = f"{path}{key}"
        if key not in base:
            raise ConfigError(f"config key {where!r} is unknown; expected one of: {sorted(base)}")
        if isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise ConfigError(f"config key {where!r}: expected a mapping, got {value!r}")
            merged[key] = _merge(base[key], value, f"{where}.")
        else:
            merged[key] = value
    return merged


def _read_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist (set {ENV_CONFIG})") from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping at top level, got {data!r}")
    return data


def _describe(error: Invalid, data: dict[str, Any]) -> str:
    key = ".".join(str(p) for p in error.path)
    value: Any = data
    for part in error.path:
        value = value.get(part) if isinstance(value, dict) else None
    if key.startswith("database.url") and isinstance(value, str):
        value = mask_url(value)
    return f"config key {key!r}: {error.msg}, got {value!r}"


def load_config(path: str | Path | None = None, env: dict[str, str] | None = None) -> Config:
    """Load, merge and validate; raise ConfigError naming the offending key."""
    env = dict(os.environ) if env is None else env
    cfg_path = Path(path or env.get(ENV_CONFIG) or DEFAULT_CONFIG_PATH).expanduser()
    data = _merge(DEFAULTS, _read_file(cfg_path))
    if env.get(ENV_DATABASE_URL):
        data["database"]["url"] = env[ENV_DATABASE_URL]
    if env.get(ENV_PROJECTS_PATH):
        data["file_watcher"]["projects_path"] = env[ENV_PROJECTS_PATH]
    if env.get(ENV_STATE_DIR):
        data["health"]["state_dir"] = env[ENV_STATE_DIR]
    try:
        data = SCHEMA(data)
    except MultipleInvalid as exc:
        raise ConfigError("; ".join(_describe(e, data) for e in exc.errors)) from None
    state_dir = data["health"]["state_dir"] or str(PROJECT_ROOT / "var")
    return Config(
        raw=data,
        source=str(cfg_path),
        database_url=data["database"]["url"],
        projects_path=Path(data["file_watcher"]["projects_path"]).expanduser(),
        state_dir=Path(state_dir).expanduser().resolve(),
    )
