"""The relay against real PostgreSQL and Kafka, checked with kcat (an independent client)."""
from __future__ import annotations

import json
import random
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import psycopg
import pytest

import outbox
from outbox.dev.pos import run_workload
from tests.support.db import committed_ids, wait_slot_confirmed, wal_lsn
from tests.support.kafka import kcat_read, wait_for_ids, wait_for_records
from tests.support.metrics import scrape
from tests.support.processes import outbox as run_outbox
from tests.support.wait import wait_until

pytestmark = pytest.mark.integration


def test_every_change_type_reaches_kafka_following_the_contract(store: str, topic_prefix: str, kafka_bootstrap: str, relays: Any) -> None:
    relay = relays(store, "s1", topic_prefix, kafka_bootstrap).start()
    before = datetime.now(timezone.utc) - timedelta(seconds=1)
    with psycopg.connect(store) as conn:
        cid = conn.execute("INSERT INTO pos.customers (name, email, balance) VALUES ('Zoë Ørsted', NULL, 1234.50) RETURNING id").fetchone()[0]  # type: ignore[index]
        conn.commit()
        conn.execute("UPDATE pos.customers SET email = 'zoe@example.com' WHERE id = %s", (cid,))
        conn.commit()
        conn.execute("UPDATE pos.customers SET name = name WHERE id = %s", (cid,))  # changes nothing: no event
        conn.commit()
        oid = conn.execute("INSERT INTO pos.orders (customer_id, total) VALUES (%s, 1234567890.1234) RETURNING id", (cid,)).fetchone()[0]  # type: ignore[index]
        conn.execute("INSERT INTO pos.order_lines VALUES (%s, 1, 'SKU-1', 2, 9.99), (%s, 2, 'SKU-2', 1, 0.01)", (oid, oid))
        conn.commit()
        conn.execute("DELETE FROM pos.order_lines WHERE order_id = %s AND line_no = 2", (oid,))
        conn.commit()
        event_id = outbox.emit(conn, aggregate_type="customer", aggregate_id=str(cid), event_type="customer.loyalty_awarded",
                               payload={"points": 50, "reason": "Geburtstag"})
        conn.commit()
        conn.execute("SET LOCAL outbox.origin = 'crm'")
        conn.execute("UPDATE pos.customers SET phone = '+33 1 23' WHERE id = %s", (cid,))
        conn.commit()
        ids = {r[0] for r in conn.execute("SELECT id::text FROM outbox.events WHERE type <> 'outbox.heartbeat'").fetchall()}

    topics = [f"{topic_prefix}.customer", f"{topic_prefix}.order", f"{topic_prefix}.order_line"]
    got = wait_for_records(kafka_bootstrap, topics, 8)
    customer, order, line = (got[t] for t in topics)
    assert [r["headers"]["ce_type"] for r in customer] == [
        "customer.created", "customer.updated", "customer.loyalty_awarded", "customer.updated"]
    assert [r["headers"]["ce_type"] for r in order] == ["order.created"]
    assert sorted(r["headers"]["ce_type"] for r in line) == ["order_line.created", "order_line.created", "order_line.deleted"]
    all_records = customer + order + line
    assert {r["headers"]["ce_id"] for r in all_records} == ids and len(all_records) == len(ids)
    assert str(event_id) in ids

    created = customer[0]
    assert created["key"] == f"s1:{cid}"
    h = created["headers"]
    assert h["ce_specversion"] == "1.0" and h["ce_source"] == "/stores/s1" and h["ce_subject"] == str(cid)
    assert h["content-type"] == "application/json" and h["ce_aggregatetype"] == "customer"
    assert before <= datetime.fromisoformat(h["ce_time"].replace("Z", "+00:00")) <= datetime.now(timezone.utc)
    assert "ce_origin" not in h and int(h["ce_xid"]) > 0 and "/" in h["ce_commitlsn"] and h["ce_txseq"] == "0"
    value = json.loads(created["payload"], parse_float=Decimal)
    assert value["name"] == "Zoë Ørsted" and value["email"] is None and value["balance"] == Decimal("1234.50")
    assert json.loads(customer[1]["payload"])["email"] == "zoe@example.com"
    assert json.loads(customer[2]["payload"]) == {"points": 50, "reason": "Geburtstag"}
    assert customer[3]["headers"]["ce_origin"] == "crm"
    assert json.loads(order[0]["payload"], parse_float=Decimal)["total"] == Decimal("1234567890.1234")
    deleted = next(r for r in line if r["headers"]["ce_type"] == "order_line.deleted")
    assert deleted["key"] == f"s1:{oid}:2"
    assert json.loads(deleted["payload"], parse_float=Decimal) == {
        "order_id": oid, "line_no": 2, "sku": "SKU-2", "qty": 1, "unit_price": Decimal("0.01")}
    # the two lines of one transaction carry their index in it
    first_tx = sorted((r for r in line if r["headers"]["ce_type"] == "order_line.created"), key=lambda r: r["headers"]["ce_txseq"])
    assert [r["headers"]["ce_txseq"] for r in first_tx] == ["0", "1"] or first_tx[0]["headers"]["ce_commitlsn"] == order[0]["headers"]["ce_commitlsn"]
    assert relay.terminate() == 0


