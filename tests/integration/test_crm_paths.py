"""Where the CRM paths meet (issue #20): agent edits beside store changes, re-drives of parked
records, the write-back's locks while it parks, unusable webhooks, an outage longer than the
attempt limit, a dead-letter topic that cannot be written. Real PostgreSQL, Kafka and the
reference CRM as a process; the sinks get their records as the Kafka loop would hand them."""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timezone
from typing import Any

import psycopg
import pytest
from aiokafka import TopicPartition

from outbox import contract
from outbox.config import CrmWebhookSettings, KafkaSettings
from outbox.consumers import crm, crm_writeback
from outbox.consumers.crm_inbound import WEBHOOKS_PARKED, WebhookReceiver
from outbox.consumers.crm_logic import DEFAULT_MAPPINGS, H_DELIVERY, Mapping
from outbox.consumers.dlq import H_ERROR, H_REDRIVE, Batch, DeadLetters
from outbox.dev.pos import run_workload
from tests.support.checksums import crm_differences, crm_expected_records
from tests.support.crm import Crm
from tests.support.kafka import kcat_read
from tests.support.metrics import scrape
from tests.support.processes import OutboxProcess, RelayProcess
from tests.support.records import Rec
from tests.support.wait import wait_until

pytestmark = pytest.mark.integration

SOURCE = "store1"
AGENT = {"X-CRM-Actor": "agent"}
T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)



@pytest.fixture
def crm_server(new_database: Callable[..., str]) -> Iterator[Crm]:
    server = Crm(new_database("crm")).start()
    yield server
    server.proc.close()


def notification_records(crm_server: Crm, topic: str, after_seq: int = 0) -> list[Rec]:
    """The CRM's queued notifications (what the webhook receiver would put on Kafka), as records."""
    rows = crm_server.query("SELECT seq, body::text FROM crm.webhooks WHERE seq > %s ORDER BY seq", after_seq)
    out = []
    for n, (_seq, body) in enumerate(rows):
        change = json.loads(body)
        out.append(Rec(topic, 0, n, change["external_id"].encode(), body.encode(), [(H_DELIVERY, change["id"].encode())]))
    return out


def run_writeback(store: str, kafka: KafkaSettings, group: str, records: Sequence[Rec],
                  park: Callable[[Any], Any] | None = None) -> dict[str, int]:
    async def main() -> dict[str, int]:
        sink = crm_writeback.Writeback(store, SOURCE, group, DEFAULT_MAPPINGS)
        letters = DeadLetters(kafka, group)
        if park is not None:
            real = letters.park

            async def wrapped(batch: Any) -> None:
                await asyncio.to_thread(park, batch)
                await real(batch)
            letters.park = wrapped  # type: ignore[method-assign]
        try:
            await sink.start()
            offsets = {(records[0].topic, 0): max(r.offset for r in records) + 1}
            return dict(await sink.apply(Batch(list(records), offsets, letters)))
        finally:
            await sink.close()
            await letters.close()
    return asyncio.run(main())


def customer(store: str, cid: int) -> tuple[Any, ...]:
    with psycopg.connect(store) as conn:
        row = conn.execute("SELECT name, phone, balance::text FROM pos.customers WHERE id = %s", (cid,)).fetchone()
    assert row is not None
    return tuple(row)


