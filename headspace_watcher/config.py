"""Configuration: ``config.yaml`` plus environment overrides, validated up front.

A service that starts with a bad value fails later in a confusing way, so every key is
checked at load time and the error names the key and what was expected. Whatever the file
holds (a password, another program's secrets, an alias bomb), no message repeats it raw:
values are masked, redacted and capped before they are shown. Environment variables
(``ENV_KEYS``: the database URL, the two paths, ``HEADSPACE_EVENT_SYSTEM_<KEY>``) override
the file and are validated like its values; an error about one names the variable.

The result is a frozen ``Config`` of typed sections (``config.event_system.write_retry_attempts``),
so a misspelt key is an AttributeError at the line that reads it, not a KeyError at run time.
This module sits at the bottom of the package and imports nothing of ours but ``errors``:
which URL the service connects to (the embedded server's socket and password) is the
store's business (``store.embedded.database_url``).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
import reprlib
import stat
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote_plus

import yaml
from sqlalchemy.engine import make_url
from voluptuous import All, Invalid, Length, MultipleInvalid, Range, Required, Schema
from voluptuous import Any as AnyOf

from headspace_watcher import errors

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG_PATH = PROJECT_ROOT / "config.yaml"
DEFAULT_EMBEDDED_PORT = 54329

ENV_CONFIG = "HEADSPACE_CONFIG"
ENV_DATABASE_URL = "HEADSPACE_DATABASE_URL"
ENV_PROJECTS_PATH = "HEADSPACE_PROJECTS_PATH"
ENV_STATE_DIR = "HEADSPACE_STATE_DIR"
ENV_EVENT_SYSTEM_PREFIX = "HEADSPACE_EVENT_SYSTEM_"  # + the key in upper case

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

# Which variable overrides which key; an error about the key names the variable.
ENV_KEYS: dict[str, tuple[str, str]] = {
    ENV_DATABASE_URL: ("database", "url"),
    ENV_PROJECTS_PATH: ("file_watcher", "projects_path"),
    ENV_STATE_DIR: ("health", "state_dir"),
    **{f"{ENV_EVENT_SYSTEM_PREFIX}{key.upper()}": ("event_system", key)
       for key in DEFAULTS["event_system"]},
}  # fmt: skip


class ConfigError(errors.ConfigError):
    """A configuration value is wrong; the message names the key and the expectation.

    Every message is redacted and capped here, once for every raise site: a misplaced URL
    can be echoed back as "the value got", and a hostile file can make any message huge.
    It is the root's ``errors.ConfigError`` (what callers catch) with that guarantee added.
    """

    def __init__(self, message: str) -> None:
        super().__init__(_cap(redact_text(message), MAX_MESSAGE_CHARS))


MAX_MESSAGE_CHARS = 4000  # a whole ConfigError, however many problems it lists
MAX_VALUE_CHARS = 120  # one echoed value inside a message
MAX_PROBLEMS = 20  # problems listed one by one; the rest are counted
MAX_CONFIG_BYTES = 1 << 20  # a config is ~1 KiB; anything bigger is not one
MAX_YAML_NODES = 10_000  # after alias expansion; a config has about 50
MASK = "***"
UNPARSEABLE_URL = "<unparseable database URL>"
_SECRET_PARAMS = frozenset({"password", "sslpassword"})
_SCHEME_CHARS = frozenset(string.ascii_letters + string.digits + "+.-")
_MAX_SCHEME_CHARS = 32
_KEY_CHARS = frozenset(string.ascii_letters + string.digits + "_-")
MAX_KEY_CHARS = 40
_VARIABLE_CHARS = frozenset(string.ascii_uppercase + string.digits + "_")
MAX_VARIABLE_CHARS = 80
_DECIMAL = re.compile(r"[+-]?[0-9]{1,18}")  # bounded: int() of a huge string is slow or refused
_URL_LOOKAHEAD = 256  # how far past a space a password cut by it is still looked for
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
_URL_ALIASES = {"postgres": "postgresql+psycopg", "postgresql": "postgresql+psycopg"}


def _cap(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return f"{text[: limit - 40]}… ({len(text) - limit + 40} more characters)"


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
    value = _normalise_url(value)
    try:
        url = make_url(value)
    except Exception as exc:
        raise Invalid(f"expected a SQLAlchemy URL ({exc.__class__.__name__})") from None
    if not url.drivername.startswith("postgresql"):
        raise Invalid("expected a postgresql URL (postgresql+psycopg://user:password@host:port/db)")
    return value


def _normalise_url(url: str) -> str:
    """``postgres://`` and ``postgresql://`` (what psql and most hosts hand out) become the
    psycopg driver's URL, and a raw ``@`` inside the password is percent-encoded.

    Without the latter, ``user:pa@ss@host`` connects to host ``ss@host`` and the resolver's
    error ("could not translate host name "ss@host"") prints half the password.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    scheme = _URL_ALIASES.get(scheme.lower(), scheme)
    first_at = rest.find("@")
    colon = rest.find(":", 0, first_at)
    if first_at < 0 or colon < 0:
        return f"{scheme}://{rest}"
    query = rest.find("?", first_at)
    last_at = rest.rfind("@", first_at, len(rest) if query < 0 else query)
    password = rest[colon + 1 : last_at].replace("@", "%40")
    return f"{scheme}://{rest[: colon + 1]}{password}{rest[last_at:]}"


