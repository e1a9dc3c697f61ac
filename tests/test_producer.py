"""The producer API (store.producer via Store.transaction/produce) on a real PostgreSQL:
one event inside the caller's own transaction, an idempotency key, distinct outcomes."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, text

from headspace_watcher.records import Event
from headspace_watcher.store import Store

SESSION = "5b0f8c1e-2a7d-4f3b-9c6e-0d1a2b3c4d5e"
PROJECT = "/home/dev/src/headspace"
EVENT_TIME = datetime(2024, 3, 1, 12, 30, 15, 250000, tzinfo=UTC)


def transition(key: str | None = "sm:agent-1:task-7:1", **payload: Any) -> Event:
    body = {
        "agent_id": 1,
        "task_id": 7,
        "from_state": "idle",
        "to_state": "working",
        "trigger": "turn",
    }
    body.update(payload)
    return Event(
        "state_transition",
        body,
        EVENT_TIME,
        project_path=PROJECT,
        agent_key=SESSION,
        idempotency_key=key,
    )


def turn(i: int = 0, **kw: Any) -> Event:
    when = EVENT_TIME + timedelta(seconds=i)
    payload = {
        "session_uuid": SESSION,
        "actor": "user",
        "text": f"turn number {i}: ça marche ✓",
        "source": "hook",
        "turn_timestamp": when.isoformat(),
        "message_uuid": str(uuid.UUID(int=i + 1)),
    }
    return Event(
        "turn_detected",
        payload,
        when,
        project_path=PROJECT,
        agent_key=SESSION,
        idempotency_key=f"hook-turn-{i}",
        **kw,
    )


def rows(engine: Engine, sql: str, **params: Any) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(text(sql), params))


@pytest.fixture
def store(db_engine: Engine) -> Store:
    return Store.for_engine(db_engine)


def test_stored_event_gets_its_id_project_agent_and_line_time(
    store: Store, db_engine: Engine
) -> None:
    with store.transaction() as conn:
        outcome = store.produce(conn, turn(0))

    assert outcome.status == "stored" and isinstance(outcome.event_id, int)
    row = rows(db_engine, "SELECT * FROM events WHERE id = :i", i=outcome.event_id)[0]._mapping
    assert row["payload"]["text"] == "turn number 0: ça marche ✓"
    assert row["timestamp"] == EVENT_TIME  # when it happened, not when it was written
    assert row["idempotency_key"] == "hook-turn-0"
    project = rows(db_engine, "SELECT id, path FROM projects")
    agent = rows(db_engine, "SELECT id, session_uuid FROM agents")
    assert (row["project_id"], row["agent_id"]) == (project[0].id, agent[0].id)


def test_same_idempotency_key_twice_stores_nothing_the_second_time(
    store: Store, db_engine: Engine
) -> None:
    with store.transaction() as conn:
        first = store.produce(conn, transition())
    with store.transaction() as conn:
        second = store.produce(conn, transition(to_state="done"))  # same key, other payload

    assert first.status == "stored"
    assert second.status == "duplicate" and second.event_id is None
    stored = rows(db_engine, "SELECT payload->>'to_state' AS s FROM events")
    assert [r.s for r in stored] == ["working"]  # the first one is kept


def test_event_commits_with_the_callers_state_change_or_not_at_all(
    store: Store, db_engine: Engine
) -> None:
    """The state machine's own row and its state_transition commit together."""
    with db_engine.begin() as conn:
        conn.execute(text("CREATE TABLE agent_state (agent_id int PRIMARY KEY, state text)"))
    with store.transaction() as conn:
        conn.execute(text("INSERT INTO agent_state VALUES (1, 'working')"))
        assert store.produce(conn, transition()).stored

    with pytest.raises(RuntimeError, match="crash after the write"), store.transaction() as conn:
        conn.execute(text("UPDATE agent_state SET state = 'done' WHERE agent_id = 1"))
        assert store.produce(conn, transition("sm:agent-1:task-7:2", to_state="done")).stored
        raise RuntimeError("crash after the write")

    assert [r.state for r in rows(db_engine, "SELECT state FROM agent_state")] == ["working"]
    keys = [r.k for r in rows(db_engine, "SELECT idempotency_key AS k FROM events")]
    assert keys == ["sm:agent-1:task-7:1"]  # the rolled-back transition is gone with its state


def test_invalid_payload_is_rejected_with_reason_and_dead_letter_row(
    store: Store, db_engine: Engine
) -> None:
    with store.transaction() as conn:
        outcome = store.produce(conn, transition(trigger="whim"))

    assert outcome.status == "rejected"
    assert outcome.reason is not None and "'trigger'" in outcome.reason
    assert rows(db_engine, "SELECT count(*) AS n FROM events")[0].n == 0
    dead = rows(db_engine, "SELECT event_type, reason, details, raw_text FROM rejected_events")
    assert len(dead) == 1 and dead[0].event_type == "state_transition"
    assert dead[0].details == {"field": "trigger"}
    assert "whim" in dead[0].raw_text  # the payload is kept for a later replay


def test_unknown_event_type_is_rejected_naming_it(store: Store, db_engine: Engine) -> None:
    event = transition()
    event.event_type = "turn_exploded"
    with store.transaction() as conn:
        outcome = store.produce(conn, event)
    assert outcome.status == "rejected"
    assert "unknown event type 'turn_exploded'" in (outcome.reason or "")
    assert rows(db_engine, "SELECT event_type FROM rejected_events")[0].event_type == (
        "turn_exploded"
    )


def test_event_without_key_or_position_is_rejected_not_stored_unprotected(
    store: Store, db_engine: Engine
) -> None:
    with store.transaction() as conn:
        outcome = store.produce(conn, transition(key=None))
    assert outcome.status == "rejected" and (outcome.reason or "").startswith("unkeyed")
    assert rows(db_engine, "SELECT count(*) AS n FROM events")[0].n == 0
    assert rows(db_engine, "SELECT count(*) AS n FROM rejected_events")[0].n == 1


def test_value_the_database_refuses_is_rejected_and_the_transaction_goes_on(
    store: Store, db_engine: Engine
) -> None:
    """A NUL in a payload string: jsonb refuses it; the savepoint keeps the caller's work."""
    with store.transaction() as conn:
        conn.execute(text("CREATE TABLE side_effect (n int)"))
        conn.execute(text("INSERT INTO side_effect VALUES (1)"))
        refused = store.produce(conn, transition(note="a\x00b"))
        after = store.produce(conn, transition("sm:agent-1:task-7:9"))

    assert refused.status == "rejected" and "database_refused" in (refused.reason or "")
    assert after.status == "stored"
    assert rows(db_engine, "SELECT n FROM side_effect")[0].n == 1
