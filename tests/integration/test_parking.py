"""Parking (issue #19 items 6, 12, 14): a row whose aggregate type cannot name a topic is parked like
an oversized one and the relay goes on; the store refuses new ones (CHECK, store revision 0007);
the parker's commits are durable whatever the database's synchronous_commit; a parked event is
re-published with its own id and position. Real servers."""
from __future__ import annotations

import socket
import uuid
from typing import Any

import psycopg
import pytest

from outbox import contract
from outbox.relay.replication import ParkedEvent, Parker
from tests.support.install import dbname, query
from tests.support.kafka import kcat_read, wait_for_ids
from tests.support.metrics import scrape
from tests.support.wait import wait_until

pytestmark = pytest.mark.integration

BAD = "bad topic!"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_row_whose_aggregate_type_names_no_topic_is_parked_and_the_relay_goes_on(
        store: str, topic_prefix: str, kafka_bootstrap: str, relays: Any) -> None:
    port = free_port()
    relay = relays(store, "s1", topic_prefix, kafka_bootstrap, "--status-interval", "1",
                   "--metrics-port", str(port)).start()
    with psycopg.connect(store) as conn:
        # an application's own INSERT past the CHECK (a store where it is not there, or dropped)
        conn.execute(f"ALTER TABLE outbox.events DROP CONSTRAINT IF EXISTS {contract.AGGREGATE_TYPE_CONSTRAINT}")
        conn.commit()
        bad_id = str(uuid.uuid4())
        conn.execute("INSERT INTO pos.customers (name) VALUES ('before')")
        conn.execute("INSERT INTO outbox.events (id, aggregatetype, aggregateid, type, payload)"
                     " VALUES (%s, %s, '7', 'thing.created', '{\"a\": 1}')", (bad_id, BAD))
        conn.commit()
        conn.execute("INSERT INTO pos.customers (name) VALUES ('after')")
        conn.commit()
        good = {r[0] for r in conn.execute("SELECT id::text FROM outbox.events WHERE aggregatetype = 'customer'")}
    assert len(good) == 2
    topic = f"{topic_prefix}.customer"
    marker_topic = f"{topic_prefix}.{contract.UNROUTABLE_AGGREGATE}.dlq"
    wait_for_ids(kafka_bootstrap, [topic], good, timeout=90)  # the events after it still arrive
    markers = wait_until(lambda: kcat_read(kafka_bootstrap, marker_topic), timeout=60, interval=1,
                         until=lambda got: bool(got), message=lambda: f"a marker on {marker_topic}: {relay.output()}")
    assert [m["headers"]["ce_id"] for m in markers] == [bad_id]
    h = markers[0]["headers"]
    assert h["ce_aggregatetype"] == BAD and "cannot name a Kafka topic" in h["dlq_error"]
    assert h["dlq_lsn"] == h["ce_commitlsn"] and h["ce_txseq"] == "1" and markers[0]["key"] == "s1:7"
    parked = query(store, "SELECT id::text, aggregatetype, payload::text, topic, error, commit_lsn::text, txseq"
                          " FROM outbox.parked")
    assert parked == [(bad_id, BAD, '{"a": 1}', f"{topic_prefix}.{contract.UNROUTABLE_AGGREGATE}", h["dlq_error"],
                       h["ce_commitlsn"], 1)]
    samples = wait_until(lambda: scrape(port, "outbox_relay_events_parked_total"), timeout=30, interval=0.5,
                         until=lambda got: any(v >= 1 for v in got.values()), message="the parked metric")
    assert samples == {f'outbox_relay_events_parked_total{{source_id="s1",topic="{topic_prefix}.'
                       f'{contract.UNROUTABLE_AGGREGATE}"}}': 1.0}
    assert relay.proc is not None and relay.proc.poll() is None, relay.output()
    assert "parked in outbox.parked" in relay.output()
    assert relay.terminate() == 0


