"""CRM sync on the real servers: store -> relay -> Kafka -> CRM sink -> the reference CRM (a real
process), and back: CRM agent edit -> webhook -> Kafka -> writeback -> store, one hop only."""
from __future__ import annotations

import asyncio
import contextlib
import re
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest

from outbox.dev.pos import run_workload
from tests.support.checksums import crm_differences, crm_expected_records
from tests.support.crm import Crm
from tests.support.db import admin_conn
from tests.support.kafka import delete_topics, kcat_read
from tests.support.metrics import scrape
from tests.support.processes import OutboxProcess, RelayProcess, outbox
from tests.support.wait import WaitTimeout, wait_until

pytestmark = pytest.mark.integration

SOURCE = "store1"
FAULTS_30 = {"error_rate": 0.15, "rate_limit_rate": 0.15, "retry_after": 1, "retry_after_form": "mixed",
             "after_write_share": 0.5}


@pytest.fixture
def crm(new_database: Callable[..., str]) -> Iterator[Crm]:
    server = Crm(new_database("crm")).start()
    yield server
    server.proc.close()


@pytest.fixture
def writeback_role(store: str) -> Iterator[str]:
    """A least-privilege role for the write-back, as a DBA would set it up; dropped afterwards (cluster-wide)."""
    name = f"t_wb_{uuid.uuid4().hex[:8]}"
    outbox("grant", "--dsn", store, "--writeback-role", name)
    with psycopg.connect(store, autocommit=True) as conn:  # the mapped table: the DBA's own grant
        conn.execute(f"GRANT USAGE ON SCHEMA pos TO {name}; GRANT SELECT, UPDATE ON pos.customers TO {name}")
    yield name
    with admin_conn() as conn:
        databases = [r[0] for r in conn.execute("SELECT datname FROM pg_database WHERE datallowconn")]
    for db in databases:
        with psycopg.connect(dbname=db, autocommit=True) as conn:
            conn.execute(f'DROP OWNED BY "{name}"')
    with admin_conn() as conn:
        conn.execute(f'DROP ROLE "{name}"')


def sink_process(crm: Crm, ledger_dsn: str, prefix: str, bootstrap: str, *extra: str) -> OutboxProcess:
    return OutboxProcess("consume", "crm", "--crm-url", crm.url, "--dsn", ledger_dsn, "--kafka-bootstrap", bootstrap,
                         "--topic-prefix", prefix, "--group", f"{prefix}-crm", "--rate", "500", "--burst", "50",
                         "--retry-base", "0.05", "--retry-max", "1", "--max-attempts", "40", *extra, name="crm-sink")


# --------------------------------------------------------------------------- checks
def crm_records(crm: Crm) -> dict[tuple[str, str], tuple[dict[str, Any], bool]]:
    return {(k, e): (f, a) for k, e, f, a in crm.query("SELECT kind, external_id, fields, active FROM crm.records")}


def differences(store_dsn: str, crm: Crm) -> list[str]:
    return crm_differences(crm_expected_records(store_dsn, SOURCE), crm.dsn)


def wait_converged(store_dsn: str, crm: Crm, sink: OutboxProcess, timeout: float = 180) -> None:
    def problems() -> list[str]:
        found = differences(store_dsn, crm)
        if found:
            sink.assert_running()
        return found

    wait_until(problems, timeout=timeout, interval=0.5, until=lambda found: not found,
               message=lambda: f"the CRM to hold what the store says (the last problems come first); sink: {sink.output()}")


def assert_no_duplicates_and_key_order(crm: Crm) -> int:
    """Every event written at most once, and per record in source order; returns the sync writes."""
    dupes = crm.query("SELECT idempotency_key, count(*) FROM crm.writes WHERE actor = 'sync' "
                      "GROUP BY 1 HAVING count(*) > 1")
    assert dupes == [], f"events written twice: {dupes[:5]}"
    rows = crm.query("SELECT kind, external_id, meta->>'position' FROM crm.writes WHERE actor = 'sync' ORDER BY seq")
    last: dict[tuple[str, str], tuple[int, int]] = {}
    for kind, ext, position in rows:
        lsn, seq = position.split("#")
        hi, lo = lsn.split("/")
        pos = ((int(hi, 16) << 32) | int(lo, 16), int(seq))
        assert pos > last.get((kind, ext), (-1, -1)), f"{kind} {ext}: {pos} after {last[(kind, ext)]}"
        last[(kind, ext)] = pos
    return len(rows)


