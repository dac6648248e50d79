"""What a DBA's review of the outbox found (issue #21 items 9-12), on the real servers.

The relay's purge reads a btree index in small paced batches, a capture can leave wide columns
out of its events (and so out of the WAL), and doctor names logical slots that outbox did not
create (a REPLICATION role reads every table through one).
"""
from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

from outbox.errors import OutboxError
from outbox.relay.replication import PURGE_BATCH_SQL, SlotMonitor, purge_events
from tests.support.install import ok, one_line_error, query, run

pytestmark = pytest.mark.integration


@pytest.fixture
def store(new_database: Callable[..., str]) -> str:
    dsn = new_database("dba")
    ok("install", "--dsn", dsn)
    return dsn


def _fill_events(dsn: str, old: int, young: int) -> None:
    """``old`` rows two days old (spread over a day), ``young`` rows of the last minutes."""
    query(dsn, "INSERT INTO outbox.events (aggregatetype, aggregateid, type, payload, created_at) "
               "SELECT 'x', g::text, 'x.created', '{}'::jsonb, now() - interval '2 days' + g * interval '1 second' "
               "FROM generate_series(1, %s) g", old)
    query(dsn, "INSERT INTO outbox.events (aggregatetype, aggregateid, type, payload, created_at) "
               "SELECT 'y', g::text, 'y.created', '{}'::jsonb, now() - interval '10 minutes' + g * interval '1 ms' "
               "FROM generate_series(1, %s) g", young)
    query(dsn, "ANALYZE outbox.events")


# =========================================================================== 9: the purge
def test_purge_reads_the_btree_index_not_the_whole_table(store: str) -> None:
    _fill_events(store, 100_000, 100_000)
    with psycopg.ClientCursor(psycopg.connect(store, autocommit=True)) as cur:
        cutoff = time.strftime("%Y-%m-%d", time.gmtime(time.time() - 86400))  # half the rows are older
        cur.execute("EXPLAIN (FORMAT JSON) " + PURGE_BATCH_SQL, (cutoff, 10_000))
        plan = json.dumps(cur.fetchone()[0])  # type: ignore[index]
        cur.connection.close()
    assert '"Index Name": "events_created_at"' in plan and "Seq Scan" not in plan, plan


def test_purge_deletes_in_paced_batches_and_keeps_young_rows(store: str) -> None:
    _fill_events(store, 2_500, 300)
    started = time.monotonic()
    purged = purge_events(store, 3600, batch=1_000, pause=0.3)
    elapsed = time.monotonic() - started
    assert (purged.deleted, purged.batches) == (2_500, 3)
    assert elapsed >= 0.6  # two pauses between three batches
    assert query(store, "SELECT count(*), min(created_at) > now() - interval '1 hour' FROM outbox.events") == [(300, True)]


def test_purge_batches_are_bounded_by_a_statement_timeout(store: str) -> None:
    _fill_events(store, 100, 0)
    holder = psycopg.connect(store)
    holder.execute("LOCK TABLE outbox.events IN SHARE MODE")  # a DELETE waits for it
    outcome: list[Any] = []

    def purge() -> None:
        try:
            outcome.append(purge_events(store, 3600, statement_timeout=1.0, lock_timeout=30.0))
        except OutboxError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=purge, daemon=True)
    thread.start()
    thread.join(timeout=20)
    holder.close()
    thread.join(timeout=20)
    assert outcome and isinstance(outcome[0], OutboxError), outcome
    assert "statement timeout" in outcome[0].message and "it goes on next time" in outcome[0].message
    assert query(store, "SELECT count(*) FROM outbox.events") == [(100,)]


def test_purge_stops_between_batches_when_asked(store: str) -> None:
    _fill_events(store, 3_000, 0)
    asked: list[int] = []

    def stop() -> bool:
        asked.append(1)
        return len(asked) > 1

    purged = purge_events(store, 3600, batch=1_000, pause=0.01, stop=stop)
    assert (purged.deleted, purged.batches, purged.stopped) == (1_000, 1, True)


# =========================================================================== 10: wide columns
WIDE = """
CREATE SCHEMA pos;
CREATE TABLE pos.items (id int PRIMARY KEY, price numeric, description text);
CREATE TABLE pos.items_full (id int PRIMARY KEY, price numeric, description text);
CREATE TABLE pos.stock (shop int, id int, qty int, photo bytea, PRIMARY KEY (shop, id)) PARTITION BY LIST (shop);
CREATE TABLE pos.stock_1 PARTITION OF pos.stock FOR VALUES IN (1);
"""
# 512 kB of text that compresses little: each row's description is TOASTed out of line
DESCRIPTION = "(SELECT string_agg(md5(random()::text || g), '') FROM generate_series(1, 16384) g)"


