"""The capture trigger inside the application's statements (issues #21 items 3-6, #19 item 2).

What a DBA must be able to count on once the outbox is installed in a busy store database:
writers need no new privilege and cannot forge events, routine DDL never breaks their writes,
TRUNCATE and ``session_replication_role = replica`` do not lose changes silently, and a
primary-key change does not leave a ghost aggregate in the sinks.
"""
from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner

from outbox import contract
from outbox.cli import cli
from tests.support.records import Rec

pytestmark = pytest.mark.integration

LEGACY = """
CREATE SCHEMA pos;
CREATE TABLE pos.customers (id serial PRIMARY KEY, name text, email text UNIQUE NOT NULL, prefs json);
CREATE TABLE pos.order_lines (order_id bigint NOT NULL, line_no int NOT NULL, sku text, qty int,
                              PRIMARY KEY (order_id, line_no));
INSERT INTO pos.customers (name, email) VALUES ('Ada', 'ada@example.com');
"""
CAPTURES = ["--capture", "pos.customers=customer", "--capture", "pos.order_lines=order_line"]


@pytest.fixture
def legacy(new_database: Callable[..., str]) -> str:
    dsn = new_database("cap")
    with psycopg.connect(dsn) as conn:
        conn.execute(LEGACY)
    return dsn


@pytest.fixture
def roles(legacy: str) -> Iterator[Callable[[], str]]:
    """Factory of LOGIN roles of this test's own, dropped at the end (with what they hold in ``legacy``)."""
    made: list[str] = []

    def make() -> str:
        name = f"t_app_{uuid.uuid4().hex[:8]}"
        query(legacy, f"CREATE ROLE {name} LOGIN")
        made.append(name)
        return name

    yield make
    for name in made:
        query(legacy, f"DROP OWNED BY {name}")
        query(legacy, f"DROP ROLE {name}")


