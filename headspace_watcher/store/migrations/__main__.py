"""``python -m headspace_watcher.store.migrations revision -m MESSAGE [--autogenerate]``: write the
next numbered revision file (see the package docstring)."""

from __future__ import annotations

import argparse
import os

from alembic import command

from headspace_watcher.store import migrations


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m headspace_watcher.store.migrations")
    sub = parser.add_subparsers(dest="command", required=True)
    revision = sub.add_parser("revision", help="write the next revision file")
    revision.add_argument("-m", "--message", required=True)
    revision.add_argument(
        "--autogenerate",
        action="store_true",
        help="diff db.metadata against $HEADSPACE_DATABASE_URL (a database at head)",
    )
    args = parser.parse_args(argv)
    url = os.environ.get("HEADSPACE_DATABASE_URL") if args.autogenerate else None
    next_id = f"{migrations.schema_version(migrations.head()) + 1:04d}"
    cfg = migrations.config(url=url)
    # The new file comes out formatted the way `ruff format --check` wants it.
    cfg.set_section_option("post_write_hooks", "hooks", "ruff")
    cfg.set_section_option("post_write_hooks", "ruff.type", "module")
    cfg.set_section_option("post_write_hooks", "ruff.module", "ruff")
    cfg.set_section_option("post_write_hooks", "ruff.options", "format REVISION_SCRIPT_FILENAME")
    command.revision(
        cfg,
        message=args.message,
        autogenerate=args.autogenerate,
        rev_id=next_id,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