def _level(value: Any) -> str:
    if isinstance(value, str) and value.upper() in LEVELS:
        return value.upper()
    raise Invalid(f"expected one of: {', '.join(LEVELS)} (any case)")


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
            "level": _level,
        },
    }
)


@dataclass(frozen=True, slots=True)
class DatabaseConfig:
    """``database.*``: where the events go."""

    url: str | None  # None = the embedded PostgreSQL (store.embedded.database_url resolves it)
    connect_timeout_seconds: int
    embedded_port: int
    embedded_tcp: bool  # the embedded server also listens on 127.0.0.1 (the service never does)

    @property
    def embedded(self) -> bool:
        """No URL configured: the embedded PostgreSQL in the state dir is the database."""
        return self.url is None


@dataclass(frozen=True, slots=True)
class FileWatcherConfig:
    """``file_watcher.*``: which tree is read, and how much of it at once."""

    projects_path: Path  # expanded (``~``), not resolved: a symlinked tree keeps its name
    mode: Literal["all", "registered"]
    inactivity_timeout: int
    max_line_bytes: int
    read_chunk_bytes: int
    batch_max_lines: int
    batch_max_bytes: int


@dataclass(frozen=True, slots=True)
class EventSystemConfig:
    """``event_system.*`` (the seed's section): retries, restarts, the shutdown budget."""

    write_retry_attempts: int
    write_retry_delay_ms: int
    max_restarts_per_minute: int
    shutdown_timeout_seconds: int


@dataclass(frozen=True, slots=True)
class HealthConfig:
    """``health.*``: this instance's state directory and its reporting cadence."""

    state_dir: Path  # resolved; ``null`` in the file means var/ in the checkout
    heartbeat_interval_seconds: int


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"]


@dataclass(frozen=True, slots=True)
class Config:
    """The effective, validated configuration: one typed section per ``config.yaml`` section."""

    source: str
    database: DatabaseConfig
    file_watcher: FileWatcherConfig
    event_system: EventSystemConfig
    health: HealthConfig
    logging: LoggingConfig

    @property
    def projects_path(self) -> Path:
        """Shorthands for the two paths nearly every layer needs (the tree, the state dir)."""
        return self.file_watcher.projects_path

    @property
    def state_dir(self) -> Path:
        return self.health.state_dir

    @property
    def uses_embedded_database(self) -> bool:
        return self.database.embedded

    def masked(self) -> dict[str, Any]:
        """The effective config with the password hidden, for printing and logging (the
        shape of ``config.yaml`` plus ``source``: ``check-config`` documents it)."""
        shown: dict[str, Any] = {
            f.name: dataclasses.asdict(getattr(self, f.name))
            for f in dataclasses.fields(self)
            if f.name != "source"
        }
        url = self.database.url
        shown["database"]["url"] = mask_url(url) if url else None
        shown["file_watcher"]["projects_path"] = str(self.projects_path)
        shown["health"]["state_dir"] = str(self.state_dir)
        shown["source"] = self.source
        return shown


def mask_url(url: str) -> str:
    """Render a database URL with every password replaced by ``***``, in linear time.

    The userinfo is everything up to the LAST ``@`` (a raw ``@`` in a password must not end
    it early), and ``password=`` / ``sslpassword=`` query parameters (any case, encoded or
    not) are masked wherever they are. Something that is not ``scheme://…`` is never shown.
    """
    scheme, sep, rest = url.partition("://")
    if not sep or not _is_scheme(scheme) or not url.isprintable():
        return UNPARSEABLE_URL
    return f"{scheme}://{_mask_after_scheme(rest)}"


