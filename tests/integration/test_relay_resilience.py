"""The relay when its servers fail: Kafka away, PostgreSQL restarted, slot gone or busy, SIGTERM,
oversized rows, one huge transaction, and an idle slot next to a busy database. Real servers."""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

from tests.support.db import committed_ids, slot_state, wait_relay_received, wait_slot_confirmed, wal_lsn
from tests.support.kafka import kcat_read, wait_for_ids
from tests.support.processes import outbox as run_outbox
from tests.support.wait import wait_until

pytestmark = pytest.mark.integration

TOPICS = ("customer", "order", "order_line")


def wait_all_arrive(bootstrap: str, prefix: str, ids: set[str], timeout: float = 120) -> list[dict[str, Any]]:
    """Every record of the POS topics once ``ids`` are all there."""
    records = wait_for_ids(bootstrap, [f"{prefix}.{a}" for a in TOPICS], ids, timeout=timeout)
    assert {r["headers"]["ce_id"] for r in records} <= ids, "events that were never committed reached Kafka"
    return records


def write_customers(dsn: str, transactions: int, rows: int) -> None:
    with psycopg.connect(dsn) as conn:
        for _ in range(transactions):
            conn.execute("INSERT INTO pos.customers (name) SELECT 'c' || g FROM generate_series(1, %s) g", (rows,))
            conn.commit()


def test_kafka_down_pauses_reading_keeps_the_replication_connection_and_resumes(
        store: str, topic_prefix: str, kafka_bootstrap: str, relays: Any, sandbox: Any) -> None:
    # wal_sender_timeout of 3 s: the relay must keep talking to PostgreSQL while it cannot publish
    dsn = f"{store} options='-c wal_sender_timeout=3s'"
    relay = relays(dsn, "s1", topic_prefix, kafka_bootstrap, "--max-in-flight", "50", "--status-interval", "1").start()
    write_customers(store, 2, 5)
    wait_all_arrive(kafka_bootstrap, topic_prefix, committed_ids(store))
    pid_before, confirmed_before = slot_state(store)
    sandbox.stop_kafka()
    try:
        write_customers(store, 30, 10)  # 300 events: far more than --max-in-flight
        confirmed_during: set[str] = set()
        pids_during: set[int | None] = set()
        for _ in range(16):  # longer than wal_sender_timeout several times over, and than one probe
            time.sleep(1)
            pid, confirmed = slot_state(store)
            pids_during.add(pid)
            confirmed_during.add(confirmed)
            assert relay.proc is not None and relay.proc.poll() is None, relay.output()
    finally:
        sandbox.up()
    assert pids_during == {pid_before}, "the replication connection was dropped while Kafka was down"
    assert len(confirmed_during) == 1, "the relay confirmed a position Kafka never acknowledged"
    records = wait_all_arrive(kafka_bootstrap, topic_prefix, committed_ids(store))
    assert len(records) == 310  # Kafka was down for less than --kafka-message-timeout: nothing repeats
    assert relay.proc is not None and relay.proc.poll() is None
    wait_until(lambda: slot_state(store)[1] != confirmed_before, timeout=15, interval=0.5,
               message="the slot to move once Kafka acknowledged")
    relay.wait_for_output("is reachable again", timeout=30)  # the next probe of Kafka (every 10 s) says so
    out = relay.output()
    print(out)
    assert out.count("is unreachable") == 1 and out.count("is reachable again") == 1, out
    assert relay.terminate() == 0


def test_kafka_down_past_the_message_timeout_replays_from_the_slot(
        store: str, topic_prefix: str, kafka_bootstrap: str, relays: Any, sandbox: Any) -> None:
    relay = relays(store, "s1", topic_prefix, kafka_bootstrap, "--kafka-message-timeout", "2",
                   "--status-interval", "1").start()
    write_customers(store, 1, 3)
    wait_all_arrive(kafka_bootstrap, topic_prefix, committed_ids(store))
    sandbox.stop_kafka()
    try:
        write_customers(store, 20, 10)
        # deliveries time out: the relay drops its producer and waits for Kafka, running
        relay.wait_for_output("reconnecting", timeout=60)
        assert relay.proc is not None and relay.proc.poll() is None, relay.output()
    finally:
        sandbox.up()
    records = wait_all_arrive(kafka_bootstrap, topic_prefix, committed_ids(store))
    assert len({r["headers"]["ce_id"] for r in records}) == 203
    assert relay.proc is not None and relay.proc.poll() is None
    assert "reconnecting" in relay.output()
    assert relay.terminate() == 0


