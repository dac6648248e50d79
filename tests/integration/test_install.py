"""outbox install / uninstall on a real PostgreSQL with a legacy schema already in place."""
from __future__ import annotations

import dataclasses
import subprocess
import sys
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import psycopg
import pytest

import outbox.install as inst
from tests.support.install import CAPTURES, LEGACY, dbname, events, ok, one_line_error, query, run
from tests.support.wait import wait_until

pytestmark = pytest.mark.integration




@pytest.fixture
def legacy(new_database: Callable[..., str]) -> str:
    dsn = new_database("inst")
    with psycopg.connect(dsn) as conn:
        conn.execute(LEGACY)
    return dsn


def legacy_state(dsn: str) -> dict[str, Any]:
    return {
        "alembic": query(dsn, "SELECT * FROM public.alembic_version"),
        "tables": query(dsn, "SELECT table_schema, table_name FROM information_schema.tables "
                             "WHERE table_schema IN ('pos', 'public') ORDER BY 1, 2"),
        "customers": query(dsn, "SELECT * FROM pos.customers ORDER BY id"),
        "orders": query(dsn, "SELECT * FROM pos.orders ORDER BY id"),
        "lines": query(dsn, "SELECT * FROM pos.order_lines ORDER BY 1, 2"),
        "audit": query(dsn, "SELECT * FROM pos.audit"),
    }


def outbox_objects(dsn: str) -> dict[str, Any]:
    """Everything install may create; all empty on a database without the outbox."""
    return {
        "schema": query(dsn, "SELECT nspname FROM pg_namespace WHERE nspname IN ('outbox', 'outbox_crm') ORDER BY 1"),
        "publication": query(dsn, "SELECT pubname FROM pg_publication"),
        "triggers": query(dsn, "SELECT tgrelid::regclass::text FROM pg_trigger WHERE NOT tgisinternal"),
        "functions": query(dsn, "SELECT proname FROM pg_proc WHERE proname = 'capture_change'"),
        "slots": query(dsn, "SELECT slot_name FROM pg_replication_slots WHERE database = current_database()"),
    }


# --------------------------------------------------------------------------- install / uninstall
def test_install_then_uninstall_leaves_legacy_untouched(legacy: str) -> None:
    before = legacy_state(legacy)
    out = ok("install", "--dsn", legacy, *CAPTURES)
    slot = f"outbox_{dbname(legacy)}"
    assert out.splitlines()[:4] == [
        f"outbox schema at revision {inst.store_head()} (created)",
        "capturing pos.customers as customer (key: id)",
        "capturing pos.order_lines as order_line (key: order_id, line_no)",
        f"replication slot {slot} created",
    ]
    assert out.splitlines()[-1].startswith("outbox installed on ")
    assert legacy_state(legacy) == before
    assert query(legacy, "SELECT version_num FROM outbox.alembic_version") == [(inst.store_head(),)]
    assert query(legacy, "SELECT table_name, aggregate_type, key_columns FROM outbox.captures ORDER BY 1") == [
        ("pos.customers", "customer", ["id"]), ("pos.order_lines", "order_line", ["order_id", "line_no"])]
    objects = outbox_objects(legacy)
    assert objects["schema"] == [("outbox",), ("outbox_crm",)]  # outbox_crm: the CRM write-back's (revision 0004)
    assert query(legacy, "SELECT to_regclass('outbox_crm.applied') IS NOT NULL, "
                         "to_regclass('outbox_crm.consumer_offsets') IS NOT NULL") == [(True, True)]
    assert objects["publication"] == [("outbox_events",)]
    # outbox_capture and outbox_capture_truncate (revision 0005: TRUNCATE is captured)
    assert sorted(objects["triggers"]) == [("pos.customers",)] * 2 + [("pos.order_lines",)] * 2
    assert objects["slots"] == [(slot,)]
    assert query(legacy, "SELECT pubinsert, pubupdate, pubdelete, pubtruncate FROM pg_publication") == [
        (True, False, False, False)]
    assert query(legacy, "SELECT proconfig, prosecdef FROM pg_proc WHERE proname = 'capture_change'") == [
        (["search_path=pg_catalog, pg_temp"], True)]  # SECURITY DEFINER since revision 0005 (#21 item 3)

    out = ok("uninstall", "--dsn", legacy)
    assert f"replication slot {slot} dropped" in out
    assert "stopped capturing pos.customers" in out
    assert legacy_state(legacy) == before
    assert outbox_objects(legacy) == {"schema": [], "publication": [], "triggers": [], "functions": [], "slots": []}

    out = ok("uninstall", "--dsn", legacy)
    assert out.startswith("nothing to uninstall on ")