def sink_metric(sink_port: int, name: str) -> dict[str, float]:
    return scrape(sink_port, name)


def sink_offset(ledger_dsn: str, group: str, topic: str, partition: int) -> int:
    """The next offset the CRM sink saved in its ledger database for one partition (0 before any)."""
    with psycopg.connect(ledger_dsn, autocommit=True) as conn:
        row = conn.execute("SELECT next_offset FROM crm_sink.consumer_offsets WHERE group_id = %s AND topic = %s"
                           " AND partition = %s", (group, topic, partition)).fetchone()
    return int(row[0]) if row else 0


# --------------------------------------------------------------------------- tests
def test_thirty_percent_failures_end_equal_without_duplicates_in_key_order(
        crm: Crm, store: str, new_database: Callable[..., str], topic_prefix: str, kafka_bootstrap: str,
        processes: list[OutboxProcess]) -> None:
    crm.faults(**FAULTS_30)
    relay = RelayProcess(store, SOURCE, topic_prefix, kafka_bootstrap).start()
    processes.append(relay)
    sink = sink_process(crm, new_database("ledger"), topic_prefix, kafka_bootstrap, "--metrics-port", "0").start()
    processes.append(sink)
    port = int(sink.wait_for_output("/metrics").rsplit(":", 1)[1].split("/")[0])
    result = run_workload(store, transactions=300, seed=11)
    assert result.committed > 250
    wait_converged(store, crm, sink)
    writes = assert_no_duplicates_and_key_order(crm)
    stats = crm.call("GET", "/admin/stats")["calls"]
    assert stats.get("429", 0) > 0 and stats.get("500", 0) > 0, stats  # the faults really happened...
    retries = sum(sink_metric(port, "outbox_crm_retries_total").values())
    assert retries > 0  # ...and were retried
    assert sum(sink_metric(port, "outbox_crm_dead_lettered_total").values()) == 0
    assert kcat_read(kafka_bootstrap, f"{topic_prefix}.customer.dlq") == []
    assert writes >= len(crm_expected_records(store, SOURCE))
    assert sink.terminate() == 0


def test_a_poison_record_is_dead_lettered_with_its_reason_while_others_flow(
        crm: Crm, store: str, new_database: Callable[..., str], topic_prefix: str, kafka_bootstrap: str,
        processes: list[OutboxProcess]) -> None:
    relay = RelayProcess(store, SOURCE, topic_prefix, kafka_bootstrap).start()
    sink = sink_process(crm, new_database("ledger"), topic_prefix, kafka_bootstrap).start()
    processes.extend([relay, sink])
    with psycopg.connect(store, autocommit=True) as conn:
        conn.execute("INSERT INTO pos.customers (name, email) VALUES ('Ana', 'ana@example.com')")
        poison = conn.execute("INSERT INTO pos.customers (name, email) VALUES ('Bad', 'not-an-email') RETURNING id").fetchone()[0]  # type: ignore[index]
        for n in range(20):
            conn.execute("INSERT INTO pos.customers (name, email) VALUES (%s, %s)", (f"C{n}", f"c{n}@example.com"))
    letters = wait_until(lambda: kcat_read(kafka_bootstrap, f"{topic_prefix}.customer.dlq"), timeout=60, interval=0.5,
                         until=lambda got: bool(got) and len(crm_records(crm)) == 21,
                         message=lambda: f"a dead letter, and the 21 other records in the CRM: {sink.output()}")
    assert len(letters) == 1, sink.output()
    letter = letters[0]
    assert letter["key"] == f"{SOURCE}:{poison}"
    assert "invalid email" in letter["headers"]["dlq_error"] and "400" in letter["headers"]["dlq_error"]
    assert letter["headers"]["dlq_topic"] == f"{topic_prefix}.customer"
    assert int(letter["headers"]["dlq_attempts"]) >= 1
    have = crm_records(crm)
    assert ("contacts", f"{SOURCE}:{poison}") not in have
    assert len(have) == 21  # every other record went through
    # the stream goes on after the poison record
    with psycopg.connect(store, autocommit=True) as conn:
        late = conn.execute("INSERT INTO pos.customers (name) VALUES ('Late') RETURNING id").fetchone()[0]  # type: ignore[index]
    wait_until(lambda: ("contacts", f"{SOURCE}:{late}") in crm_records(crm), timeout=30,
               message=lambda: f"the late record in the CRM: {sink.output()}")