def test_postgresql_restart_reconnects_with_backoff_and_loses_nothing(
        store: str, topic_prefix: str, kafka_bootstrap: str, relays: Any, sandbox: Any) -> None:
    relay = relays(store, "s1", topic_prefix, kafka_bootstrap, "--status-interval", "1").start()
    committed = 0
    stop = threading.Event()

    def writer() -> None:
        nonlocal committed
        while not stop.is_set():
            try:
                with psycopg.connect(store, connect_timeout=2) as conn:
                    while not stop.is_set():
                        conn.execute("INSERT INTO pos.customers (name) SELECT 'w' || g FROM generate_series(1, 5) g")
                        conn.commit()
                        committed += 5
                        time.sleep(0.02)
            except psycopg.OperationalError:  # the restart: a commit may be lost, and then it is not in the WAL
                time.sleep(0.2)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        time.sleep(2)
        sandbox.restart_pg()
        time.sleep(3)
    finally:
        stop.set()
        thread.join()
    assert committed > 0
    ids = committed_ids(store)
    wait_all_arrive(kafka_bootstrap, topic_prefix, ids)
    assert relay.proc is not None and relay.proc.poll() is None, relay.output()
    out = relay.output()
    assert "reconnecting to 127.0.0.1:" in out and "(attempt 1)" in out, out
    relay.wait_streaming()
    assert relay.terminate() == 0


def test_sigterm_while_kafka_is_down_exits_0_within_the_drain_timeout_and_confirms_nothing_unsent(
        store: str, topic_prefix: str, kafka_bootstrap: str, relays: Any, sandbox: Any) -> None:
    relay = relays(store, "s1", topic_prefix, kafka_bootstrap, "--drain-timeout", "3", "--status-interval", "1").start()
    write_customers(store, 1, 2)
    wait_all_arrive(kafka_bootstrap, topic_prefix, committed_ids(store))
    sandbox.stop_kafka()
    try:
        with psycopg.connect(store) as conn:  # the first unsent transaction commits after before_commit
            conn.execute("INSERT INTO pos.customers (name) SELECT 'c' || g FROM generate_series(1, 10) g")
            before_commit = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()[0]  # type: ignore[index]
            conn.commit()
        write_customers(store, 4, 10)
        wait_relay_received(store, wal_lsn(store), relay=relay)  # read, not acknowledged: what SIGTERM must not confirm
        started = time.monotonic()
        assert relay.terminate(timeout=30) == 0, relay.output()
        took = time.monotonic() - started
        # a bound, not a speed: without it the relay would wait for Kafka forever
        assert took < 3 + 15, f"SIGTERM took {took:.1f} s with --drain-timeout 3"
        active, confirmed = slot_state(store)
        with psycopg.connect(store, autocommit=True) as conn:
            unsent_confirmed = conn.execute("SELECT %s::pg_lsn > %s::pg_lsn", (confirmed, before_commit)).fetchone()[0]  # type: ignore[index]
        assert active is None
        assert not unsent_confirmed, f"an event Kafka never acknowledged was confirmed ({confirmed} > {before_commit})"
        assert "unacknowledged after 3 s" in relay.output()
    finally:
        sandbox.up()
    relays(store, "s1", topic_prefix, kafka_bootstrap).start()  # the next relay sends them
    wait_all_arrive(kafka_bootstrap, topic_prefix, committed_ids(store))


def test_sigterm_drains_in_flight_events_and_confirms_them(
        store: str, topic_prefix: str, kafka_bootstrap: str, relays: Any) -> None:
    relay = relays(store, "s1", topic_prefix, kafka_bootstrap, "--status-interval", "60").start()
    write_customers(store, 20, 50)
    time.sleep(0.5)
    assert relay.terminate(timeout=40) == 0, relay.output()
    records = wait_all_arrive(kafka_bootstrap, topic_prefix, committed_ids(store), timeout=10)
    published = len(records)
    after_last_write = wal_lsn(store)
    again = relays(store, "s1", topic_prefix, kafka_bootstrap).start()
    # a restarted relay resends only what was not confirmed: nothing, when the drain ended in time. Once
    # the slot confirmed past every write, whatever it was going to resend is in Kafka.
    wait_slot_confirmed(store, after_last_write, relay=again)
    assert sum(len(kcat_read(kafka_bootstrap, f"{topic_prefix}.{a}")) for a in TOPICS) == published