def test_install_twice_is_a_no_op_and_later_captures_are_added(legacy: str) -> None:
    ok("install", "--dsn", legacy, "--capture", "pos.customers=customer")
    triggers = query(legacy, "SELECT oid, tgrelid::regclass::text FROM pg_trigger WHERE NOT tgisinternal")
    captures = query(legacy, "SELECT * FROM outbox.captures")
    out = ok("install", "--dsn", legacy, "--capture", "pos.customers=customer")
    assert f"outbox schema at revision {inst.store_head()} (up to date)" in out
    assert "pos.customers already captured as customer (key: id)" in out
    assert "exists (kept)" in out
    assert query(legacy, "SELECT oid, tgrelid::regclass::text FROM pg_trigger WHERE NOT tgisinternal") == triggers
    assert query(legacy, "SELECT * FROM outbox.captures") == captures

    out = ok("install", "--dsn", legacy, "--capture", "pos.order_lines=order_line", "--capture", "pos.orders=order")
    assert "capturing pos.order_lines as order_line (key: order_id, line_no)" in out
    now = query(legacy, "SELECT oid, tgrelid::regclass::text FROM pg_trigger WHERE NOT tgisinternal")
    assert set(triggers) < set(now)  # the customers trigger is the same object
    assert sorted(t for _, t in now) == sorted(["pos.customers", "pos.order_lines", "pos.orders"] * 2)  # + TRUNCATE triggers

    # a capture whose aggregate changed is updated
    out = ok("install", "--dsn", legacy, "--capture", "pos.orders=purchase")
    assert "capturing pos.orders as purchase (key: id; was order)" in out
    query(legacy, "INSERT INTO pos.orders (customer_id, total) VALUES (1, 5)")
    assert [e[2] for e in events(legacy)] == ["purchase.created"]


def test_captured_changes_become_events(legacy: str) -> None:
    ok("install", "--dsn", legacy, *CAPTURES)
    with psycopg.connect(legacy) as conn:
        conn.execute("SET TIME ZONE 'UTC'")
        conn.execute("INSERT INTO pos.customers (id, name, email, balance, seen_at, prefs) VALUES "
                     "(42, 'Zoë Ünal 東京', NULL, 12345678901234.5678, '2024-03-01 12:30:45.123456+02', '{\"a\": [1]}')")
        conn.execute("UPDATE pos.customers SET name = name, prefs = prefs WHERE id = 42")  # changes nothing
        conn.execute("UPDATE pos.customers SET email = 'zoe@example.com' WHERE id = 42")
        conn.commit()
        conn.execute("SET LOCAL outbox.origin = 'crm'")
        conn.execute("UPDATE pos.customers SET balance = 0.1 WHERE id = 42")
        conn.commit()
        conn.execute("INSERT INTO pos.order_lines VALUES (7, 3, 'SKU:7\\a', 1)")
        conn.execute("DELETE FROM pos.order_lines WHERE order_id = 7")
        conn.execute("DELETE FROM pos.customers WHERE id = 42")
        conn.commit()
        conn.execute("INSERT INTO pos.audit VALUES (now(), 'not captured')")
        conn.commit()
    rows = events(legacy)
    assert [(r[0], r[1], r[2], r[4]) for r in rows] == [
        ("customer", "42", "customer.created", None),
        ("customer", "42", "customer.updated", None),
        ("customer", "42", "customer.updated", "crm"),
        ("order_line", "7:3", "order_line.created", None),
        ("order_line", "7:3", "order_line.deleted", None),
        ("customer", "42", "customer.deleted", None),
    ]
    created = rows[0][3]
    assert created == {"id": 42, "name": "Zoë Ünal 東京", "email": None, "balance": Decimal("12345678901234.5678"),
                       "seen_at": "2024-03-01T10:30:45.123456+00:00", "prefs": {"a": [1]}}
    assert rows[1][3]["email"] == "zoe@example.com"
    assert rows[2][3]["balance"] == Decimal("0.1")
    assert rows[3][3] == {"order_id": 7, "line_no": 3, "sku": "SKU:7\\a", "qty": 1}
    assert rows[5][3]["email"] == "zoe@example.com"  # the last row image
    # exact JSON text: numeric precision is kept, not turned into a float
    text = query(legacy, "SELECT payload::text FROM outbox.events WHERE type = 'customer.created'")[0][0]
    assert '"balance": 12345678901234.5678' in text


