"""Install and uninstall inside a busy store database: other sessions hold locks and run transactions.

Issue #21 (DBA safety) and #19.1 (the install window), on a real PostgreSQL: an application keeps
writing (and reading) with a short ``statement_timeout`` while install or uninstall waits behind
another session, and must never queue behind them; a failure leaves the database as it was.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import pytest
from click.testing import Result

from tests.support.install import LEGACY, dbname, events, ok, query, run
from tests.support.kafka import kcat_read
from tests.support.processes import OutboxProcess

pytestmark = pytest.mark.integration

PARTITIONED = """
CREATE TABLE pos.sales_by_day (id bigint NOT NULL, day date NOT NULL, amount numeric, PRIMARY KEY (id, day))
    PARTITION BY RANGE (day);
CREATE TABLE pos.sales_2023 PARTITION OF pos.sales_by_day FOR VALUES FROM ('2023-01-01') TO ('2024-01-01');
CREATE TABLE pos.sales_2024 PARTITION OF pos.sales_by_day FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');
"""  # the partitions' names sort before their parent's


@pytest.fixture
def legacy(new_database: Callable[..., str]) -> str:
    dsn = new_database("safe")
    with psycopg.connect(dsn) as conn:
        conn.execute(LEGACY)
    return dsn


def one_line_error(result: Result) -> str:
    """Progress lines may come first; the failure itself is one line, the last, and no traceback."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert lines[-1].startswith("Error: ") and sum(line.startswith("Error") for line in lines) == 1, result.output
    return lines[-1]


@contextmanager
def session(dsn: str, *statements: str) -> Iterator[tuple[psycopg.Connection[Any], int]]:
    """Another session that runs ``statements`` in an open transaction and stays idle in it."""
    conn = psycopg.connect(dsn)
    try:
        pid = conn.info.backend_pid
        for s in statements:
            conn.execute(s)  # type: ignore[arg-type]
        yield conn, pid
    finally:
        conn.close()