def test_missing_or_invalidated_slot_refuses_to_start_and_names_the_recovery(
        store: str, kafka_bootstrap: str) -> None:
    args = ("relay", "--dsn", store, "--source-id", "s1", "--kafka-bootstrap", kafka_bootstrap)
    with psycopg.connect(store, autocommit=True) as conn:
        slot = conn.execute("SELECT slot_name FROM pg_replication_slots WHERE database = current_database()").fetchone()[0]  # type: ignore[index]
        conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
    proc = run_outbox(*args, check=False)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert "does not exist" in proc.stderr and "outbox install" in proc.stderr and "outbox backfill" in proc.stderr
    with psycopg.connect(store, autocommit=True) as conn:  # never silently recreated from "now"
        assert conn.execute("SELECT count(*) FROM pg_replication_slots WHERE slot_name = %s", (slot,)).fetchone()[0] == 0  # type: ignore[index]

    # invalidated: max_slot_wal_keep_size exceeded while no relay ran
    with psycopg.connect(store, autocommit=True) as conn:
        conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (slot,))
        conn.execute("ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'")
        conn.execute("SELECT pg_reload_conf()")
        try:
            for _ in range(40):
                conn.execute("CREATE TEMP TABLE IF NOT EXISTS filler (x text)")
                conn.execute("INSERT INTO filler SELECT repeat('x', 1000) FROM generate_series(1, 2000)")
                conn.execute("SELECT pg_switch_wal()")
                conn.execute("CHECKPOINT")
                status = conn.execute("SELECT wal_status FROM pg_replication_slots WHERE slot_name = %s", (slot,)).fetchone()[0]  # type: ignore[index]
                if status == "lost":
                    break
        finally:
            conn.execute("ALTER SYSTEM RESET max_slot_wal_keep_size")
            conn.execute("SELECT pg_reload_conf()")
    assert status == "lost"
    proc = run_outbox(*args, check=False)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert "invalidated" in proc.stderr and "outbox install" in proc.stderr and "outbox backfill" in proc.stderr


def test_a_second_relay_on_the_same_slot_fails_with_one_clear_line(
        store: str, topic_prefix: str, kafka_bootstrap: str, relays: Any) -> None:
    first = relays(store, "s1", topic_prefix, kafka_bootstrap).start()
    pid, _ = slot_state(store)
    proc = run_outbox("relay", "--dsn", store, "--source-id", "s1", "--kafka-bootstrap", kafka_bootstrap, check=False)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert f"is in use by another relay (pid {pid})" in proc.stderr
    assert first.proc is not None and first.proc.poll() is None
    assert first.terminate() == 0


def test_an_event_too_large_for_kafka_is_parked_not_dropped_and_the_relay_goes_on(
        store: str, topic_prefix: str, kafka_bootstrap: str, relays: Any) -> None:
    from confluent_kafka.admin import AdminClient, NewTopic

    topic = f"{topic_prefix}.customer"
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    admin.create_topics([NewTopic(topic, 1, 1, config={"max.message.bytes": "200000"})])[topic].result(30)
    relay = relays(store, "s1", topic_prefix, kafka_bootstrap, "--status-interval", "1").start()
    with psycopg.connect(store) as conn:
        for name in ("small-1", "x" * 3_000_000, "y" * 500_000, "small-2"):
            # 3 MB: over the producer's message.max.bytes; 500 kB: under it, over the topic's limit
            conn.execute("INSERT INTO pos.customers (name) VALUES (%s)", (name,))
            conn.commit()
        events = {r[0]: r[1] for r in conn.execute("SELECT id::text, payload::text FROM outbox.events"
                                                   " WHERE type <> 'outbox.heartbeat'")}
    big = {i for i, p in events.items() if len(p) > 100_000}
    assert len(big) == 2
    def published_and_markers() -> tuple[set[str], list[dict[str, Any]]]:
        return {r["headers"]["ce_id"] for r in kcat_read(kafka_bootstrap, topic)}, kcat_read(kafka_bootstrap, topic + ".dlq")

    published, markers = wait_until(
        published_and_markers, timeout=90, interval=1,
        until=lambda got: got[0] >= set(events) - big and {m["headers"]["ce_id"] for m in got[1]} >= big,
        message=lambda: f"the small events on {topic} and markers of the big ones on {topic}.dlq: {relay.output()}")
    assert published == set(events) - big
    assert {m["headers"]["ce_id"] for m in markers} == big
    for m in markers:
        h = m["headers"]
        assert m["payload"] in (None, "") and m["key"].startswith("s1:")
        assert "too large" in h["dlq_error"] or "larger than" in h["dlq_error"]
        assert int(h["dlq_size"]) > 200_000 and h["dlq_lsn"] == h["ce_commitlsn"] and h["ce_type"] == "customer.created"
    with psycopg.connect(store) as conn:  # the whole row is findable, with its reason and position
        parked = {r[0]: r[1:] for r in conn.execute(
            "SELECT id::text, payload::text, topic, error, size_bytes, commit_lsn::text FROM outbox.parked")}
    assert set(parked) == big
    for event_id, (payload, ptopic, error, size, lsn) in parked.items():
        assert payload == events[event_id] and ptopic == topic and size > 200_000 and "larger than" in error
        assert lsn == next(m["headers"]["dlq_lsn"] for m in markers if m["headers"]["ce_id"] == event_id)
    assert relay.proc is not None and relay.proc.poll() is None, relay.output()
    assert relay.output().count("parked in outbox.parked") >= 2
    assert relay.terminate() == 0