def test_composite_key_values_are_escaped(legacy: str) -> None:
    with psycopg.connect(legacy) as conn:
        conn.execute("CREATE TABLE pos.skus (shop text, code text, PRIMARY KEY (code, shop))")
    ok("install", "--dsn", legacy, "--capture", "pos.skus=sku")
    query(legacy, "INSERT INTO pos.skus VALUES ('s:1', 'a\\b:c')")
    assert [r[1] for r in events(legacy)] == ["a\\\\b\\:c:s\\:1"]  # key order: code, then shop


# --------------------------------------------------------------------------- --sql
def test_sql_prints_and_changes_nothing(legacy: str) -> None:
    before = legacy_state(legacy)
    out = ok("install", "--dsn", legacy, *CAPTURES, "--sql")
    for needle in ("BEGIN;", "CREATE SCHEMA IF NOT EXISTS outbox;", "CREATE TABLE outbox.alembic_version",
                   "CREATE TABLE outbox.events", "CREATE PUBLICATION outbox_events", "CREATE FUNCTION outbox.capture_change()",
                   "CREATE TRIGGER outbox_capture AFTER INSERT OR UPDATE OR DELETE ON pos.customers",
                   "outbox.capture_change('order_line', 'order_id', 'line_no')", "COMMIT;",
                   "CREATE SCHEMA IF NOT EXISTS outbox_crm;", "CREATE TABLE IF NOT EXISTS outbox_crm.applied",
                   "CREATE TABLE IF NOT EXISTS outbox_crm.consumer_offsets",
                   f"SELECT pg_create_logical_replication_slot('outbox_{dbname(legacy)}', 'pgoutput');"):
        assert needle in out, needle
    assert out.index("COMMIT;") < out.index("pg_create_logical_replication_slot")
    assert outbox_objects(legacy) == {"schema": [], "publication": [], "triggers": [], "functions": [], "slots": []}
    assert legacy_state(legacy) == before

    ok("install", "--dsn", legacy, "--capture", "pos.customers=customer")
    out = ok("install", "--dsn", legacy, *CAPTURES, "--sql")  # only what is missing
    assert "CREATE TABLE outbox.events" not in out
    assert "-- pos.customers already captured as customer (key: id)" in out
    assert "ON pos.order_lines" in out and "ON pos.customers FOR" not in out
    assert "already exists" in out

    installed = outbox_objects(legacy)
    out = ok("uninstall", "--dsn", legacy, "--sql")
    for needle in ("pg_drop_replication_slot", "DROP TRIGGER IF EXISTS outbox_capture ON pos.customers",
                   "DROP PUBLICATION outbox_events", "DROP TABLE outbox.events", "DROP SCHEMA outbox;",
                   "DROP TABLE outbox_crm.applied", "DROP SCHEMA outbox_crm;"):
        assert needle in out, needle
    assert outbox_objects(legacy) == installed


