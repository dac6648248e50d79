"""``outbox backfill`` on the real servers: concurrent writers, kill and resume, one-line errors."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from io import StringIO

import psycopg
import pytest

from outbox import backfill as backfill_module
from outbox import contract
from outbox.backfill import run_backfill
from outbox.config import BackfillSettings
from tests.support.db import install_pos
from tests.support.processes import OUTBOX, ConsumerProcess, RelayProcess, outbox, wait_converged
from tests.support.wait import wait_until

pytestmark = pytest.mark.integration

ROWS = int(os.environ.get("OUTBOX_TEST_BACKFILL_ROWS", "200000"))


def seed_customers(dsn: str, rows: int) -> None:
    """Rows that exist before capture matters: written with triggers off, so no event exists for them."""
    with psycopg.connect(dsn) as conn:
        conn.execute("SET session_replication_role = replica")
        conn.execute("INSERT INTO pos.customers (name, email, loyalty_pts) "
                     "SELECT 'customer ' || g, 'c' || g || '@example.com', g %% 100 FROM generate_series(1, %s) g", (rows,))


def seed_order_lines(dsn: str, orders: int, lines: int) -> None:
    with psycopg.connect(dsn) as conn:
        conn.execute("SET session_replication_role = replica")
        conn.execute("INSERT INTO pos.orders (id) SELECT g FROM generate_series(1, %s) g", (orders,))
        conn.execute("INSERT INTO pos.order_lines SELECT o, l, 'SKU-' || l, l, 1.50 "
                     "FROM generate_series(1, %s) o, generate_series(1, %s) l", (orders, lines))


class Writer(threading.Thread):
    """Updates and deletes random rows of pos.customers in small transactions until stopped."""

    def __init__(self, dsn: str, rows: int, seed: int) -> None:
        super().__init__(daemon=True)
        self.dsn, self.rows, self.rng = dsn, rows, random.Random(seed)
        self.halt = threading.Event()
        self.updates = self.deletes = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                while not self.halt.is_set():
                    with conn.transaction():
                        for _ in range(5):
                            cid = self.rng.randint(1, self.rows)
                            if self.rng.random() < 0.2:
                                conn.execute("DELETE FROM pos.customers WHERE id = %s", (cid,))
                                self.deletes += 1
                            else:
                                conn.execute("UPDATE pos.customers SET loyalty_pts = loyalty_pts + 1, name = name || '+' "
                                             "WHERE id = %s", (cid,))
                                self.updates += 1
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc


def test_backfill_while_a_writer_updates_and_deletes_converges(
        new_database: Callable[..., str], topic_prefix: str, kafka_bootstrap: str) -> None:
    store, readstore = new_database("store"), new_database("readstore")
    install_pos(store)
    seed_customers(store, ROWS)
    relay = RelayProcess(store, "s1", topic_prefix, kafka_bootstrap)
    consumer = ConsumerProcess(readstore, topic_prefix, kafka_bootstrap, f"{topic_prefix}-rs")
    writer = Writer(store, ROWS, seed=7)
    try:
        relay.start()
        consumer.start()
        writer.start()
        time.sleep(0.5)
        out = StringIO()
        outcome = run_backfill(BackfillSettings(dsn=store, source_id="s1", table="pos.customers", chunk_size=2000),
                               out=out, tty=False)
        writer.halt.set()
        writer.join(30)
        assert writer.error is None, writer.error
        assert outcome.result == "done" and outcome.rows > ROWS * 0.5
        assert writer.updates > 100 and writer.deletes > 20, (writer.updates, writer.deletes)
        assert "rows/s" in out.getvalue() and "\r" not in out.getvalue()
        wait_converged(readstore, {"s1": store}, [relay, consumer], timeout=240)
        with psycopg.connect(store) as conn:
            audit = conn.execute("SELECT rows, result, db_user, os_user, finished_at IS NOT NULL, last_key "
                                 "FROM outbox.backfills").fetchall()
        assert len(audit) == 1 and audit[0][0] == outcome.rows and audit[0][1] == "done"
        assert audit[0][2] and audit[0][3] and audit[0][4] and audit[0][5] is not None
    finally:
        writer.halt.set()
        relay.close()
        consumer.close()


def snapshot_counts(dsn: str) -> dict[str, int]:
    with psycopg.connect(dsn) as conn:
        return dict(conn.execute("SELECT aggregateid, count(*) FROM outbox.events WHERE type = 'order_line.snapshot' "
                                 "GROUP BY 1").fetchall())


def test_a_killed_backfill_resumes_after_its_last_chunk(new_database: Callable[..., str]) -> None:
    store = new_database("store")
    install_pos(store)
    seed_order_lines(store, 3000, 4)  # composite key (order_id, line_no)
    chunk = 500
    args = ["backfill", "--dsn", store, "--source-id", "s1", "--table", "pos.order_lines", "--chunk-size", str(chunk)]
    proc = subprocess.Popen(OUTBOX + args + ["--rate", "2000"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: sum(snapshot_counts(store).values()), timeout=60, interval=0.05, until=lambda n: n >= 3000,
                   message="3000 snapshot events")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    emitted_before = sum(snapshot_counts(store).values())
    assert 3000 <= emitted_before < 12000

    res = outbox(*args, "--resume")
    assert "backfill run 2 done" in res.stderr
    counts = snapshot_counts(store)
    assert len(counts) == 12000  # every row has its snapshot
    assert sum(counts.values()) - 12000 <= chunk  # at most one chunk emitted twice
    with psycopg.connect(store) as conn:
        runs = conn.execute("SELECT id, result, rows, resumed_from, last_key FROM outbox.backfills ORDER BY id").fetchall()
    assert [(r[0], r[1], r[3]) for r in runs] == [(1, "killed", None), (2, "done", 1)]
    assert runs[0][2] + runs[1][2] == sum(counts.values()) and runs[1][4] == ["3000", "4"]
    # the aggregate id of a composite key is the capture trigger's
    assert "17:3" in counts


def test_sigterm_stops_after_the_chunk_and_says_how_to_resume(new_database: Callable[..., str]) -> None:
    store = new_database("store")
    install_pos(store)
    seed_customers(store, 5000)
    proc = subprocess.Popen(OUTBOX + ["backfill", "--dsn", store, "--source-id", "s1", "--table", "pos.customers",
                                      "--chunk-size", "100", "--rate", "500"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # mid-run: a first chunk emitted (at 500 rows/s, the 5000 take 10 s)
    def emitted() -> int:
        with psycopg.connect(store) as conn:
            return conn.execute("SELECT count(*) FROM outbox.events WHERE type = 'customer.snapshot'").fetchone()[0]  # type: ignore[index, no-any-return]

    wait_until(emitted, timeout=30, interval=0.05, until=lambda n: n >= 100, message="the backfill's first chunk")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 1
    assert err.strip().splitlines()[-1].startswith("Error: backfill run 1 interrupted after")
    assert "--resume" in err
    with psycopg.connect(store) as conn:
        assert conn.execute("SELECT result FROM outbox.backfills").fetchall() == [("interrupted",)]


def test_dry_run_counts_and_writes_no_events(new_database: Callable[..., str]) -> None:
    store = new_database("store")
    install_pos(store)
    seed_customers(store, 1234)
    res = outbox("backfill", "--dsn", store, "--source-id", "s1", "--table", "pos.customers", "--where",
                 "loyalty_pts < 50 AND name LIKE 'customer %'", "--dry-run", "--chunk-size", "100")
    assert "would emit 634 customer.snapshot events" in res.stderr and "in 7 chunks" in res.stderr
    with psycopg.connect(store) as conn:
        assert conn.execute("SELECT count(*) FROM outbox.events").fetchone() == (0,)
        assert conn.execute("SELECT result, rows, where_clause FROM outbox.backfills").fetchall() == [
            ("dry-run", 634, "loyalty_pts < 50 AND name LIKE 'customer %'")]


@pytest.mark.parametrize("table, where, message", [
    ("pos.nope", None, "Error: table pos.nope does not exist in "),
    ("public.plain", None, "Error: table public.plain is not captured in "),
    ("pos.customers", "nosuch > 1", "Error: --where 'nosuch > 1' fails on pos.customers: column \"nosuch\" does not exist"),
    ("pos.customers", "1/0 = 1", "Error: --where '1/0 = 1' fails on pos.customers: division by zero"),
    ("customers", None, "Error: invalid setting 'table': Value error, must be SCHEMA.TABLE"),
])
def test_user_errors_are_one_line(new_database: Callable[..., str], table: str, where: str | None, message: str) -> None:
    store = new_database("store")
    install_pos(store)
    seed_customers(store, 10)
    with psycopg.connect(store) as conn:
        conn.execute("CREATE TABLE public.plain (id int PRIMARY KEY)")
    res = outbox("backfill", "--dsn", store, "--source-id", "s1", "--table", table,
                 *(["--where", where] if where else []), check=False)
    assert res.returncode in (1, 2)
    assert res.stderr.strip().splitlines() == [res.stderr.strip()], res.stderr
    assert res.stderr.startswith(message), res.stderr


def test_snapshot_ids_are_the_capture_triggers_even_for_awkward_composite_keys(new_database: Callable[..., str]) -> None:
    store = new_database("store")
    install_pos(store)
    with psycopg.connect(store) as conn:
        conn.execute("CREATE TABLE pos.skus (shop text, code text, price int, PRIMARY KEY (code, shop))")
    outbox("install", "--dsn", store, "--capture", "pos.skus=sku")
    with psycopg.connect(store) as conn:
        conn.execute("INSERT INTO pos.skus VALUES ('s:1', 'a\\b:c', 1), ('s2', 'x', 1), ('s\\3', 'y:', 1), ('50%', '%', 1)")
    outbox("backfill", "--dsn", store, "--source-id", "s1", "--table", "pos.skus", "--chunk-size", "1",
           "--where", "shop LIKE '%'")
    with psycopg.connect(store) as conn:
        got = conn.execute("SELECT type, aggregateid, payload FROM outbox.events ORDER BY type, aggregateid").fetchall()
    created = [(i, p) for t, i, p in got if t == "sku.created"]
    assert [(i, p) for t, i, p in got if t == "sku.snapshot"] == created and len(created) == 4


def _backfill_waits_on_a_lock(dsn: str) -> bool:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return bool(conn.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'outbox-backfill' "
                                 "AND wait_event_type = 'Lock'").fetchone()[0])  # type: ignore[index]


def test_a_key_moved_during_a_chunk_makes_no_row_skipped(new_database: Callable[..., str],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A writer changes the key of a row the chunk is about to lock: PostgreSQL's EvalPlanQual hands
    the chunk the row's new version (a far greater key); the walk must not jump there."""
    monkeypatch.setattr(backfill_module, "LOCK_TIMEOUT", "60s")  # the chunk waits for the mover's commit
    store = new_database("store")
    install_pos(store)
    seed_customers(store, 100)
    result: dict[str, object] = {}

    def run() -> None:
        result["outcome"] = run_backfill(BackfillSettings(dsn=store, source_id="s1", table="pos.customers", chunk_size=10),
                                         out=StringIO(), tty=False, stop=lambda: False)

    with psycopg.connect(store) as mover:
        mover.execute("UPDATE pos.customers SET id = 1000005 WHERE id = 5")  # holds the row until commit
        backfill = threading.Thread(target=run, daemon=True)
        backfill.start()
        wait_until(lambda: _backfill_waits_on_a_lock(store), timeout=30, message="the chunk to wait for the moved row")
        mover.commit()
    backfill.join(60)
    assert result["outcome"].result == "done"  # type: ignore[attr-defined]
    with psycopg.connect(store) as conn:
        missing = conn.execute("SELECT array_agg(c.id ORDER BY c.id) FROM pos.customers c WHERE NOT EXISTS ("
                               "SELECT FROM outbox.events e WHERE e.type = 'customer.snapshot' "
                               "AND e.aggregateid = c.id::text)").fetchone()[0]  # type: ignore[index]
    assert missing is None, f"rows never snapshotted: {missing}"