# --------------------------------------------------------------------------- item 1
def test_an_agent_edit_writes_back_only_what_it_changed_and_the_store_wins_a_field_changed_on_both_sides(
        crm_server: Crm, store: str, kafka_bootstrap: str, topic_prefix: str) -> None:
    with psycopg.connect(store, autocommit=True) as conn:
        cid = conn.execute("INSERT INTO pos.customers (name, phone, balance) VALUES ('Ana', '+1', 10) RETURNING id"
                           ).fetchone()[0]  # type: ignore[index]
    external = f"{SOURCE}:{cid}"
    # the sink delivered the customer as it was
    crm_server.call("PUT", f"/v1/contacts/{external}", {"fields": {"name": "Ana", "phone": "+1", "balance": 10.0}},
                    {"Idempotency-Key": str(uuid.uuid4())})
    with psycopg.connect(store, autocommit=True) as conn:  # two store changes the sink has not delivered yet
        conn.execute("UPDATE pos.customers SET balance = 99.50, phone = '+3' WHERE id = %s", (cid,))
    # an agent changes the phone (too) and the name
    crm_server.call("PATCH", f"/v1/contacts/{external}", {"fields": {"phone": "+2", "name": "Ana B"}}, AGENT)
    [note] = notification_records(crm_server, f"{topic_prefix}-crm.changes")
    body = json.loads(note.value or b"")
    assert set(body["fields"]) == {"phone", "name"} and body["previous"] == {"phone": "+1", "name": "Ana"}, body
    with psycopg.connect(store) as conn:
        events_before = conn.execute("SELECT count(*) FROM outbox.events").fetchone()[0]  # type: ignore[index]
    counts = run_writeback(store, KafkaSettings(bootstrap=kafka_bootstrap), f"{topic_prefix}-wb", [note])
    # balance: the CRM's stale copy is not written; phone: changed on both sides, the store wins; name: the agent's
    assert customer(store, cid) == ("Ana B", "+3", "99.50")
    assert counts["changed"] == 1 and counts["conflicts"] == 1, counts
    with psycopg.connect(store) as conn:
        new = conn.execute("SELECT origin, payload->>'phone' FROM outbox.events ORDER BY created_at, id OFFSET %s",
                           (events_before,)).fetchall()
    # one event, origin unset: the sink sends it, so the CRM gets the store's phone back (both agree)
    assert new == [(None, "+3")], new


# --------------------------------------------------------------------------- items 2 and 7: the write-back
def test_the_writeback_parks_outside_its_transaction_and_a_redrive_of_the_parked_change_applies(
        store: str, kafka_bootstrap: str, topic_prefix: str) -> None:
    topic = f"{topic_prefix}-crm.changes"
    kafka = KafkaSettings(bootstrap=kafka_bootstrap)
    with psycopg.connect(store, autocommit=True) as conn:
        conn.execute("INSERT INTO pos.customers (id, name) VALUES (1, 'One')")
    delivery = str(uuid.uuid4())
    body = {"id": delivery, "kind": "contacts", "external_id": f"{SOURCE}:2", "fields": {"phone": "+49"}}
    missing = Rec(topic, 0, 0, b"store1:2", json.dumps(body).encode(), [(H_DELIVERY, delivery.encode())])
    ok_id = str(uuid.uuid4())
    ok = Rec(topic, 0, 1, b"store1:1", json.dumps({"id": ok_id, "kind": "contacts", "external_id": f"{SOURCE}:1",
                                                   "fields": {"phone": "+1"}}).encode(), [(H_DELIVERY, ok_id.encode())])
    seen_while_parking: list[Any] = []

    def check(_letters: Any) -> None:  # runs while the write-back waits for Kafka's acknowledgement
        with psycopg.connect(store) as conn:
            seen_while_parking.append(conn.execute(
                "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid) "
                "WHERE a.application_name = 'outbox-crm-writeback' AND l.relation = 'pos.customers'::regclass"
            ).fetchone()[0])  # type: ignore[index]

    run_writeback(store, kafka, f"{topic_prefix}-wb", [missing, ok], park=check)
    assert seen_while_parking == [0], "the write-back held locks on pos.customers while it parked"
    assert customer(store, 1)[1] == "+1"
    [parked] = kcat_read(kafka_bootstrap, f"{topic}.dlq")
    assert "no row id = 2" in parked["headers"][H_ERROR]
    # the cause is fixed (the row exists now), the parked change is re-driven: it applies
    with psycopg.connect(store, autocommit=True) as conn:
        conn.execute("INSERT INTO pos.customers (id, name) VALUES (2, 'Two')")
    redriven = Rec(topic, 0, 2, missing.key, missing.value, [*missing.headers, (H_REDRIVE, f"{topic_prefix}-wb".encode())])
    run_writeback(store, kafka, f"{topic_prefix}-wb", [redriven])
    assert customer(store, 2)[1] == "+49"


def test_the_writeback_finds_the_row_by_its_primary_key_index(store: str) -> None:
    mapping = DEFAULT_MAPPINGS["customer"]
    with psycopg.connect(store) as conn:
        conn.execute("SET enable_seqscan = off")
        for statement, params in ((crm_writeback.lock_statement(mapping, ["phone"]), ("{}", "{}", "1")),
                                  (crm_writeback.update_statement(mapping, ["phone"]), ("{}", "1"))):
            plan = "\n".join(r[0] for r in conn.execute(psycopg.sql.SQL("EXPLAIN ") + statement, params))
            assert "Index Scan using customers_pkey" in plan or "Index Cond" in plan, plan