def _is_scheme(text: str) -> bool:
    return bool(text) and text[0].isascii() and text[0].isalpha() and set(text) <= _SCHEME_CHARS


def _mask_after_scheme(rest: str) -> str:
    at = rest.rfind("@")
    colon = rest.find(":", 0, at) if at >= 0 else -1
    if colon >= 0:
        rest = f"{rest[: colon + 1]}{MASK}{rest[at:]}"
    return _mask_query(rest)


def _mask_query(text: str) -> str:
    """Mask the values of secret parameters; a value runs to the next ``&`` (as parse_qsl
    reads it), and a ``?`` inside one may start another parameter, so both are candidates."""
    segments = text.split("&")
    for n, segment in enumerate(segments):
        parts = segment.split("?")
        start = 0 if n else 1  # the first segment's head is the host and path, not a parameter
        for i in range(start, len(parts)):
            key, eq, _ = parts[i].partition("=")
            if eq and unquote_plus(key).strip().lower() in _SECRET_PARAMS:
                segments[n] = "?".join([*parts[:i], f"{key}={MASK}"])
                break
    return "&".join(segments)


def redact_text(text: str) -> str:
    """Free text (an error message, a log line) with every URL password and every
    ``password=value`` masked; linear in the text's length, whatever it holds."""
    out: list[str] = []
    done = 0
    while (sep := text.find("://", done)) >= 0:
        start = sep
        while start > max(done, sep - _MAX_SCHEME_CHARS) and text[start - 1] in _SCHEME_CHARS:
            start -= 1
        end = _url_end(text, sep + 3)
        out.append(text[done:start])
        out.append(f"{text[start:sep]}://{_mask_after_scheme(text[sep + 3 : end])}")
        done = end
    out.append(text[done:])
    return _mask_conninfo("".join(out))


def _url_end(text: str, begin: int) -> int:
    """Where a URL that starts before ``begin`` ends: at whitespace — unless it has a
    ``user:`` but no ``@`` yet (a password with a space), then at the end of the next
    word holding an ``@`` on the same line, looked for within a bounded distance."""
    end = begin
    while end < len(text) and not text[end].isspace():
        end += 1
    span = text[begin:end]
    if "@" in span or ":" not in span:
        return end
    window_end = min(len(text), end + _URL_LOOKAHEAD)
    newline = text.find("\n", end, window_end)
    at = text.rfind("@", end, window_end if newline < 0 else newline)
    if at < 0:
        return end
    while at < len(text) and not text[at].isspace():
        at += 1
    return at


def _mask_conninfo(text: str) -> str:
    """``password=…`` outside a URL (a libpq conninfo string, an environment dump)."""
    lower = text.lower()
    out: list[str] = []
    done = 0
    while (hit := lower.find("password", done)) >= 0:
        value = hit + len("password")
        while value < len(text) and text[value] in " \t":
            value += 1
        if value >= len(text) or text[value] != "=":
            out.append(text[done:value])
            done = value
            continue
        value += 1
        end = _conninfo_value_end(text, value)
        out.append(f"{text[done:value]}{MASK}")
        done = end
    out.append(text[done:])
    return "".join(out)


def _conninfo_value_end(text: str, begin: int) -> int:
    if begin < len(text) and text[begin] in "'\"":
        close = text.find(text[begin], begin + 1)
        return len(text) if close < 0 else close + 1
    end = begin
    while end < len(text) and not text[end].isspace() and text[end] not in "&,;)'\"":
        end += 1
    return end


class _ShortRepr(reprlib.Repr):
    """reprlib with strings redacted before they are shortened (a cut must never leave half
    a URL whose password the masking could no longer find)."""

    def repr_str(self, x: str, level: int) -> str:
        return super().repr_str(redact_text(x), level)


_SHORT = _ShortRepr()
_SHORT.maxstring = _SHORT.maxother = MAX_VALUE_CHARS - 20
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict = 2, 4, 4


def _shown(value: Any) -> str:
    """A value as it may appear in a message: redacted, bounded in depth, width and length."""
    return _cap(_SHORT.repr(value), MAX_VALUE_CHARS)


