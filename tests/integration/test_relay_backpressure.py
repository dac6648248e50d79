"""Back-pressure by bytes: large events with Kafka away fill the producer's queue long before
--max-in-flight events wait. The relay must keep talking to PostgreSQL and honour SIGTERM. Real servers."""
from __future__ import annotations

import subprocess
import time
from typing import Any

import psycopg
import pytest

from tests.support.db import slot_state, wait_slot_confirmed, wal_lsn
from tests.support.kafka import wait_for_records
from tests.support.wait import wait_until

pytestmark = pytest.mark.integration

EVENT_BYTES = 8_000  # well above the ~1.7 kB where 20,000 events outgrow librdkafka's 32 MB queue
REPLY = ("SELECT r.pid, r.reply_time, extract(epoch FROM r.reply_time)::float8, extract(epoch FROM now())::float8"
         " FROM pg_stat_replication r JOIN pg_replication_slots s ON s.active_pid = r.pid"
         " WHERE s.database = current_database()")


def write_padded(dsn: str, transactions: int, rows: int) -> str:
    """Events of ~8 kB each (a compressible pad: little WAL, the relay still gets every byte); returns
    a WAL position before the first transaction's commit."""
    with psycopg.connect(dsn) as conn:
        for n in range(transactions):
            conn.execute("INSERT INTO outbox.events (aggregatetype, aggregateid, type, payload)"
                         " SELECT 'pad', g::text, 'pad.created', jsonb_build_object('n', g, 'pad', repeat('x', %s))"
                         " FROM generate_series(1, %s) g", (EVENT_BYTES, rows))
            if not n:
                before_commit: str = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()[0]  # type: ignore[index]
            conn.commit()
    return before_commit


def reply_state(dsn: str) -> tuple[int, float, float]:
    """(walsender pid, reply_time, the server's now) of the relay's replication connection, as epoch seconds."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(REPLY).fetchone()
    assert row is not None and row[1] is not None, "the relay has no replication connection with a reply"
    return row[0], row[2], row[3]


def test_a_full_producer_queue_keeps_answering_postgresql_and_sigterm_returns_within_the_drain_timeout(
        store: str, topic_prefix: str, kafka_bootstrap: str, relays: Any, sandbox: Any) -> None:
    relay = relays(store, "s1", topic_prefix, kafka_bootstrap, "--status-interval", "1", "--drain-timeout", "3",
                   "--heartbeat-interval", "0").start()  # no heartbeat commits: nothing confirmable after the writes
    write_padded(store, 1, 1)  # the topic exists, its metadata is known
    wait_for_records(kafka_bootstrap, [f"{topic_prefix}.pad"], 1, timeout=60)
    wait_slot_confirmed(store, wal_lsn(store), relay=relay)
    pid_before, _ = slot_state(store)
    sandbox.stop_kafka()
    try:
        # 6,000 events of 8 kB: 48 MB, more than librdkafka's queue (32 MB) and far less than 20,000 events
        before_commit = write_padded(store, 6, 1_000)
        _, _, written_at = reply_state(store)
        # Whatever the relay could read it has read within seconds; from then on it waits for Kafka. It must
        # keep sending standby status all along: reply_time keeps advancing, on the same connection.
        for ahead in (6.0, 12.0):
            def past(got: tuple[int, float, float], ahead: float = ahead) -> bool:
                return got[1] >= written_at + ahead

            def stalled(ahead: float = ahead) -> str:
                return (f"the relay's reply_time to pass {ahead:.0f} s after the writes (it stopped answering "
                        f"PostgreSQL): {reply_state(store)}; {relay.output()}")

            pid, _, _ = wait_until(lambda: reply_state(store), timeout=40, interval=0.5, until=past, message=stalled)
            assert pid == pid_before, "the replication connection was replaced while Kafka was down"
            assert relay.proc is not None and relay.proc.poll() is None, relay.output()
        started = time.monotonic()
        try:
            code = relay.terminate(timeout=40)
        except subprocess.TimeoutExpired:
            pytest.fail(f"SIGTERM did not stop the relay within 40 s with --drain-timeout 3: {relay.output()}")
        took = time.monotonic() - started
        assert code == 0, relay.output()
        assert took < 3 + 5, f"SIGTERM took {took:.1f} s with --drain-timeout 3"
        active, confirmed = slot_state(store)
        with psycopg.connect(store, autocommit=True) as conn:
            unsent_confirmed = conn.execute("SELECT %s::pg_lsn > %s::pg_lsn", (confirmed, before_commit)).fetchone()[0]  # type: ignore[index]
        assert active is None
        assert not unsent_confirmed, f"the relay confirmed what Kafka never acknowledged ({confirmed} > {before_commit})"
    finally:
        sandbox.up()