# --------------------------------------------------------------------------- item 2: the CRM sink
def crm_sink(crm_server: Crm, ledger: str, kafka: KafkaSettings, group: str,
             mappings: dict[str, Mapping] | None = None, **settings: Any) -> crm.CrmSink:
    s = crm.CrmSinkSettings(crm_url=crm_server.url, dsn=ledger, kafka=kafka, group=group, rate=500, burst=50,
                            retry_base=0.05, retry_max=0.5, **settings)
    sink = crm.CrmSink.create(s)
    if mappings is not None:
        sink.mappings = mappings
    return sink


async def submit_and_wait(sink: crm.CrmSink, records: Sequence[Rec], dead_letters: DeadLetters) -> None:
    want = {TopicPartition(r.topic, r.partition): r.offset + 1 for r in records}
    await sink.submit(list(records), dead_letters)
    done: dict[TopicPartition, int] = {}
    deadline = time.monotonic() + 60
    while not all(done.get(tp, -1) >= o for tp, o in want.items()):
        sink.check()
        assert time.monotonic() < deadline, f"the CRM sink did not finish: {done} of {want}"
        await asyncio.sleep(0.05)
        done.update(sink.completed()[0])


def event(topic: str, key: str, name: str, lsn: int, offset: int, event_id: str | None = None) -> Rec:
    prefix, _, aggregate = topic.partition(".")
    row = contract.OutboxRow(id=event_id or str(uuid.uuid4()), aggregatetype=aggregate, aggregateid=key,
                             type=f"{aggregate}.updated", payload=json.dumps({"id": key, "name": name}))
    r = contract.build_record(row, source_id="s1", prefix=prefix, position=contract.Position(lsn, 0),
                              commit_time=T0, xid=lsn)
    return Rec(r.topic, 0, offset, r.key, r.value, list(r.headers))


def test_a_redriven_crm_dead_letter_applies_but_never_over_a_newer_image(
        crm_server: Crm, new_database: Callable[..., str], kafka_bootstrap: str, topic_prefix: str) -> None:
    kafka = KafkaSettings(bootstrap=kafka_bootstrap)
    topic, group, ledger = f"{topic_prefix}.customer", f"{topic_prefix}-crm", new_database("ledger")
    broken = {"customer": Mapping("customer", "contactz", {"name": "name"})}  # the CRM answers 404: parked
    first = event(topic, "1", "first", 0x1000, 0)
    other = event(topic, "2", "old", 0x1000, 1)

    async def main() -> None:
        async with DeadLetters(kafka, group) as letters:
            sink = crm_sink(crm_server, ledger, kafka, group, broken)
            await sink.start()
            try:
                await submit_and_wait(sink, [first, other], letters)
            finally:
                await sink.close()
            sink = crm_sink(crm_server, ledger, kafka, group)  # the mapping is fixed
            await sink.start()
            try:
                newer = event(topic, "2", "new", 0x2000, 2)
                await submit_and_wait(sink, [newer], letters)
                redrive = [Rec(r.topic, 0, n, r.key, r.value, [*r.headers, (H_REDRIVE, group.encode())])
                           for n, r in ((3, first), (4, other))]
                await submit_and_wait(sink, redrive, letters)
            finally:
                await sink.close()

    asyncio.run(main())
    assert len(kcat_read(kafka_bootstrap, f"{topic}.dlq")) == 2
    names = dict(crm_server.query("SELECT external_id, fields->>'name' FROM crm.records"))
    # the re-driven copy of a parked event applies; an old image never goes over a newer one
    assert names == {"s1:1": "first", "s1:2": "new"}, names