def _key_text(key: Any) -> str:
    """A key as named in a message: a name is shown, anything else only described (keys of
    a file that is not a config, ``root:$6$…:`` from a shadow file, are its content)."""
    if isinstance(key, str) and 0 < len(key) <= MAX_KEY_CHARS and set(key) <= _KEY_CHARS:
        return key
    size = f" of {len(key)} characters" if isinstance(key, str) else ""
    return f"<{_kind(key)} key{size}>"


def _kind(value: Any) -> str:
    kinds = {bool: "a boolean", int: "a number", float: "a number", str: "a string",
             list: "a list", bytes: "binary data", type(None): "null"}  # fmt: skip
    return kinds.get(type(value), f"a {type(value).__name__} value")


def _merge(
    base: dict[str, Any], override: dict[Any, Any], problems: list[str], path: str = ""
) -> dict[str, Any]:
    """Defaults overlaid with the file; every unknown key or misplaced value is noted in
    ``problems`` (all reported at once), and the default stays in its place."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        where = f"{path}{_key_text(key)}"
        if key not in base:
            problems.append(f"config key {where!r} is unknown; expected one of: {sorted(base)}")
        elif isinstance(base[key], dict):
            if isinstance(value, dict):
                merged[key] = _merge(base[key], value, problems, f"{where}.")
            else:
                problems.append(f"config key {where!r}: expected a mapping, got {_shown(value)}")
        else:
            merged[key] = value
    return merged


def _read_file(path: Path) -> dict[Any, Any]:
    """The file's top-level mapping; never its text in an error (it may be anything)."""
    text = _read_text(path)
    try:
        data = _parse_yaml(text, path)
    except yaml.MarkedYAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {_yaml_problem(exc)}") from None
    except yaml.reader.ReaderError as exc:  # a control character
        raise ConfigError(
            f"config file {path} is not valid YAML: {exc.reason} (character {exc.position})"
        ) from None
    except yaml.YAMLError:
        raise ConfigError(f"config file {path} is not valid YAML") from None
    except RecursionError:
        raise ConfigError(f"config file {path}: YAML nested too deeply for a config") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {path}: expected a mapping at top level (key: value lines), "
            f"found {_kind(data)}; is it a config file?"
        )
    return data


def _read_text(path: Path) -> str:
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"config file {path} cannot be read: not a regular file")
        with path.open("rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist (set {ENV_CONFIG})") from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {path} is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"config file {path} is not UTF-8 text (byte offset {exc.start}); is it a config file?"
        ) from None


def _parse_yaml(text: str, path: Path) -> Any:
    """``yaml.safe_load`` that refuses a document whose aliases expand beyond a bound
    before anything is built from it (a "billion laughs" file is a few hundred bytes)."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expands_beyond(node, MAX_YAML_NODES):
            raise ConfigError(
                f"config file {path}: its YAML expands to more than {MAX_YAML_NODES} values "
                "(aliases or size); a config has about 50"
            )
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _expands_beyond(root: yaml.Node, limit: int) -> bool:
    """Count nodes as if every alias were copied out (a self-reference counts as
    unbounded); iterative and memoised per node, so counting costs only the unexpanded
    graph."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        key = id(node)
        children = _children(node)
        if finished:
            open_nodes.discard(key)
            sizes[key] = 1 + sum(sizes[id(c)] for c in children)
            if sizes[key] > limit:
                return True
        elif key not in sizes:
            if key in open_nodes:
                return True
            open_nodes.add(key)
            stack.append((node, True))
            stack.extend((c, False) for c in children if id(c) not in sizes)
    return False


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def _yaml_problem(exc: yaml.MarkedYAMLError) -> str:
    """What PyYAML found and where — without its snippet of the offending line."""
    parts = [_quoted_tokens_hidden(exc.problem or "syntax error")]
    if exc.problem_mark is not None:
        parts.append(f"at line {exc.problem_mark.line + 1}, column {exc.problem_mark.column + 1}")
    if exc.context:
        where = exc.context_mark
        line = f" (line {where.line + 1}, column {where.column + 1})" if where else ""
        parts.append(f"({_quoted_tokens_hidden(exc.context)}{line})")
    return _cap(" ".join(parts), 300)