def test_the_store_refuses_an_aggregate_type_that_names_no_topic(store: str) -> None:
    from tests.support.install import ok
    assert ok("install", "--dsn", store, "--sql").rstrip().endswith(
        f"ALTER TABLE outbox.events VALIDATE CONSTRAINT {contract.AGGREGATE_TYPE_CONSTRAINT};")
    assert query(store, "SELECT convalidated FROM pg_constraint WHERE conname = %s",
                 contract.AGGREGATE_TYPE_CONSTRAINT) == [(True,)]
    with psycopg.connect(store) as conn, pytest.raises(psycopg.errors.CheckViolation):
        conn.execute("INSERT INTO outbox.events (aggregatetype, aggregateid, type, payload)"
                     " VALUES (%s, '1', 't', '{}')", (BAD,))


def test_install_keeps_the_check_not_valid_when_existing_rows_break_it(store: str) -> None:
    from tests.support.install import ok
    with psycopg.connect(store) as conn:
        conn.execute(f"ALTER TABLE outbox.events DROP CONSTRAINT {contract.AGGREGATE_TYPE_CONSTRAINT}")
        conn.execute("INSERT INTO outbox.events (aggregatetype, aggregateid, type, payload) VALUES (%s, '1', 't', '{}')",
                     (BAD,))
        conn.execute("DELETE FROM outbox.alembic_version")
        conn.execute("INSERT INTO outbox.alembic_version VALUES ('0006')")
        conn.commit()
    out = ok("install", "--dsn", store)
    assert f"constraint {contract.AGGREGATE_TYPE_CONSTRAINT} on outbox.events stays NOT VALID" in out
    assert query(store, "SELECT convalidated FROM pg_constraint WHERE conname = %s",
                 contract.AGGREGATE_TYPE_CONSTRAINT) == [(False,)]
    with psycopg.connect(store) as conn, pytest.raises(psycopg.errors.CheckViolation):  # new rows are checked
        conn.execute("INSERT INTO outbox.events (aggregatetype, aggregateid, type, payload) VALUES ('a b', '1', 't', '{}')")
    query(store, "DELETE FROM outbox.events WHERE aggregatetype = %s", BAD)
    out = ok("install", "--dsn", store)
    assert "NOT VALID" not in out
    assert query(store, "SELECT convalidated FROM pg_constraint WHERE conname = %s",
                 contract.AGGREGATE_TYPE_CONSTRAINT) == [(True,)]


def test_the_parker_commits_synchronously_when_the_database_default_is_off(store: str) -> None:
    query(store, f'ALTER DATABASE "{dbname(store)}" SET synchronous_commit = off')
    assert query(store, "SHOW synchronous_commit") == [("off",)]  # what a new session of the database gets
    parker = Parker(store)
    try:
        event_id = str(uuid.uuid4())
        row = contract.OutboxRow(event_id, "customer", "1", "customer.created", "{}")
        parker.park(ParkedEvent(row, "outbox.customer", 0x16B3748, 1, 0, 10, "test"))
        assert parker._conn is not None
        assert parker._conn.execute("SHOW synchronous_commit").fetchone() == ("on",)
    finally:
        parker.close()
    assert query(store, "SELECT id::text FROM outbox.parked") == [(event_id,)]