@pytest.fixture
def wide(new_database: Callable[..., str]) -> str:
    dsn = new_database("wide")
    query(dsn, WIDE)
    for table in ("pos.items", "pos.items_full"):
        query(dsn, f"INSERT INTO {table} SELECT i, 10, {DESCRIPTION} FROM generate_series(1, 20) i")
    return dsn


def _wal_of(dsn: str, sql: str) -> int:
    """WAL bytes written by ``sql`` (one transaction per statement, as an application would)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        start = conn.execute("SELECT pg_current_wal_insert_lsn()").fetchone()[0]  # type: ignore[index]
        for i in range(1, 21):
            conn.execute(sql, (i,))
        return int(conn.execute("SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), %s)", (start,))
                   .fetchone()[0])  # type: ignore[index]


def test_excluded_columns_stay_out_of_events_and_the_wal(wide: str) -> None:
    out = ok("install", "--dsn", wide, "--capture", "pos.items=item", "--exclude", "pos.items.description",
             "--capture", "pos.items_full=item_full", "--capture", "pos.stock=stock", "--exclude", "pos.stock.photo")
    assert "capturing pos.items as item (key: id; without description)" in out, out
    assert query(wide, "SELECT table_name, exclude_columns FROM outbox.captures ORDER BY 1") == [
        ("pos.items", ["description"]), ("pos.items_full", []), ("pos.stock", ["photo"])]

    excluded = _wal_of(wide, "UPDATE pos.items SET price = price + 1 WHERE id = %s")
    full = _wal_of(wide, "UPDATE pos.items_full SET price = price + 1 WHERE id = %s")
    print(f"\nWAL of 20 price-only updates of rows with a 512 kB description: {full:,} bytes captured whole, "
          f"{excluded:,} bytes with --exclude pos.items.description")
    assert full > 5_000_000 and excluded < 100_000, (full, excluded)

    payloads = [json.loads(p) for (p,) in query(wide, "SELECT payload::text FROM outbox.events "
                                                      "WHERE aggregatetype = 'item' ORDER BY created_at")]
    assert len(payloads) == 20 and all(set(p) == {"id", "price"} for p in payloads), payloads[0]

    query(wide, "UPDATE pos.items SET description = 'short' WHERE id = 1")  # only an excluded column: no event
    query(wide, "INSERT INTO pos.stock VALUES (1, 7, 3, '\\x00ff')")  # a partition: its root's list applies
    rows = query(wide, "SELECT type, payload::text FROM outbox.events WHERE aggregatetype IN ('item', 'stock') "
                       "ORDER BY created_at DESC LIMIT 1")
    assert rows[0][0] == "stock.created" and json.loads(rows[0][1]) == {"shop": 1, "id": 7, "qty": 3}
    assert query(wide, "SELECT count(*) FROM outbox.events WHERE aggregatetype = 'item'") == [(20,)]


def test_exclude_lists_change_without_ddl_and_are_checked(wide: str) -> None:
    ok("install", "--dsn", wide, "--capture", "pos.items=item", "--exclude", "pos.items.description")
    trigger = query(wide, "SELECT oid FROM pg_trigger WHERE tgname = 'outbox_capture'")
    out = ok("install", "--dsn", wide, "--capture", "pos.items=item")  # the command line states the capture
    assert "capturing pos.items as item (key: id)" in out, out
    assert query(wide, "SELECT exclude_columns FROM outbox.captures") == [([],)]
    assert query(wide, "SELECT oid FROM pg_trigger WHERE tgname = 'outbox_capture'") == trigger  # no DDL
    query(wide, "UPDATE pos.items SET price = 1 WHERE id = 2")
    payload = query(wide, "SELECT payload FROM outbox.events ORDER BY created_at DESC LIMIT 1")[0][0]
    assert "description" in payload

    line = one_line_error(run("install", "--dsn", wide, "--capture", "pos.items=item", "--exclude", "pos.items.id"))
    assert "pos.items.id is part of the primary key" in line, line
    line = one_line_error(run("install", "--dsn", wide, "--capture", "pos.items=item", "--exclude", "pos.items.nope"))
    assert "column nope does not exist in pos.items" in line, line
    line = one_line_error(run("install", "--dsn", wide, "--capture", "pos.items=item", "--exclude", "pos.other.x"), 2)
    assert "--exclude pos.other.x names no table of a --capture" in line, line
    sql = ok("install", "--dsn", wide, "--capture", "pos.items=item", "--exclude", "pos.items.description", "--sql")
    assert "exclude_columns" in sql and "ARRAY['description']" in sql, sql


# =========================================================================== 12: slots we did not create
def test_doctor_and_the_relay_report_logical_slots_outbox_did_not_create(store: str) -> None:
    foreign = f"t_foreign_{uuid.uuid4().hex[:8]}"
    query(store, "SELECT pg_create_logical_replication_slot(%s, 'test_decoding')", foreign)
    try:
        out = run("doctor", "--dsn", store).output
        line = next((ln for ln in out.splitlines() if foreign in ln), "")
        assert line.startswith("WARN") and "test_decoding" in line and "pg_drop_replication_slot" in line, out
        monitor = SlotMonitor(store, "outbox_" + store.split("=", 1)[1])
        try:
            assert monitor.sample().foreign_slots >= 1
        finally:
            monitor.close()
    finally:
        query(store, "SELECT pg_drop_replication_slot(%s)", foreign)
    out = run("doctor", "--dsn", store).output
    assert foreign not in out


# =========================================================================== 11: backfill
NOTES = """
CREATE SCHEMA pos;
CREATE TABLE pos.notes (id int PRIMARY KEY, author text NOT NULL, body text);
INSERT INTO pos.notes SELECT g, CASE WHEN g = 1 THEN '{role}' ELSE 'someone' END, 'n' FROM generate_series(1, 400) g;
ALTER TABLE pos.notes ENABLE ROW LEVEL SECURITY;
CREATE POLICY own_notes ON pos.notes USING (author = current_user);
"""


@pytest.fixture
def notes(new_database: Callable[..., str]) -> Any:
    dsn = new_database("bf")
    role = f"t_bf_{uuid.uuid4().hex[:8]}"
    query(dsn, f"CREATE ROLE {role} LOGIN")
    query(dsn, NOTES.format(role=role))
    ok("install", "--dsn", dsn, "--capture", "pos.notes=note")
    query(dsn, f"GRANT USAGE ON SCHEMA pos, outbox TO {role}; GRANT SELECT ON outbox.captures TO {role}; "
               f"GRANT SELECT, UPDATE ON pos.notes TO {role}; "
               f"GRANT SELECT, INSERT, UPDATE ON outbox.backfills TO {role}; GRANT INSERT ON outbox.events TO {role}; "
               f"GRANT USAGE ON ALL SEQUENCES IN SCHEMA outbox TO {role}")
    yield dsn, role
    query(dsn, f"DROP OWNED BY {role}")
    query(dsn, f"DROP ROLE {role}")


def test_backfill_refuses_a_table_whose_row_security_hides_rows(notes: tuple[str, str]) -> None:
    dsn, role = notes
    as_role = f"{dsn} user={role}"
    line = one_line_error(run("backfill", "--dsn", as_role, "--source-id", "s1", "--table", "pos.notes"))
    assert "row-level security" in line and "BYPASSRLS" in line, line
    assert query(dsn, "SELECT count(*) FROM outbox.events WHERE type = 'note.snapshot'") == [(0,)]
    query(dsn, f"ALTER ROLE {role} BYPASSRLS")
    ok("backfill", "--dsn", as_role, "--source-id", "s1", "--table", "pos.notes")
    assert query(dsn, "SELECT count(*) FROM outbox.events WHERE type = 'note.snapshot'") == [(400,)]


def test_backfill_chunks_are_bounded_and_the_default_rate_is_gentle(notes: tuple[str, str]) -> None:
    dsn, _ = notes
    ok("backfill", "--dsn", dsn, "--source-id", "s1", "--table", "pos.notes", "--chunk-size", "100")
    assert query(dsn, "SELECT rate FROM outbox.backfills") == [(5000,)]  # no --rate given
    # a chunk that keeps its rows locked longer than its statement_timeout is cancelled, resumable
    result = run("backfill", "--dsn", dsn, "--source-id", "s2", "--table", "pos.notes",
                 "--chunk-size", "300", "--where", "pg_sleep(0.01) IS NOT NULL")
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    line = result.output.strip().splitlines()[-1]
    assert "took longer than 2s" in line and "--resume" in line, line