def test_rollbacks_emit_nothing_and_per_key_order_holds(store: str, topic_prefix: str, kafka_bootstrap: str, relays: Any) -> None:
    relay = relays(store, "s1", topic_prefix, kafka_bootstrap).start()
    with psycopg.connect(store) as conn:
        conn.execute("INSERT INTO pos.customers (name) SELECT 'customer ' || g FROM generate_series(1, 20) g")
        conn.commit()
        conn.execute("INSERT INTO pos.customers (name) VALUES ('ROLLED-BACK')")
        conn.rollback()
        with conn.transaction():
            conn.execute("INSERT INTO pos.customers (name) VALUES ('KEPT')")
            with pytest.raises(psycopg.errors.DivisionByZero):
                with conn.transaction():  # a savepoint, rolled back
                    conn.execute("INSERT INTO pos.customers (name) VALUES ('SAVEPOINT-GONE')")
                    conn.execute("SELECT 1/0")

    committed_updates = [0] * 8

    def writer(n: int) -> None:
        rng = random.Random(n)
        with psycopg.connect(store) as conn:
            for _ in range(40):
                ids = rng.sample(range(1, 21), 3)
                with conn.transaction(force_rollback=rng.random() < 0.1) as tx:
                    for cid in sorted(ids):
                        conn.execute("UPDATE pos.customers SET loyalty_pts = loyalty_pts + 1 WHERE id = %s", (cid,))
                if not tx.force_rollback:
                    committed_updates[n] += 3

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    expected = 20 + 1 + sum(committed_updates)
    topic = f"{topic_prefix}.customer"
    records = wait_for_records(kafka_bootstrap, [topic], expected)[topic]
    assert len(records) == expected
    names = {json.loads(r["payload"])["name"] for r in records}
    assert "KEPT" in names and "ROLLED-BACK" not in names and "SAVEPOINT-GONE" not in names
    by_key: dict[str, list[int]] = defaultdict(list)
    for r in sorted(records, key=lambda r: (r["partition"], r["offset"])):
        by_key[r["key"]].append(json.loads(r["payload"])["loyalty_pts"])
    with psycopg.connect(store) as conn:
        final = dict(conn.execute("SELECT 's1:' || id, loyalty_pts FROM pos.customers").fetchall())
    for key, points in by_key.items():
        assert points == sorted(points) and len(set(points)) == len(points), f"order broken for {key}: {points}"
        assert points[-1] == final[key]
    assert relay.terminate() == 0


def test_sigkill_during_a_workload_loses_nothing_and_sigterm_confirms(store: str, topic_prefix: str, kafka_bootstrap: str, relays: Any) -> None:
    relay = relays(store, "s1", topic_prefix, kafka_bootstrap).start()
    done = threading.Event()
    result: list[Any] = []
    writer = threading.Thread(target=lambda: (result.append(run_workload(store, 600, seed=7)), done.set()))
    writer.start()
    kills = 0
    rng = random.Random(3)
    while not done.is_set() or kills < 3:
        time.sleep(rng.uniform(0.3, 1.2))
        relay.kill()
        kills += 1
        relay.start()
    writer.join()
    ids = committed_ids(store)
    topics = [f"{topic_prefix}.{a}" for a in ("customer", "order", "order_line")]
    seen = {r["headers"]["ce_id"] for r in wait_for_ids(kafka_bootstrap, topics, ids, timeout=90)}
    assert not ids - seen, f"{len(ids - seen)} committed events missing from Kafka after {kills} kills"
    assert seen <= ids, "events that were never committed reached Kafka"
    # SIGTERM drains and confirms: a restarted relay sends nothing again
    assert relay.terminate() == 0
    published = sum(len(kcat_read(kafka_bootstrap, t)) for t in topics)
    after_last_write = wal_lsn(store)
    again_relay = relays(store, "s1", topic_prefix, kafka_bootstrap).start()
    # once the slot confirmed past every write, whatever the new relay was going to resend is in Kafka
    wait_slot_confirmed(store, after_last_write, relay=again_relay)
    again = sum(len(kcat_read(kafka_bootstrap, t)) for t in topics)
    assert again == published