def test_a_parked_event_is_republished_with_its_own_id_and_position(
        store: str, topic_prefix: str, kafka_bootstrap: str, relays: Any) -> None:
    from tests.support.install import ok
    relay = relays(store, "s1", topic_prefix, kafka_bootstrap, "--status-interval", "1").start()
    bad_id = str(uuid.uuid4())
    with psycopg.connect(store) as conn:
        conn.execute(f"ALTER TABLE outbox.events DROP CONSTRAINT {contract.AGGREGATE_TYPE_CONSTRAINT}")
        conn.execute("INSERT INTO pos.customers (name) VALUES ('first')")
        conn.execute("INSERT INTO outbox.events (id, aggregatetype, aggregateid, type, payload)"
                     " VALUES (%s, %s, '7', 'customer.updated', '{\"a\": 1}')", (bad_id, BAD))
        conn.commit()
    marker_topic = f"{topic_prefix}.{contract.UNROUTABLE_AGGREGATE}.dlq"
    marker = wait_until(lambda: kcat_read(kafka_bootstrap, marker_topic), timeout=60, interval=1, until=bool,
                        message=lambda: f"a marker on {marker_topic}: {relay.output()}")[0]["headers"]
    # the operator fixes the cause (here: the aggregate type) and re-publishes it
    query(store, "UPDATE outbox.parked SET aggregatetype = 'customer' WHERE id = %s", bad_id)
    out = ok("republish-parked", "--dsn", store, "--source-id", "s1", "--kafka-bootstrap", kafka_bootstrap,
             "--topic-prefix", topic_prefix, "--id", bad_id)
    assert "re-published 1 parked event" in out
    topic = f"{topic_prefix}.customer"
    copies = [r for r in wait_for_ids(kafka_bootstrap, [topic], {bad_id}, timeout=60) if r["headers"]["ce_id"] == bad_id]
    assert len(copies) == 1
    copy = copies[0]
    assert copy["key"] == "s1:7" and copy["payload"] == '{"a": 1}'
    for header in ("ce_id", "ce_commitlsn", "ce_txseq", "ce_xid", "ce_source", "ce_type", "ce_subject", "ce_history"):
        assert copy["headers"][header] == marker[header], header  # the marker carries the original's headers
    assert copy["headers"]["ce_aggregatetype"] == "customer"
    assert query(store, "SELECT count(*) FROM outbox.parked") == [(0,)]
    assert relay.terminate() == 0


def test_an_event_parked_as_too_large_is_republished_once_the_limit_is_raised(
        store: str, topic_prefix: str, kafka_bootstrap: str, relays: Any) -> None:
    from confluent_kafka.admin import AdminClient, AlterConfigOpType, ConfigEntry, ConfigResource, NewTopic

    from tests.support.install import ok
    topic = f"{topic_prefix}.customer"
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    admin.create_topics([NewTopic(topic, 1, 1, config={"max.message.bytes": "200000"})])[topic].result(30)
    relay = relays(store, "s1", topic_prefix, kafka_bootstrap, "--status-interval", "1").start()
    with psycopg.connect(store) as conn:
        for name in ("y" * 500_000, "after"):
            conn.execute("INSERT INTO pos.customers (name) VALUES (%s)", (name,))
            conn.commit()
        ids = [r[0] for r in conn.execute("SELECT id::text FROM outbox.events WHERE aggregatetype = 'customer'"
                                          " ORDER BY created_at")]
    big = ids[0]
    marker = wait_until(lambda: kcat_read(kafka_bootstrap, topic + ".dlq"), timeout=90, interval=1, until=bool,
                        message=lambda: f"a marker on {topic}.dlq: {relay.output()}")[0]["headers"]
    assert marker["ce_id"] == big
    wait_for_ids(kafka_bootstrap, [topic], {ids[1]}, timeout=60)
    resource = ConfigResource("topic", topic, incremental_configs=[
        ConfigEntry("max.message.bytes", "2000000", incremental_operation=AlterConfigOpType.SET)])
    admin.incremental_alter_configs([resource])[resource].result(30)
    with pytest.raises(AssertionError, match="give the relay's --topic-prefix"):  # another prefix: refused
        ok("republish-parked", "--dsn", store, "--source-id", "s1", "--kafka-bootstrap", kafka_bootstrap,
           "--topic-prefix", "elsewhere")
    out = ok("republish-parked", "--dsn", store, "--source-id", "s1", "--kafka-bootstrap", kafka_bootstrap,
             "--topic-prefix", topic_prefix)
    assert "re-published 1 parked event" in out
    copies = [r for r in wait_for_ids(kafka_bootstrap, [topic], {big}, timeout=60) if r["headers"]["ce_id"] == big]
    assert len(copies) == 1 and len(copies[0]["payload"]) > 500_000
    for header in ("ce_id", "ce_commitlsn", "ce_txseq", "ce_xid", "ce_source", "ce_type", "ce_subject", "ce_history"):
        assert copies[0]["headers"][header] == marker[header], header
    assert query(store, "SELECT count(*) FROM outbox.parked") == [(0,)]
    assert relay.terminate() == 0