class Application(threading.Thread):
    """A point-of-sale writer: short statements with a statement_timeout, one every 0.2 s."""

    def __init__(self, dsn: str, statements: list[str], timeout_ms: int = 5000) -> None:
        super().__init__(daemon=True)
        self.dsn, self.statements, self.timeout_ms = dsn, statements, timeout_ms
        self.stop = threading.Event()
        self.done = 0
        self.failures: list[str] = []
        self.slowest = 0.0

    def run(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(f"SET statement_timeout = {self.timeout_ms}")  # type: ignore[arg-type]
            while not self.stop.is_set():
                for s in self.statements:
                    started = time.monotonic()
                    try:
                        conn.execute(s)  # type: ignore[arg-type]
                        self.done += 1
                    except psycopg.Error as e:
                        self.failures.append(f"{s}: {str(e).strip().splitlines()[0]}")
                    self.slowest = max(self.slowest, time.monotonic() - started)
                time.sleep(0.2)

    def finish(self) -> None:
        self.stop.set()
        self.join(30)


@contextmanager
def process(*args: str) -> Iterator[OutboxProcess]:
    p = OutboxProcess(*args, name=args[0]).start()
    try:
        yield p
    finally:
        p.close()


def wait_exit(p: OutboxProcess, timeout: float = 90) -> int:
    assert p.proc is not None
    return p.proc.wait(timeout)


def triggers(dsn: str) -> list[str]:
    return sorted(r[0] for r in query(dsn, "SELECT tgrelid::regclass::text FROM pg_trigger "
                                           "WHERE tgname = 'outbox_capture'"))


def slots(dsn: str) -> list[str]:
    return [r[0] for r in query(dsn, "SELECT slot_name FROM pg_replication_slots WHERE database = current_database()")]


def wait_until(check: Callable[[], Any], what: str, timeout: float = 30) -> Any:
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


# --------------------------------------------------------------------------- #21.1 install behind a writer
def test_install_does_not_queue_the_application_behind_a_lock_it_waits_for(legacy: str) -> None:
    """A session idle in transaction holds ROW EXCLUSIVE on pos.orders (an open batch job).

    Install waits for it in short attempts (lock_timeout), one table per transaction, and says
    whom it waits for; the application's INSERTs into both tables keep succeeding within their
    5 s statement_timeout; when the batch commits, install finishes.
    """
    app = Application(legacy, ["INSERT INTO pos.customers (name) VALUES ('app')",
                               "INSERT INTO pos.orders (customer_id, total) VALUES (1, 1)"])
    with session(legacy, "LOCK TABLE pos.orders IN ROW EXCLUSIVE MODE") as (batch, batch_pid):
        with process("install", "--dsn", legacy, "--capture", "pos.customers=customer",
                     "--capture", "pos.orders=order") as install:
            app.start()
            try:
                time.sleep(7)  # longer than the application's statement_timeout
                assert app.failures == [], app.failures  # nothing queued behind install
                line = install.wait_for_output(f"waiting for pid {batch_pid}", timeout=10)
                assert "pos.orders" in line and "idle in transaction" in line, line
                assert install.proc is not None and install.proc.poll() is None, install.output()
                batch.commit()
                assert wait_exit(install) == 0, install.output()
            finally:
                app.finish()
    assert app.failures == [], app.failures
    assert app.done > 10 and app.slowest < 5, (app.done, app.slowest)
    assert triggers(legacy) == ["pos.customers", "pos.orders"]
    assert slots(legacy) == [f"outbox_{dbname(legacy)}"]


def test_install_gives_up_with_one_line_naming_the_blocker(legacy: str) -> None:
    ok("install", "--dsn", legacy, "--capture", "pos.customers=customer")
    with session(legacy, "INSERT INTO pos.orders (customer_id, total) VALUES (1, 2)") as (_batch, batch_pid):
        started = time.monotonic()
        line = one_line_error(run("install", "--dsn", legacy, "--capture", "pos.orders=order",
                                  "--lock-timeout", "0.5", "--lock-wait", "3"))
        assert time.monotonic() - started < 30
    assert f"pid {batch_pid}" in line and "pos.orders" in line and "idle in transaction" in line, line
    assert triggers(legacy) == ["pos.customers"]  # what was done before stays; nothing half-done on pos.orders
    assert query(legacy, "SELECT table_name FROM outbox.captures") == [("pos.customers",)]
    out = ok("install", "--dsn", legacy, "--capture", "pos.orders=order")  # continues where it stopped
    assert "capturing pos.orders as order" in out
    assert triggers(legacy) == ["pos.customers", "pos.orders"]


# --------------------------------------------------------------------------- #21.2 uninstall behind a report
def test_uninstall_does_not_queue_readers_and_writers_behind_a_long_report(legacy: str) -> None:
    ok("install", "--dsn", legacy, "--capture", "pos.customers=customer", "--capture", "pos.orders=order")
    app = Application(legacy, ["SELECT count(*) FROM pos.orders",
                               "INSERT INTO pos.orders (customer_id, total) VALUES (1, 1)",
                               "SELECT count(*) FROM pos.customers"])
    with session(legacy, "SELECT sum(total) FROM pos.orders") as (report, report_pid):
        with process("uninstall", "--dsn", legacy) as uninstall:
            app.start()
            try:
                time.sleep(7)
                assert app.failures == [], app.failures  # nothing queued behind uninstall
                assert slots(legacy) and triggers(legacy)  # nothing removed while it waits
                line = uninstall.wait_for_output(f"waiting for pid {report_pid}", timeout=10)
                assert "pos.orders" in line, line
                assert uninstall.proc is not None and uninstall.proc.poll() is None, uninstall.output()
                report.commit()
                assert wait_exit(uninstall) == 0, uninstall.output()
            finally:
                app.finish()
    # the application's INSERTs into pos.orders may fail once outbox.events is gone: only
    # failures caused by waiting count here
    waits = [f for f in app.failures if "statement timeout" in f or "lock" in f]
    assert waits == [], waits
    assert app.slowest < 5, app.slowest
    assert triggers(legacy) == [] and slots(legacy) == []


def test_uninstall_gives_up_with_one_line_and_changes_nothing(legacy: str) -> None:
    ok("install", "--dsn", legacy, "--capture", "pos.customers=customer", "--capture", "pos.orders=order")
    with session(legacy, "SELECT sum(total) FROM pos.orders") as (_report, report_pid):
        line = one_line_error(run("uninstall", "--dsn", legacy, "--lock-timeout", "0.5", "--lock-wait", "3"))
    assert f"pid {report_pid}" in line and "pos.orders" in line, line
    assert triggers(legacy) == ["pos.customers", "pos.orders"]
    assert slots(legacy) == [f"outbox_{dbname(legacy)}"]
    ok("uninstall", "--dsn", legacy)


# --------------------------------------------------------------------------- #21.7 inheritance children
def test_inheritance_parents_are_refused_unless_their_children_are_captured(legacy: str) -> None:
    query(legacy, "CREATE TABLE pos.tickets (id int PRIMARY KEY, what text); "
                  "CREATE TABLE pos.tickets_2023 (PRIMARY KEY (id)) INHERITS (pos.tickets)")
    line = one_line_error(run("install", "--dsn", legacy, "--capture", "pos.tickets=ticket"))
    assert "pos.tickets" in line and "pos.tickets_2023" in line and "inherit" in line, line
    assert triggers(legacy) == [] and slots(legacy) == []
    ok("install", "--dsn", legacy, "--capture", "pos.tickets=ticket", "--capture", "pos.tickets_2023=ticket")
    query(legacy, "INSERT INTO pos.tickets_2023 VALUES (1, 'child'); INSERT INTO pos.tickets VALUES (2, 'parent')")
    assert sorted(e[1] for e in events(legacy)) == ["1", "2"]


# --------------------------------------------------------------------------- #21.8 partitioned captures
def test_uninstall_of_a_partitioned_capture(legacy: str) -> None:
    query(legacy, PARTITIONED)
    ok("install", "--dsn", legacy, "--capture", "pos.sales_by_day=sale", "--capture", "pos.customers=customer")
    assert triggers(legacy) == ["pos.customers", "pos.sales_2023", "pos.sales_2024", "pos.sales_by_day"]
    query(legacy, "INSERT INTO pos.sales_by_day VALUES (1, '2023-05-01', 1), (2, '2024-05-01', 2)")
    assert sorted(e[1] for e in events(legacy)) == ["1:2023-05-01", "2:2024-05-01"]
    assert "already captured as sale" in ok("install", "--dsn", legacy, "--capture", "pos.sales_by_day=sale")
    out = ok("uninstall", "--dsn", legacy)
    assert "stopped capturing pos.sales_by_day" in out and "pos.sales_2023" not in out
    assert triggers(legacy) == [] and slots(legacy) == []
    assert query(legacy, "SELECT to_regnamespace('outbox')") == [(None,)]


def test_a_failed_uninstall_leaves_triggers_and_slot_in_place(legacy: str) -> None:
    query(legacy, PARTITIONED)
    ok("install", "--dsn", legacy, "--capture", "pos.sales_by_day=sale", "--capture", "pos.customers=customer")
    query(legacy, "CREATE VIEW public.recent_events AS SELECT * FROM outbox.events")  # someone else's object
    before = (triggers(legacy), slots(legacy))
    line = one_line_error(run("uninstall", "--dsn", legacy))
    assert "recent_events" in line and "nothing was changed" in line, line
    assert (triggers(legacy), slots(legacy)) == before
    query(legacy, "INSERT INTO pos.sales_by_day VALUES (3, '2024-06-01', 3)")  # still captured, still relayed
    assert [e[1] for e in events(legacy)] == ["3:2024-06-01"]
    query(legacy, "DROP VIEW public.recent_events")
    ok("uninstall", "--dsn", legacy)
    assert triggers(legacy) == [] and slots(legacy) == []


# --------------------------------------------------------------------------- #19.1 the install window
def test_no_event_is_written_before_the_slot_can_decode_it(legacy: str, topic_prefix: str, kafka_bootstrap: str,
                                                            relays: Any) -> None:
    """The reproduction of #19.1: a transaction is open while install runs (the slot waits for it),
    rows are inserted and committed meanwhile, then the open transaction commits. Every event in
    outbox.events must reach Kafka."""
    with session(legacy, "INSERT INTO pos.audit VALUES (now(), 'open batch')") as (batch, batch_pid):
        with process("install", "--dsn", legacy, "--capture", "pos.customers=customer") as install:
            wait_until(lambda: query(legacy, "SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND "
                                             "query LIKE '%%pg_create_logical_replication_slot%%'"),
                       "install to wait for the slot")
            with psycopg.connect(legacy) as conn:
                for name in ("during 1", "during 2", "during 3"):
                    conn.execute("INSERT INTO pos.customers (name) VALUES (%s)", (name,))
                conn.commit()
            line = install.wait_for_output(f"waiting for pid {batch_pid}", timeout=10)
            assert "before creating replication slot" in line, line
            batch.commit()
            assert wait_exit(install) == 0, install.output()
    relays(legacy, "s1", topic_prefix, kafka_bootstrap).start()
    query(legacy, "INSERT INTO pos.customers (name) VALUES ('after')")
    expected = {r[0] for r in query(legacy, "SELECT id::text FROM outbox.events WHERE type <> 'outbox.heartbeat'")}
    assert expected, "no event at all"
    topic = f"{topic_prefix}.customer"
    deadline = time.time() + 30
    seen: set[str] = set()
    while time.time() < deadline and not expected <= seen:
        seen = {r["headers"]["ce_id"] for r in kcat_read(kafka_bootstrap, topic)}
        time.sleep(0.5)
    assert expected <= seen, f"{len(expected - seen)} of {len(expected)} events in outbox.events never reached Kafka"


def test_the_slot_wait_is_bounded_and_leaves_nothing_captured(legacy: str) -> None:
    with session(legacy, "INSERT INTO pos.audit VALUES (now(), 'open batch')") as (batch, batch_pid):
        started = time.monotonic()
        result = run("install", "--dsn", legacy, "--capture", "pos.customers=customer", "--lock-wait", "2")
        line = one_line_error(result)
        assert time.monotonic() - started < 30
        assert f"waiting for pid {batch_pid}" in result.output and "before creating replication slot" in result.output
        assert f"pid {batch_pid}" in line and "replication slot" in line and "no capture trigger" in line, line
        assert triggers(legacy) == [] and slots(legacy) == []
        batch.commit()
    out = ok("install", "--dsn", legacy, "--capture", "pos.customers=customer")
    assert "capturing pos.customers as customer" in out and triggers(legacy) == ["pos.customers"]


def test_sql_shows_the_lock_timeouts_and_the_order(legacy: str) -> None:
    out = ok("install", "--dsn", legacy, "--capture", "pos.customers=customer", "--capture", "pos.orders=order",
             "--lock-timeout", "0.5", "--sql")
    slot, trigger = out.index("pg_create_logical_replication_slot"), out.index("CREATE TRIGGER outbox_capture AFTER")
    assert out.index("COMMIT;") < slot < trigger
    assert out.count("SET LOCAL lock_timeout = '500ms';") == 3  # the schema's transaction, then one per table
    assert out[slot:].count("BEGIN;") == 2
    assert triggers(legacy) == [] and slots(legacy) == []
    ok("install", "--dsn", legacy, "--capture", "pos.customers=customer")
    out = ok("uninstall", "--dsn", legacy, "--sql")
    assert "SET LOCAL lock_timeout = '2s';" in out
    assert out.index("DROP SCHEMA outbox;") < out.index("pg_drop_replication_slot")