def test_relay_refuses_clearly_without_an_outbox(new_database: Callable[..., str], kafka_bootstrap: str) -> None:
    bare = new_database("bare")
    proc = run_outbox("relay", "--dsn", bare, "--source-id", "s1", "--kafka-bootstrap", kafka_bootstrap, check=False)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "outbox install" in proc.stderr and "Traceback" not in proc.stderr


def test_relay_says_what_is_wrong_with_its_servers(store: str, kafka_bootstrap: str) -> None:
    proc = run_outbox("relay", "--dsn", "host=127.0.0.1 port=1 dbname=x password=hunter2", "--source-id", "s1",
                      "--kafka-bootstrap", kafka_bootstrap, check=False)
    assert proc.returncode == 1 and "cannot connect" in proc.stderr and "hunter2" not in proc.stderr
    assert proc.stderr.count("\n") == 1
    proc = run_outbox("relay", "--dsn", store, "--source-id", "s1", "--kafka-bootstrap", "127.0.0.1:1", check=False)
    assert proc.returncode == 1 and "cannot reach Kafka" in proc.stderr and proc.stderr.count("\n") == 1
    proc = run_outbox("relay", "--dsn", store, "--source-id", "bad id", "--kafka-bootstrap", kafka_bootstrap, check=False)
    assert proc.returncode == 2 and "source_id" in proc.stderr
    with psycopg.connect(store) as conn:  # nothing was left holding the slot
        assert conn.execute("SELECT count(*) FROM pg_replication_slots WHERE active").fetchone()[0] == 0  # type: ignore[index]




def test_heartbeats_come_back_through_the_wal_and_are_never_published(store: str, topic_prefix: str,
                                                                       kafka_bootstrap: str, relays: Any) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with psycopg.connect(store, autocommit=True) as conn:
        start_lsn = conn.execute("SELECT pg_current_wal_lsn()").fetchone()[0]  # type: ignore[index]
    relay = relays(store, "s1", topic_prefix, kafka_bootstrap, "--heartbeat-interval", "0.5",
                   "--status-interval", "1", "--metrics-port", str(port)).start()
    started = time.monotonic()
    with psycopg.connect(store, autocommit=True) as conn:
        def beats_and_slot() -> tuple[int, bool]:
            relay.assert_running()
            return conn.execute(  # type: ignore[return-value]
                "SELECT (SELECT count(*) FROM outbox.events WHERE type = 'outbox.heartbeat'),"
                " (SELECT confirmed_flush_lsn > %s::pg_lsn FROM pg_replication_slots WHERE database = current_database())",
                (start_lsn,)).fetchone()

        beats, confirmed_past = wait_until(beats_and_slot, timeout=20, interval=0.25,
                                           until=lambda got: got[0] >= 3 and bool(got[1]),
                                           message="3 heartbeats written, and the slot of an idle database past them")
    assert beats >= 3, "no heartbeats written"
    assert confirmed_past, "the slot of an idle database did not advance past its heartbeats"
    time.sleep(max(0.0, 4.5 - (time.monotonic() - started)))  # the relay runs longer than the age may be
    age = scrape(port, "outbox_relay_heartbeat_age_seconds")['outbox_relay_heartbeat_age_seconds{source_id="s1"}']
    assert 0 <= age < 2.5, f"heartbeat age {age}: heartbeats do not come back through the stream"
    assert not any(t for t in (f"{topic_prefix}.outbox.heartbeat", f"{topic_prefix}.outbox")
                   if kcat_read(kafka_bootstrap, t)), "a heartbeat was published to Kafka"
    assert relay.terminate() == 0