def test_a_crm_edit_reaches_the_store_once_and_stops_after_one_hop(
        crm: Crm, store: str, new_database: Callable[..., str], topic_prefix: str, kafka_bootstrap: str,
        processes: list[OutboxProcess], writeback_role: str) -> None:
    topic = f"{topic_prefix}-crm.changes"  # outside the event topics' pattern <prefix>.*
    relay = RelayProcess(store, SOURCE, topic_prefix, kafka_bootstrap).start()
    ledger = new_database("ledger")
    sink = sink_process(crm, ledger, topic_prefix, kafka_bootstrap).start()
    receiver = OutboxProcess("consume", "crm-webhook", "--kafka-bootstrap", kafka_bootstrap, "--port", "0",
                             "--topic", topic, name="crm-webhook").start()
    # the write-back runs as its least-privilege role (outbox grant --writeback-role, UPDATE on the mapped table)
    writeback = OutboxProcess("consume", "crm-writeback", "--dsn", f"{store} user={writeback_role}", "--source-id",
                              SOURCE, "--kafka-bootstrap",
                              kafka_bootstrap, "--topic", topic, "--group", f"{topic_prefix}-wb", name="crm-writeback").start()
    processes.extend([relay, sink, receiver, writeback])
    port = re.search(r"127\.0\.0\.1:(\d+)/webhook", receiver.wait_for_output("/webhook")).group(1)  # type: ignore[union-attr]
    crm.call("PUT", "/admin/webhook", {"url": f"http://127.0.0.1:{port}/webhook"})
    try:
        with psycopg.connect(store, autocommit=True) as conn:
            cid = conn.execute("INSERT INTO pos.customers (name, phone) VALUES ('Zoë', '+49 1') RETURNING id").fetchone()[0]  # type: ignore[index]
        external = f"{SOURCE}:{cid}"
        wait_until(lambda: ("contacts", external) in crm_records(crm), timeout=60,
                   message=lambda: f"the new customer in the CRM: {sink.output()}")
        sync_writes_before = crm.query("SELECT count(*) FROM crm.writes WHERE actor = 'sync'")[0][0]
        # a sales agent empties the name (the store refuses it: parked), then edits the phone
        crm.call("PATCH", f"/v1/contacts/{external}", {"fields": {"name": None}}, {"X-CRM-Actor": "agent"})
        crm.call("PATCH", f"/v1/contacts/{external}", {"fields": {"name": "Zoë", "phone": "+49 30 555"}},
                 {"X-CRM-Actor": "agent"})
        with psycopg.connect(store, autocommit=True) as conn:
            wait_until(lambda: conn.execute("SELECT phone FROM pos.customers WHERE id = %s", (cid,)).fetchone()[0],  # type: ignore[index]
                       timeout=60, until=lambda phone: phone == "+49 30 555",
                       message=lambda: f"the edit in the store: {writeback.output()}{receiver.output()}")
            # The edit's own event travels back: store -> relay -> Kafka -> sink. Once the sink saved an
            # offset past it, it has decided on it: an echo, if it were sent, is in the CRM by then.
            [echo] = wait_until(lambda: [r for r in kcat_read(kafka_bootstrap, f"{topic_prefix}.customer")
                                         if r["key"] == external and r["headers"].get("ce_origin") == "crm"],
                                timeout=60, message=lambda: f"the edit's event in Kafka: {relay.output()}")
            wait_until(lambda: sink_offset(ledger, f"{topic_prefix}-crm", echo["topic"], echo["partition"]), timeout=60,
                       until=lambda next_offset: next_offset > echo["offset"],
                       message=lambda: f"the CRM sink to read past offset {echo['offset']}: {sink.output()}")
            events = conn.execute("SELECT type, origin FROM outbox.events WHERE aggregateid = %s ORDER BY created_at",
                                  (str(cid),)).fetchall()
        assert events == [("customer.created", None), ("customer.updated", "crm")]  # the edit reached the store once
        kafka = kcat_read(kafka_bootstrap, f"{topic_prefix}.customer")
        assert [r["headers"].get("ce_origin") for r in kafka if r["key"] == external] == [None, "crm"]
        # the echo was not sent back: no sync write since the edit, one notification in all
        assert crm.query("SELECT count(*) FROM crm.writes WHERE actor = 'sync'")[0][0] == sync_writes_before
        assert crm.query("SELECT count(*), count(delivered_at) FROM crm.webhooks") == [(2, 2)]
        assert crm.query("SELECT fields->>'phone', version FROM crm.records WHERE external_id = %s", external) == \
            [("+49 30 555", 3)]
        assert len(kcat_read(kafka_bootstrap, topic)) == 2
        [parked] = kcat_read(kafka_bootstrap, f"{topic}.dlq")
        assert "NotNullViolation" in parked["headers"]["dlq_error"], parked
    finally:
        crm.call("PUT", "/admin/webhook", {"url": None})
        asyncio.run(delete_topics(kafka_bootstrap, f"{topic_prefix}-crm"))