def test_an_outage_longer_than_the_attempt_limit_parks_nothing(
        crm_server: Crm, store: str, new_database: Callable[..., str], topic_prefix: str, kafka_bootstrap: str,
        processes: list[OutboxProcess]) -> None:
    crm_server.faults(error_rate=1.0, after_write_share=0.0)  # the CRM is down
    relay = RelayProcess(store, SOURCE, topic_prefix, kafka_bootstrap).start()
    sink = OutboxProcess("consume", "crm", "--crm-url", crm_server.url, "--dsn", new_database("ledger"),
                         "--kafka-bootstrap", kafka_bootstrap, "--topic-prefix", topic_prefix, "--group",
                         f"{topic_prefix}-crm", "--retry-base", "0.05", "--retry-max", "0.2", "--max-attempts", "2",
                         "--metrics-port", "0", name="crm-sink").start()
    processes.extend([relay, sink])
    port = int(sink.wait_for_output("/metrics").rsplit(":", 1)[1].split("/")[0])
    run_workload(store, transactions=20, seed=3)
    wait_until(lambda: sum(scrape(port, "outbox_crm_retries_total").values()), timeout=60,
               until=lambda retries: retries >= 30, message=lambda: f"30 retries while the CRM is down: {sink.output()}")
    crm_server.faults(error_rate=0.0)
    wait_until(lambda: crm_differences(crm_expected_records(store, SOURCE), crm_server.dsn), timeout=120, interval=0.5,
               until=lambda found: not found, message=lambda: f"the CRM to catch up: {sink.output()}")
    assert sum(scrape(port, "outbox_crm_dead_lettered_total").values()) == 0
    assert kcat_read(kafka_bootstrap, f"{topic_prefix}.customer.dlq") == []


# --------------------------------------------------------------------------- item 8
def test_an_unusable_webhook_is_parked_with_its_reason_and_answered_2xx(kafka_bootstrap: str, topic_prefix: str) -> None:
    from aiohttp import ClientSession

    topic = f"{topic_prefix}-crm.changes"
    before = WEBHOOKS_PARKED.labels("invalid")._value.get()

    async def main() -> list[int]:
        receiver = WebhookReceiver(CrmWebhookSettings(kafka=KafkaSettings(bootstrap=kafka_bootstrap), port=0, topic=topic))
        await receiver.start()
        try:
            async with ClientSession() as http:
                statuses = []
                for body in (b'{"id": "d1", "kind": "contacts", "external_id": "lead-42", "fields": {}}', b"{not json"):
                    async with http.post(f"http://127.0.0.1:{receiver.port}/webhook", data=body,
                                         headers={"X-CRM-Delivery": "7"}) as response:
                        statuses.append(response.status)
                return statuses
        finally:
            await receiver.stop()

    statuses = asyncio.run(main())
    assert all(200 <= s < 300 for s in statuses), statuses
    parked = kcat_read(kafka_bootstrap, f"{topic}.dlq")
    # keyless letters: the relay's partitioner spreads them, so their order across partitions is not defined
    assert len(parked) == 2 and any("lead-42" in p["headers"][H_ERROR] for p in parked), parked
    assert WEBHOOKS_PARKED.labels("invalid")._value.get() - before == 2


# --------------------------------------------------------------------------- item 11
def test_a_dead_letter_topic_that_cannot_be_written_holds_the_records_and_pauses(
        crm_server: Crm, new_database: Callable[..., str], topic_prefix: str) -> None:
    kafka = KafkaSettings(bootstrap="127.0.0.1:1")  # no Kafka there: parking cannot succeed
    topic, group = f"{topic_prefix}.customer", f"{topic_prefix}-crm"
    poison = [Rec(topic, 0, n, b"s1:x", b"{}", [("ce_type", b"customer.updated")]) for n in range(5)]

    async def main() -> tuple[int, float]:
        sink = crm_sink(crm_server, new_database("ledger"), kafka, group, max_buffered=5)
        letters = DeadLetters(kafka, group)
        await sink.start()
        try:
            await sink.submit(poison, letters)
            deadline = time.monotonic() + 30
            while crm.CRM_PARK_FAILURES.labels(group, "dead_letters")._value.get() < 2:
                assert time.monotonic() < deadline, "no failed parking counted"
                await asyncio.sleep(0.1)
            return sink.buffered(TopicPartition(topic, 0)), crm.CRM_PARK_FAILURES.labels(group, "dead_letters")._value.get()
        finally:
            sink._failure = crm.OutboxError("test over")  # close without the last flush
            await sink.close()
            await letters.close()

    buffered, failures = asyncio.run(main())
    assert buffered == 5  # held (and counted: the loop pauses the partition at --max-buffered)
    assert failures >= 2