def _quoted_tokens_hidden(text: str) -> str:
    """PyYAML quotes tokens from the file ('!tag', 'alias'); keep its own token names
    ('<block end>') and single characters, hide the rest."""
    out: list[str] = []
    done = 0
    while (opening := text.find("'", done)) >= 0:
        closing = text.find("'", opening + 1)
        if closing < 0:
            break
        token = text[opening + 1 : closing]
        keep = token.startswith("<") or len(token) <= 2
        out.append(f"{text[done:opening]}'{token if keep else '…'}'")
        done = closing + 1
    out.append(text[done:])
    return "".join(out)


def _describe(error: Invalid, data: dict[str, Any], origins: dict[tuple[Any, ...], str]) -> str:
    key = ".".join(_key_text(p) for p in error.path)
    value: Any = data
    for part in error.path:
        value = value.get(part) if isinstance(value, dict) else None
    if key.startswith("database.url") and isinstance(value, str):
        value = mask_url(value)
    variable = origins.get(tuple(error.path))
    source = f" (from {variable})" if variable else ""
    return f"config key {key!r}: {error.msg}, got {_shown(value)}{source}"


def _problems_text(problems: list[str]) -> str:
    shown = problems[:MAX_PROBLEMS]
    more = len(problems) - len(shown)
    return "; ".join(shown) + (f"; and {more} more problems" if more else "")


def load_config(path: str | Path | None = None, env: dict[str, str] | None = None) -> Config:
    """Load, merge and validate; raise one ConfigError naming every offending key."""
    env = dict(os.environ) if env is None else env
    cfg_path = Path(path or env.get(ENV_CONFIG) or DEFAULT_CONFIG_PATH).expanduser()
    problems: list[str] = []
    data = _merge(DEFAULTS, _read_file(cfg_path), problems)
    origins = _apply_env(data, env, problems)
    try:
        data = SCHEMA(data)
    except MultipleInvalid as exc:
        problems.extend(_describe(e, data, origins) for e in exc.errors)
    if problems:
        raise ConfigError(_problems_text(problems))
    return _typed(data, str(cfg_path))


def _apply_env(
    data: dict[str, Any], env: dict[str, str], problems: list[str]
) -> dict[tuple[Any, ...], str]:
    """Overlay the environment (a set, non-empty variable wins over the file); return which
    key came from which variable, so that an error names the variable the operator set."""
    origins: dict[tuple[Any, ...], str] = {}
    for name, (section, key) in ENV_KEYS.items():
        if env.get(name):
            data[section][key] = _env_value(env[name], DEFAULTS[section][key])
            origins[(section, key)] = name
    for name in env:
        if name.startswith(ENV_EVENT_SYSTEM_PREFIX) and name not in ENV_KEYS:
            problems.append(
                f"environment variable {_variable_text(name)} is unknown; expected one of: "
                f"{sorted(n for n in ENV_KEYS if n.startswith(ENV_EVENT_SYSTEM_PREFIX))}"
            )
    return origins


def _env_value(text: str, default: Any) -> Any:
    """An environment value as the file would hold it: a key whose default is an integer
    takes the integer a decimal string spells; anything else stays a string, for the schema
    to refuse with the key's own expectation."""
    if isinstance(default, int) and _DECIMAL.fullmatch(text):
        return int(text)
    return text


def _variable_text(name: str) -> str:
    """An environment variable as named in a message (only a name: the environment is ours
    to read, not to print)."""
    if len(name) <= MAX_VARIABLE_CHARS and set(name) <= _VARIABLE_CHARS:
        return name
    return f"<a variable named {ENV_EVENT_SYSTEM_PREFIX}… of {len(name)} characters>"


def _typed(data: dict[str, Any], source: str) -> Config:
    """The validated mapping as typed sections; the two paths made usable once, here."""
    state_dir = data["health"]["state_dir"] or str(PROJECT_ROOT / "var")
    projects_path = Path(data["file_watcher"]["projects_path"]).expanduser()
    return Config(
        source=source,
        database=DatabaseConfig(**data["database"]),
        file_watcher=FileWatcherConfig(**{**data["file_watcher"], "projects_path": projects_path}),
        event_system=EventSystemConfig(**data["event_system"]),
        health=HealthConfig(
            state_dir=Path(state_dir).expanduser().resolve(),
            heartbeat_interval_seconds=data["health"]["heartbeat_interval_seconds"],
        ),
        logging=LoggingConfig(**data["logging"]),
    )