def test_writeback_without_its_schema_says_to_run_install(store: str, kafka_bootstrap: str) -> None:
    with psycopg.connect(store, autocommit=True) as conn:  # an outbox installed before revision 0004
        conn.execute("DROP TABLE outbox_crm.consumer_offsets, outbox_crm.applied; DROP SCHEMA outbox_crm")
    proc = outbox("consume", "crm-writeback", "--dsn", store, "--source-id", SOURCE, "--kafka-bootstrap",
                  kafka_bootstrap, "--topic", "crm.changes", check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("Error: schema outbox_crm is missing in ") and "run outbox install" in line, line
    with psycopg.connect(store) as conn:  # it created nothing
        assert conn.execute("SELECT to_regnamespace('outbox_crm')").fetchone() == (None,)


def test_sigkill_mid_batch_and_restart_creates_no_duplicates(
        crm: Crm, store: str, new_database: Callable[..., str], topic_prefix: str, kafka_bootstrap: str,
        processes: list[OutboxProcess]) -> None:
    crm.faults(latency_ms=150, error_rate=0.1, after_write_share=1.0)  # slow calls: always some in flight
    ledger = new_database("ledger")
    relay = RelayProcess(store, SOURCE, topic_prefix, kafka_bootstrap).start()
    processes.append(relay)
    run_workload(store, transactions=300, seed=5)
    for round_ in range(2):
        sink = sink_process(crm, ledger, topic_prefix, kafka_bootstrap, "--batch-size", "20").start()
        processes.append(sink)
        target = 60 * (round_ + 1)
        wait_until(lambda: crm.query("SELECT count(*) FROM crm.writes")[0][0], timeout=60, interval=0.05,
                   until=lambda writes, target=target: writes >= target,
                   message=lambda target=target, sink=sink: f"{target} CRM writes: {sink.output()}")
        sink.kill()  # SIGKILL: calls in flight, answers lost, ledger behind the CRM
        with psycopg.connect(ledger, autocommit=True) as conn:
            recorded = conn.execute("SELECT count(*) FROM crm_sink.ledger").fetchone()[0]  # type: ignore[index]
        assert recorded < crm.query("SELECT count(*) FROM crm.writes")[0][0]  # the restart has work the CRM already did
    crm.faults(latency_ms=0, error_rate=0.1, after_write_share=1.0)
    sink = sink_process(crm, ledger, topic_prefix, kafka_bootstrap, "--batch-size", "20").start()
    processes.append(sink)
    wait_converged(store, crm, sink)
    assert_no_duplicates_and_key_order(crm)
    # converged is the CRM's state; a retry of a call the CRM answered 500 after writing may still be
    # in flight: let the sink record every write before it stops (up to a minute; the check comes after)
    def ledger_complete() -> bool:
        with psycopg.connect(ledger, autocommit=True) as conn:
            applied = conn.execute("SELECT count(*) FROM crm_sink.ledger WHERE outcome = 'applied'").fetchone()[0]  # type: ignore[index]
        return bool(applied >= crm.query("SELECT count(*) FROM crm.writes WHERE actor = 'sync'")[0][0])

    with contextlib.suppress(WaitTimeout):
        wait_until(ledger_complete, timeout=60, message="the ledger to record every CRM write")
    assert sink.terminate() == 0  # its last ledger flush (up to 0.2 s after the last call) is done on stop
    with psycopg.connect(ledger, autocommit=True) as conn:
        applied = conn.execute("SELECT count(*) FROM crm_sink.ledger WHERE outcome = 'applied'").fetchone()[0]  # type: ignore[index]
    writes = crm.query("SELECT count(*) FROM crm.writes WHERE actor = 'sync'")[0][0]
    assert applied == writes  # every write the CRM made is in the ledger once, and nothing else


def test_a_hanging_crm_times_out_and_is_retried_until_it_answers(
        crm: Crm, store: str, new_database: Callable[..., str], topic_prefix: str, kafka_bootstrap: str,
        processes: list[OutboxProcess]) -> None:
    crm.faults(hang=True)
    relay = RelayProcess(store, SOURCE, topic_prefix, kafka_bootstrap).start()
    sink = sink_process(crm, new_database("ledger"), topic_prefix, kafka_bootstrap, "--timeout", "0.5",
                        "--metrics-port", "0").start()
    processes.extend([relay, sink])
    port = int(sink.wait_for_output("/metrics").rsplit(":", 1)[1].split("/")[0])
    run_workload(store, transactions=30, seed=3)
    wait_until(lambda: sink_metric(port, "outbox_crm_retries_total").get(
                   f'outbox_crm_retries_total{{group="{topic_prefix}-crm",reason="timeout"}}', 0), timeout=30,
               until=lambda retries: retries >= 3, message=lambda: f"3 retries after timeouts: {sink.output()}")
    assert crm_records(crm) == {}
    crm.faults(hang=False)
    wait_converged(store, crm, sink, timeout=60)
    assert_no_duplicates_and_key_order(crm)


def test_a_second_sink_joining_and_the_first_leaving_keeps_order_and_writes_once(
        crm: Crm, store: str, new_database: Callable[..., str], topic_prefix: str, kafka_bootstrap: str,
        processes: list[OutboxProcess]) -> None:
    crm.faults(latency_ms=100, error_rate=0.2, rate_limit_rate=0.05, retry_after=0)  # slow and failing: calls in flight
    ledger = new_database("ledger")
    relay = RelayProcess(store, SOURCE, topic_prefix, kafka_bootstrap).start()
    slow = ("--batch-size", "10", "--rate", "3", "--burst", "1")  # ~30 records/s each: work left for both
    first = sink_process(crm, ledger, topic_prefix, kafka_bootstrap, *slow).start()
    processes.extend([relay, first])
    run_workload(store, transactions=300, seed=21)

    def wait_writes(n: int) -> None:
        wait_until(lambda: crm.query("SELECT count(*) FROM crm.writes")[0][0], timeout=60, interval=0.05,
                   until=lambda writes: writes >= n, message=lambda: f"{n} CRM writes: " + first.output()
                   + "\n---- second\n" + (second.output() if second else ""))

    second = None

    wait_writes(60)
    second = sink_process(crm, ledger, topic_prefix, kafka_bootstrap, *slow).start()
    processes.append(second)
    second.wait_for_output("assigned", timeout=60)  # the group rebalanced: the first released partitions
    wait_writes(crm.query("SELECT count(*) FROM crm.writes")[0][0] + 60)
    assert differences(store, crm)  # still work to do when the first leaves
    assert first.terminate() == 0  # leaves the group: the second takes every partition
    wait_converged(store, crm, second)
    assert_no_duplicates_and_key_order(crm)
