"""``headspace-watcher`` command line: run, status, init-db, check-config, register, setup."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from types import FrameType
from typing import TYPE_CHECKING

from headspace_watcher import __version__

if TYPE_CHECKING:
    from headspace_watcher.config import Config

EXIT_CONFIG = 2
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


def cmd_init_db(args: argparse.Namespace) -> int:
    from headspace_watcher import config as config_mod
    from headspace_watcher.store import Store
    from headspace_watcher.store.embedded import database_url

    config = _config(args)
    _setup_logging(config.logging.level)
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
    from headspace_watcher.service.registration import register_session

    config = _config(args)
    _setup_logging(config.logging.level)
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
    from headspace_watcher.service.registration import unregister_session

    config = _config(args)
    _setup_logging(config.logging.level)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="headspace-watcher", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--config", help="config file (default: $HEADSPACE_CONFIG or config.yaml)")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the service (what circus runs)")
    run.add_argument("--once", action="store_true", help="ingest what is present, then exit")
    run.set_defaults(func=cmd_run)

    status = sub.add_parser("status", help="health of the service on this machine")
    status.add_argument("--json", action="store_true", help="one JSON object")
    status.set_defaults(func=cmd_status)

    sub.add_parser("init-db", help="create or upgrade the schema").set_defaults(func=cmd_init_db)
    sub.add_parser("check-config", help="validate and print the config").set_defaults(
        func=cmd_check_config
    )
    sub.add_parser("setup", help="embedded database + schema (used by just setup)").set_defaults(
        func=cmd_setup
    )

    reg = sub.add_parser("register", help="register a session for monitoring")
    reg.add_argument("session_uuid")
    reg.add_argument("--project-path", required=True)
    reg.add_argument("--working-directory", required=True)
    reg.add_argument("--iterm-pane-id")
    reg.set_defaults(func=cmd_register)

    unreg = sub.add_parser("unregister", help="stop monitoring a session")
    unreg.add_argument("session_uuid")
    unreg.set_defaults(func=cmd_unregister)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.exit_now = argv is None  # the real process (console script), not an in-process call
    args.early_signal = _catch_early_stop() if args.exit_now and args.command == "run" else None
    from headspace_watcher.config import ConfigError

    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"headspace-watcher: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a clear one-line error, never a traceback with secrets
        from headspace_watcher.config import redact_text
        from headspace_watcher.store.retry import describe

        # a driver's error text can quote the conninfo, password included
        message = redact_text(describe(exc))
        print(f"headspace-watcher: {args.command} failed: {message}", file=sys.stderr)
        logging.getLogger(__name__).debug("details", exc_info=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