def test_reconcile_removes_rows_deleted_while_events_were_lost(
        new_database: Callable[..., str], topic_prefix: str, kafka_bootstrap: str) -> None:
    """Rows deleted while the slot was gone (no event says so) stay live in the read store unless a
    --reconcile backfill tells the sinks what the table no longer holds (issue #19 item 3)."""
    store, readstore = new_database("store"), new_database("readstore")
    install_pos(store)
    seed_customers(store, 300)
    relay = RelayProcess(store, "s1", topic_prefix, kafka_bootstrap)
    consumer = ConsumerProcess(readstore, topic_prefix, kafka_bootstrap, f"{topic_prefix}-rs")
    try:
        relay.start()
        consumer.start()
        run_backfill(BackfillSettings(dsn=store, source_id="s1", table="pos.customers", chunk_size=50), out=StringIO(), tty=False)
        wait_converged(readstore, {"s1": store}, [relay, consumer], timeout=120)
        with psycopg.connect(store) as conn:
            conn.execute("SET session_replication_role = replica")  # as if the slot was lost: no event
            conn.execute("DELETE FROM pos.customers WHERE id % 7 = 0")
        with psycopg.connect(store, autocommit=True) as conn:
            conn.execute("UPDATE pos.customers SET name = 'moved on' WHERE id = 1")  # a live change too
        outcome = run_backfill(BackfillSettings(dsn=store, source_id="s1", table="pos.customers", chunk_size=50,
                                                reconcile=True), out=StringIO(), tty=False)
        assert outcome.result == "done"
        wait_converged(readstore, {"s1": store}, [relay, consumer], timeout=120)
        with psycopg.connect(readstore) as conn:
            assert conn.execute("SELECT count(*) FROM readstore.entities WHERE deleted AND event_type = %s",
                                (contract.SNAPSHOT_COMPLETE_TYPE,)).fetchone() == (42,)
            assert conn.execute("SELECT count(*) FROM readstore.entities WHERE aggregate_id = 'pos.customers'"
                                ).fetchone() == (0,)  # the marker is no entity
            history = conn.execute("SELECT history FROM readstore.sources WHERE source_id = 's1'").fetchone()
        with psycopg.connect(store) as conn:
            systemid, timeline = conn.execute("SELECT (SELECT system_identifier FROM pg_control_system()), "
                                              "(SELECT timeline_id FROM pg_control_checkpoint())").fetchone()  # type: ignore[misc]
        assert history == (f"{systemid}.{timeline}",)  # ce_history, from the relay's IDENTIFY_SYSTEM
    finally:
        relay.close()
        consumer.close()


@pytest.mark.parametrize("extra", [{"where": "id > 10"}, {"resume": True}])
def test_reconcile_needs_the_whole_table(new_database: Callable[..., str], extra: dict[str, object]) -> None:
    store = new_database("store")
    install_pos(store)
    with pytest.raises(backfill_module.BackfillError, match="--reconcile needs the whole table"):
        run_backfill(BackfillSettings(dsn=store, source_id="s1", table="pos.customers", reconcile=True, **extra),
                     out=StringIO(), tty=False)