def test_sql_runs_through_psql_like_a_dba_would(legacy: str) -> None:
    """The printed script is complete: applying it by hand gives the same result as install."""
    script = ok("install", "--dsn", legacy, *CAPTURES, "--sql")
    with psycopg.connect(legacy, autocommit=True) as conn:
        transaction, _, slot = script.partition("COMMIT;")
        conn.execute(transaction.replace("BEGIN;", "", 1))  # autocommit: one implicit transaction
        conn.execute(slot)
    assert query(legacy, "SELECT version_num FROM outbox.alembic_version") == [(inst.store_head(),)]
    out = ok("install", "--dsn", legacy, *CAPTURES)
    assert "(up to date)" in out and "already captured as order_line" in out and "exists (kept)" in out


# --------------------------------------------------------------------------- errors
def test_table_without_primary_key_changes_nothing(legacy: str) -> None:
    line = one_line_error(run("install", "--dsn", legacy, "--capture", "pos.customers=customer",
                              "--capture", "pos.audit=audit"))
    assert "table pos.audit has no primary key: add one" in line
    assert outbox_objects(legacy) == {"schema": [], "publication": [], "triggers": [], "functions": [], "slots": []}


def test_unknown_table(legacy: str) -> None:
    line = one_line_error(run("install", "--dsn", legacy, "--capture", "pos.nope=nope"))
    assert "table pos.nope does not exist" in line
    line = one_line_error(run("install", "--dsn", legacy, "--capture", "pos.nope=nope", "--sql"))
    assert "table pos.nope does not exist" in line


@pytest.mark.parametrize("capture", ["posnope=x", "pos.customers", "pos.customers=not a topic"])
def test_bad_capture_syntax(legacy: str, capture: str) -> None:
    line = one_line_error(run("install", "--dsn", legacy, "--capture", capture), exit_code=2)
    assert f"invalid --capture {capture!r}" in line


def test_unreachable_database() -> None:
    line = one_line_error(run("install", "--dsn", "host=127.0.0.1 port=1 dbname=x connect_timeout=3"))
    assert "cannot connect to 127.0.0.1:1/x" in line
    line = one_line_error(run("uninstall", "--dsn", "postgresql://u:secret@127.0.0.1:1/x"))
    assert "secret" not in line and "cannot connect" in line


def test_wal_level_is_checked_before_anything_changes(legacy: str, monkeypatch: pytest.MonkeyPatch) -> None:
    real = inst.read_facts

    def replica(*args: Any, **kwargs: Any) -> inst.Facts:
        return dataclasses.replace(real(*args, **kwargs), wal_level="replica")

    monkeypatch.setattr(inst, "read_facts", replica)
    line = one_line_error(run("install", "--dsn", legacy, *CAPTURES))
    assert line == (f"Error: wal_level is 'replica' on {inst.describe(legacy)}: set wal_level = logical in "
                    "postgresql.conf and restart PostgreSQL")
    assert outbox_objects(legacy) == {"schema": [], "publication": [], "triggers": [], "functions": [], "slots": []}


def test_foreign_outbox_schema_is_left_alone(legacy: str) -> None:
    query(legacy, "CREATE SCHEMA outbox; CREATE TABLE outbox.mine (x int)")
    line = one_line_error(run("install", "--dsn", legacy))
    assert "already exists" in line and "not installed by outbox" in line
    line = one_line_error(run("uninstall", "--dsn", legacy))
    assert "leaving it alone" in line
    assert query(legacy, "SELECT count(*) FROM outbox.mine") == [(0,)]


def test_uninstall_refuses_while_a_relay_is_connected(legacy: str) -> None:
    ok("install", "--dsn", legacy, *CAPTURES)
    slot = f"outbox_{dbname(legacy)}"
    repl = psycopg.connect(legacy + " replication=database", autocommit=True)
    try:
        repl.pgconn.send_query(f"START_REPLICATION SLOT {slot} LOGICAL 0/0 (proto_version '1', "
                               f"publication_names 'outbox_events')".encode())
        wait_until(lambda: query(legacy, "SELECT 1 FROM pg_replication_slots WHERE active AND slot_name = %s", slot),
                   timeout=10, interval=0.05, message="the slot to become active")
        line = one_line_error(run("uninstall", "--dsn", legacy))
        assert f"replication slot {slot}" in line and "stop the relay" in line
        assert outbox_objects(legacy)["schema"] == [("outbox",), ("outbox_crm",)]
    finally:
        repl.close()
    wait_until(lambda: not query(legacy, "SELECT 1 FROM pg_replication_slots WHERE active AND slot_name = %s", slot),
               timeout=10, interval=0.05, message="the slot to be released")
    ok("uninstall", "--dsn", legacy)