def test_a_large_transaction_is_published_only_after_its_commit(
        store: str, topic_prefix: str, kafka_bootstrap: str, relays: Any) -> None:
    rows = 50_000
    relay = relays(store, "s1", topic_prefix, kafka_bootstrap, "--max-in-flight", "5000").start()
    topic = f"{topic_prefix}.big"
    with psycopg.connect(store) as conn:
        conn.execute("INSERT INTO outbox.events (aggregatetype, aggregateid, type, payload)"
                     " SELECT 'big', g::text, 'big.created', jsonb_build_object('n', g) FROM generate_series(1, %s) g",
                     (rows,))
        after_rows = conn.execute("SELECT pg_current_wal_insert_lsn() - '0/0'::pg_lsn").fetchone()[0]  # type: ignore[index]
        with psycopg.connect(store, autocommit=True) as other:  # a commit flushes the WAL, the open rows with it
            other.execute("SELECT txid_current()")
        # open, with its rows in the WAL: pgoutput v1 sends nothing before the commit. Once the slot
        # confirmed past the rows, the relay has read that far, and published whatever it got of them.
        wait_slot_confirmed(store, int(after_rows), relay=relay)
        assert kcat_read(kafka_bootstrap, topic) == []
        before_commit_ms = time.time() * 1000
        conn.commit()
    records = wait_until(lambda: kcat_read(kafka_bootstrap, topic), timeout=120, interval=2,
                         until=lambda got: len(got) >= rows, message=f"{rows} records on {topic}")
    assert len({r["headers"]["ce_id"] for r in records}) == rows
    assert min(r["ts"] for r in records) >= before_commit_ms - 5  # created by the relay after the commit
    assert len({r["headers"]["ce_commitlsn"] for r in records}) == 1
    assert sorted(int(r["headers"]["ce_txseq"]) for r in records) == list(range(rows))
    assert relay.terminate() == 0


def test_an_idle_stores_slot_does_not_pin_the_wal_of_a_busy_neighbour(
        store: str, new_database: Callable[..., str], topic_prefix: str, kafka_bootstrap: str, relays: Any) -> None:
    busy = new_database("busy")
    relay = relays(store, "s1", topic_prefix, kafka_bootstrap, "--heartbeat-interval", "1", "--status-interval", "1").start()
    retained = "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint FROM pg_replication_slots" \
               " WHERE database = current_database()"
    with psycopg.connect(busy, autocommit=True) as conn:
        start = conn.execute("SELECT pg_current_wal_lsn()").fetchone()[0]  # type: ignore[index]
        conn.execute("CREATE TABLE filler (x text)")
        written = 0
        while written < 50 * 2**20:  # ~50 MB of WAL in another database of the same cluster
            conn.execute("INSERT INTO filler SELECT repeat(md5(g::text), 30) FROM generate_series(1, 20000) g")
            written = conn.execute("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), %s)::bigint", (start,)).fetchone()[0]  # type: ignore[index]
        conn.execute("CHECKPOINT")  # logs running transactions: a place the slot's restart_lsn may move to
    with psycopg.connect(store, autocommit=True) as conn:
        held = wait_until(lambda: conn.execute(retained).fetchone()[0], timeout=60, interval=1,  # type: ignore[index]
                          until=lambda at: at <= 4 * 2**20, message="the idle store's slot to retain at most 4 MB of WAL")
    assert written >= 50 * 2**20
    assert held <= 4 * 2**20, f"the idle store's slot retains {held / 2**20:.1f} MB of WAL"
    assert relay.terminate() == 0