def install(dsn: str, *args: str) -> str:
    result = CliRunner().invoke(cli, ["install", "--dsn", dsn, *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def query(dsn: str, sql: str, *params: Any, user: str | None = None) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True, **({"user": user} if user else {})) as conn:
        cur = conn.execute(sql, params or None)
        return cur.fetchall() if cur.description else []


def events(dsn: str) -> list[tuple[str, str, dict[str, Any], str | None]]:
    rows = query(dsn, "SELECT aggregateid, type, payload::text, origin FROM outbox.events "
                      "WHERE type <> %s ORDER BY created_at, ctid", contract.HEARTBEAT_TYPE)
    return [(i, t, json.loads(p), o) for i, t, p, o in rows]


def grant_writer(dsn: str, role: str) -> None:
    """What a legacy application role has: its own tables, nothing of the outbox."""
    query(dsn, f"GRANT USAGE ON SCHEMA pos TO {role}")
    query(dsn, f"GRANT SELECT, INSERT, UPDATE, DELETE ON pos.customers, pos.order_lines TO {role}")
    query(dsn, f"GRANT USAGE ON SEQUENCE pos.customers_id_seq TO {role}")


# --------------------------------------------------------------------------- item 3: privileges
def test_a_writer_with_only_its_table_privileges_keeps_writing(legacy: str, roles: Callable[[], str]) -> None:
    install(legacy, *CAPTURES)
    app = roles()
    grant_writer(legacy, app)
    query(legacy, "INSERT INTO pos.customers (name, email) VALUES ('Bo', 'bo@example.com')", user=app)
    query(legacy, "UPDATE pos.customers SET name = 'Bob' WHERE email = 'bo@example.com'", user=app)
    assert [(t, p["name"]) for _, t, p, _ in events(legacy)] == [("customer.created", "Bo"), ("customer.updated", "Bob")]


def test_a_writer_can_neither_forge_events_nor_hide_its_changes_behind_an_origin(
        legacy: str, roles: Callable[[], str]) -> None:
    install(legacy, *CAPTURES)
    app, writeback = roles(), roles()
    grant_writer(legacy, app)
    CliRunner().invoke(cli, ["grant", "--dsn", legacy, "--writeback-role", writeback], catch_exceptions=False)
    grant_writer(legacy, writeback)
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        query(legacy, "INSERT INTO outbox.events (aggregatetype, aggregateid, type, payload) "
                      "VALUES ('customer', '1', 'customer.deleted', '{}')", user=app)
    with psycopg.connect(legacy, user=app) as conn:
        conn.execute("SELECT set_config('outbox.origin', 'crm', true)")
        conn.execute("UPDATE pos.customers SET name = 'Mallory' WHERE id = 1")
    with psycopg.connect(legacy, user=writeback) as conn:
        conn.execute("SELECT set_config('outbox.origin', 'crm', true)")
        conn.execute("UPDATE pos.customers SET name = 'Ada (CRM)' WHERE id = 1")
    # the writer's change reaches the CRM sink (no origin); the write-back's keeps its origin
    assert [(p["name"], o) for _, _, p, o in events(legacy)] == [("Mallory", None), ("Ada (CRM)", "crm")]


# --------------------------------------------------------------------------- item 4: legacy DDL
def test_renaming_the_key_column_does_not_break_writes(legacy: str) -> None:
    install(legacy, *CAPTURES)
    query(legacy, "ALTER TABLE pos.customers RENAME COLUMN id TO customer_id")
    query(legacy, "INSERT INTO pos.customers (name, email) VALUES ('Bo', 'bo@example.com')")
    query(legacy, "UPDATE pos.order_lines SET qty = 1")  # nothing there: no event, no error
    assert [(i, t) for i, t, _, _ in events(legacy)] == [("2", "customer.created")]


def test_a_new_primary_key_is_used_at_once(legacy: str) -> None:
    install(legacy, *CAPTURES)
    query(legacy, "ALTER TABLE pos.customers DROP CONSTRAINT customers_pkey, ADD PRIMARY KEY (email)")
    query(legacy, "UPDATE pos.customers SET name = 'Ada L.' WHERE id = 1")
    assert [(i, t) for i, t, _, _ in events(legacy)] == [("ada@example.com", "customer.updated")]


def test_a_table_without_primary_key_parks_its_changes_instead_of_failing(legacy: str) -> None:
    install(legacy, *CAPTURES)
    query(legacy, "ALTER TABLE pos.customers DROP CONSTRAINT customers_pkey")
    query(legacy, "INSERT INTO pos.customers (id, name, email) VALUES (5, 'Cy', 'cy@example.com')")  # no error
    assert [t for _, t, _, _ in events(legacy)] == [contract.CAPTURE_PARKED_TYPE]
    parked = query(legacy, "SELECT table_name, type, aggregateid, payload->>'name', error FROM outbox.parked")
    assert len(parked) == 1
    table, etype, aggregate_id, name, error = parked[0]
    assert (table, etype, aggregate_id, name) == ("pos.customers", "customer.created", "", "Cy")
    assert "no primary key" in error
    # fixed by the DBA, then re-driven: the event gets its key from the primary key now there
    query(legacy, "ALTER TABLE pos.customers ADD PRIMARY KEY (id)")
    assert query(legacy, "SELECT outbox.redrive_parked(id) FROM outbox.parked") == [(True,)]
    assert events(legacy)[-1][:2] == ("5", "customer.created")
    assert query(legacy, "SELECT count(*) FROM outbox.parked") == [(0,)]


def test_doctor_compares_the_registered_key_with_the_primary_key(legacy: str) -> None:
    install(legacy, *CAPTURES)
    query(legacy, "ALTER TABLE pos.customers DROP CONSTRAINT customers_pkey, ADD PRIMARY KEY (email)")
    query(legacy, "ALTER TABLE pos.order_lines DROP CONSTRAINT order_lines_pkey")
    query(legacy, "INSERT INTO pos.order_lines VALUES (1, 1, 'x', 1)")
    out = CliRunner().invoke(cli, ["doctor", "--dsn", legacy], catch_exceptions=False).output
    assert "registered key (id), primary key now (email)" in out, out
    assert "pos.order_lines has no primary key" in out, out
    assert "1 change parked by the capture trigger" in out, out


# --------------------------------------------------------------------------- item 5: TRUNCATE
def test_truncate_emits_a_truncated_event(legacy: str) -> None:
    install(legacy, *CAPTURES)
    query(legacy, "INSERT INTO pos.order_lines VALUES (1, 1, 'x', 1)")
    query(legacy, "TRUNCATE pos.order_lines")
    got = events(legacy)
    assert [(i, t) for i, t, _, _ in got] == [("1:1", "order_line.created"), ("*", "order_line.truncated")]
    assert got[-1][2] == {"table": "pos.order_lines"}



class NoDeadLetters:
    async def park(self, items: list[Any]) -> None:
        assert not items, items


def test_the_read_store_honours_truncated(readstore_db: str) -> None:
    from outbox.consumers import readstore as rs

    t0 = datetime(2025, 3, 1, tzinfo=timezone.utc)

    def rec(aggregate: str, aggregate_id: str, etype: str, lsn: int, offset: int) -> Rec:
        row = contract.OutboxRow(id=str(uuid.uuid4()), aggregatetype=aggregate, aggregateid=aggregate_id,
                                 type=f"{aggregate}.{etype}", payload=json.dumps({"id": aggregate_id}))
        r = contract.build_record(row, source_id="s1", prefix="outbox", position=contract.Position(lsn, 0),
                                  commit_time=t0, xid=lsn)
        return Rec(r.topic, 0, offset, r.key, r.value, r.headers)

    async def apply(records: list[Rec]) -> None:
        async with rs.ReadStore(readstore_db, "g") as store:
            await store.write(rs.plan_batch(records), NoDeadLetters())  # type: ignore[arg-type]

    asyncio.run(apply([rec("order_line", "1:1", "created", 10, 0), rec("order_line", "1:2", "created", 11, 1),
                       rec("customer", "1", "created", 12, 2)]))
    # one batch: the truncate, then a row created after it
    asyncio.run(apply([rec("order_line", "*", "truncated", 20, 3), rec("order_line", "1:3", "created", 21, 4)]))
    rows = query(readstore_db, "SELECT aggregate_type, aggregate_id, deleted, event_type FROM readstore.entities "
                               "ORDER BY 1, 2")
    assert rows == [("customer", "1", False, "customer.created"),
                    ("order_line", "1:1", True, "order_line.truncated"),
                    ("order_line", "1:2", True, "order_line.truncated"),
                    ("order_line", "1:3", False, "order_line.created")]


# --------------------------------------------------------------------------- item 6: replica role
def test_capture_always_captures_sessions_in_replica_mode(legacy: str) -> None:
    install(legacy, *CAPTURES, "--capture-always")
    with psycopg.connect(legacy) as conn:
        conn.execute("SET session_replication_role = replica")
        conn.execute("INSERT INTO pos.order_lines VALUES (1, 1, 'x', 1)")
        conn.execute("TRUNCATE pos.order_lines")
    assert [(i, t) for i, t, _, _ in events(legacy)] == [("1:1", "order_line.created"), ("*", "order_line.truncated")]
    assert "(always)" in CliRunner().invoke(cli, ["doctor", "--dsn", legacy], catch_exceptions=False).output


def test_doctor_warns_when_replica_mode_would_skip_the_triggers(legacy: str) -> None:
    install(legacy, *CAPTURES)
    db = legacy.split("=", 1)[1]
    query(legacy, f'ALTER DATABASE "{db}" SET session_replication_role = replica')
    out = CliRunner().invoke(cli, ["doctor", "--dsn", legacy], catch_exceptions=False).output
    assert "session_replication_role" in out and "--capture-always" in out, out


# --------------------------------------------------------------------------- #19 item 2: key change
def test_a_key_change_deletes_the_old_aggregate_and_creates_the_new_one(legacy: str) -> None:
    install(legacy, *CAPTURES)
    query(legacy, "INSERT INTO pos.order_lines VALUES (7, 1, 'A', 1)")
    query(legacy, "UPDATE pos.customers SET id = 101 WHERE id = 1")
    query(legacy, "UPDATE pos.order_lines SET line_no = 2, qty = 3")
    got = [(i, t, p.get("id", p.get("qty"))) for i, t, p, _ in events(legacy)]
    assert got == [("7:1", "order_line.created", 1),
                   ("1", "customer.deleted", 1), ("101", "customer.created", 101),
                   ("7:1", "order_line.deleted", 1), ("7:2", "order_line.created", 3)]
