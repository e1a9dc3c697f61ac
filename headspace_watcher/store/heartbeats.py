"""The ``watcher_heartbeats`` row: what a dashboard on another machine sees of this watcher."""

from __future__ import annotations

import json
import os
import socket
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.dialects.postgresql import insert as pg_insert

from headspace_watcher.store.schema import heartbeats


def beat(engine: Engine, watcher_id: str, snapshot: dict[str, Any]) -> None:
    """Upsert this watcher's heartbeat row; failures are the caller's to log."""
    values = {
        "watcher_id": watcher_id,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started_at": snapshot["started_at"],
        "beat_at": datetime.now(UTC),
        "state": snapshot["state"],
        "health": json.loads(json.dumps(snapshot, default=str)),
    }
    stmt = pg_insert(heartbeats).values(values)
    stmt = stmt.on_conflict_do_update(
        index_elements=["watcher_id"], set_={k: stmt.excluded[k] for k in values}
    )
    with engine.begin() as conn:
        conn.execute(stmt)