def test_console_script_errors_are_one_line(legacy: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "outbox.cli", "install", "--dsn", legacy, "--capture", "pos.audit=audit"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "pos.audit has no primary key" in proc.stderr
    assert "Traceback" not in proc.stderr


# --------------------------------------------------------------------------- multi-row statements and key changes
def test_multi_row_statements_and_key_changes(legacy: str) -> None:
    """One event per changed row, in row order, also when one statement changes many rows."""
    ok("install", "--dsn", legacy, *CAPTURES)
    with psycopg.connect(legacy) as conn:
        conn.execute("INSERT INTO pos.customers (id, name, balance) VALUES (2, 'Bo', 1), (3, 'Cy', 2), (4, 'Di', 3)")
        conn.execute("INSERT INTO pos.order_lines VALUES (7, 1, 'A', 1), (7, 2, 'B', 1), (8, 1, 'C', 1)")
        conn.commit()
    query(legacy, "DELETE FROM outbox.events")
    with psycopg.connect(legacy) as conn:
        # some rows change, some do not: only the changed ones become events
        conn.execute("UPDATE pos.customers SET balance = 2 WHERE id IN (2, 3, 4)")
        # every row changes
        conn.execute("UPDATE pos.order_lines SET qty = qty + 1 WHERE order_id = 7")
        # primary keys change: .deleted under the old key, then .created under the new one (#19 item 2)
        conn.execute("UPDATE pos.customers SET id = id + 100 WHERE id IN (3, 4)")
        conn.execute("UPDATE pos.order_lines SET line_no = line_no + 10 WHERE order_id = 7")
        conn.commit()
        conn.execute("DELETE FROM pos.order_lines WHERE order_id IN (7, 8)")
        conn.execute("DELETE FROM pos.customers WHERE id > 100")
        conn.commit()
    got = [(r[1], r[2], r[3]) for r in events(legacy)]
    assert got[:12] == [
        ("2", "customer.updated", {"id": 2, "name": "Bo", "email": None, "balance": 2, "seen_at": None, "prefs": None}),
        ("4", "customer.updated", {"id": 4, "name": "Di", "email": None, "balance": 2, "seen_at": None, "prefs": None}),
        ("7:1", "order_line.updated", {"order_id": 7, "line_no": 1, "sku": "A", "qty": 2}),
        ("7:2", "order_line.updated", {"order_id": 7, "line_no": 2, "sku": "B", "qty": 2}),
        ("3", "customer.deleted", {"id": 3, "name": "Cy", "email": None, "balance": 2, "seen_at": None, "prefs": None}),
        ("103", "customer.created", {"id": 103, "name": "Cy", "email": None, "balance": 2, "seen_at": None, "prefs": None}),
        ("4", "customer.deleted", {"id": 4, "name": "Di", "email": None, "balance": 2, "seen_at": None, "prefs": None}),
        ("104", "customer.created", {"id": 104, "name": "Di", "email": None, "balance": 2, "seen_at": None, "prefs": None}),
        ("7:1", "order_line.deleted", {"order_id": 7, "line_no": 1, "sku": "A", "qty": 2}),
        ("7:11", "order_line.created", {"order_id": 7, "line_no": 11, "sku": "A", "qty": 2}),
        ("7:2", "order_line.deleted", {"order_id": 7, "line_no": 2, "sku": "B", "qty": 2}),
        ("7:12", "order_line.created", {"order_id": 7, "line_no": 12, "sku": "B", "qty": 2}),
    ]
    # a DELETE reports rows in the order it finds them (heap order here), one event each
    assert sorted(got[12:]) == [
        ("103", "customer.deleted", {"id": 103, "name": "Cy", "email": None, "balance": 2, "seen_at": None, "prefs": None}),
        ("104", "customer.deleted", {"id": 104, "name": "Di", "email": None, "balance": 2, "seen_at": None, "prefs": None}),
        ("7:11", "order_line.deleted", {"order_id": 7, "line_no": 11, "sku": "A", "qty": 2}),
        ("7:12", "order_line.deleted", {"order_id": 7, "line_no": 12, "sku": "B", "qty": 2}),
        ("8:1", "order_line.deleted", {"order_id": 8, "line_no": 1, "sku": "C", "qty": 1}),
    ]
    # a multi-row UPDATE that changes nothing at all writes nothing
    query(legacy, "UPDATE pos.customers SET name = name")
    assert len(events(legacy)) == len(got)


def test_composite_keys_in_multi_row_statements(legacy: str) -> None:
    with psycopg.connect(legacy) as conn:
        conn.execute("CREATE TABLE pos.skus (shop text, code text, price int, PRIMARY KEY (code, shop))")
    ok("install", "--dsn", legacy, "--capture", "pos.skus=sku")
    with psycopg.connect(legacy) as conn:
        conn.execute("INSERT INTO pos.skus VALUES ('s:1', 'a\\b:c', 1), ('s2', 'x', 1), ('s\\3', 'y:', 1)")
        conn.execute("UPDATE pos.skus SET price = CASE WHEN shop = 's2' THEN 1 ELSE 2 END")  # 's2' unchanged
        conn.execute("UPDATE pos.skus SET shop = shop || ':' WHERE code = 'x'")  # a key column changes
        conn.execute("DELETE FROM pos.skus")
        conn.commit()
    got = [(r[1], r[2]) for r in events(legacy)]
    assert got[:7] == [
        ("a\\\\b\\:c:s\\:1", "sku.created"), ("x:s2", "sku.created"), ("y\\::s\\\\3", "sku.created"),
        ("a\\\\b\\:c:s\\:1", "sku.updated"), ("y\\::s\\\\3", "sku.updated"),
        ("x:s2", "sku.deleted"), ("x:s2\\:", "sku.created"),  # a key column changed (#19 item 2)
    ]
    assert sorted(got[7:]) == [
        ("a\\\\b\\:c:s\\:1", "sku.deleted"), ("x:s2\\:", "sku.deleted"), ("y\\::s\\\\3", "sku.deleted"),
    ]


def _install_at_0001(dsn: str, captures: dict[str, tuple[str, tuple[str, ...]]]) -> None:
    """What an outbox-relay with only revision 0001 installed: schema, revision 0001, capture triggers."""
    from alembic import command

    after = [s for table, (agg, keys) in captures.items() for s in inst.capture_sql(table, agg, keys)]
    engine = inst._engine(dsn)
    try:
        with engine.begin() as sa_conn:
            config = inst.alembic_config(before=["CREATE SCHEMA IF NOT EXISTS outbox"], after=after, connection=sa_conn)
            command.upgrade(config, "0001")
    finally:
        engine.dispose()
    inst.ensure_slot(dsn, f"outbox_{dbname(dsn)}")


def test_install_upgrades_an_outbox_at_0001_with_the_parked_and_backfills_tables(legacy: str) -> None:
    _install_at_0001(legacy, {"pos.customers": ("customer", ("id",))})
    assert query(legacy, "SELECT to_regclass('outbox.backfills')") == [(None,)]
    out = ok("install", "--dsn", legacy, "--capture", "pos.customers=customer")
    assert f"outbox schema at revision {inst.store_head()} (upgraded from 0001)" in out
    assert query(legacy, "SELECT version_num FROM outbox.alembic_version") == [(inst.store_head(),)]
    assert query(legacy, "SELECT to_regclass('outbox.parked') IS NOT NULL, to_regclass('outbox.backfills') IS NOT NULL, "
                         "to_regclass('outbox_crm.applied') IS NOT NULL") == [(True, True, True)]
