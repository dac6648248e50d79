"""The read store consumer against real PostgreSQL and Kafka servers."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any

import psycopg
import pytest
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from outbox.consumers import readstore as rs
from tests.integration.support import kcat_read
from outbox import contract
from outbox.config import KafkaSettings
from outbox.consumers.readstore import ReadStoreSettings
from outbox.errors import KafkaUnavailable, NotInstalled

pytestmark = pytest.mark.integration

T0 = datetime(2025, 3, 1, 12, 0, 0, tzinfo=timezone.utc)
CHECKSUM = """
SELECT count(*), md5(coalesce(string_agg(e::text, '|' ORDER BY source_id, aggregate_type, aggregate_id), ''))
  FROM readstore.entities e
"""


# --------------------------------------------------------------------------- helpers
def ev(prefix: str, aggregate: str, aggregate_id: str, etype: str, lsn: int, seq: int = 0, *,
       source: str = "s1", payload: dict[str, Any] | None = None, event_id: str | None = None) -> contract.Record:
    row = contract.OutboxRow(id=event_id or str(uuid.uuid4()), aggregatetype=aggregate, aggregateid=aggregate_id,
                             type=f"{aggregate}.{etype}", payload=json.dumps(payload or {"id": aggregate_id, "lsn": lsn}))
    return contract.build_record(row, source_id=source, prefix=prefix, position=contract.Position(lsn, seq),
                                 commit_time=T0 + timedelta(microseconds=lsn), xid=lsn)


def history(prefix: str) -> list[contract.Record]:
    """Two aggregate types, several keys, increasing positions; some deleted, one re-created."""
    out = []
    lsn = 0x100
    for i in range(6):
        out.append(ev(prefix, "customer", f"c{i}", "created", lsn, 0, payload={"name": f"n{i}", "v": 1}))
        out.append(ev(prefix, "order", f"o{i}", "created", lsn, 1, payload={"customer": f"c{i}", "v": 1}))
        lsn += 0x10
    for i in range(6):
        out.append(ev(prefix, "customer", f"c{i}", "updated", lsn, 0, payload={"name": f"n{i}", "v": 2}))
        lsn += 0x10
    out.append(ev(prefix, "customer", "c1", "deleted", lsn, 0, payload={"name": "n1", "v": 2}))
    out.append(ev(prefix, "order", "o2", "deleted", lsn, 1, payload={"customer": "c2", "v": 1}))
    lsn += 0x10
    out.append(ev(prefix, "order", "o3", "updated", lsn, 0, payload={"customer": "c3", "v": 2}))
    out.append(ev(prefix, "customer", "c4", "deleted", lsn + 0x10, 0, payload={"name": "n4", "v": 2}))
    out.append(ev(prefix, "customer", "c4", "created", lsn + 0x20, 0, payload={"name": "n4", "v": 3}))
    return out


Expected = dict[tuple[str, str], tuple[dict[str, Any], bool]]


def expected_state(records: Sequence[contract.Record]) -> Expected:
    best: dict[tuple[str, str], tuple[tuple[int, int], dict[str, Any], bool]] = {}
    for r in records:
        e = contract.parse_record(r.headers, r.value)
        k = (e.aggregate_type, e.aggregate_id)
        pos = (e.position.commit_lsn, e.position.seq)
        if k not in best or pos > best[k][0]:
            best[k] = (pos, json.loads(e.payload), contract.is_deletion(e.type))
    return {k: (v[1], v[2]) for k, v in best.items()}


async def produce(bootstrap: str, records: Sequence[contract.Record | tuple[str, bytes, bytes | None, list[tuple[str, bytes]]]]
                  ) -> dict[TopicPartition, int]:
    """Send records in order; return the next offset of every partition written."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    ends: dict[TopicPartition, int] = {}
    try:
        for r in records:
            topic, key, value, headers = (r.topic, r.key, r.value, r.headers) if isinstance(r, contract.Record) else r
            md = await producer.send_and_wait(topic, value=value, key=key, headers=headers)
            tp = TopicPartition(md.topic, md.partition)
            ends[tp] = max(ends.get(tp, 0), md.offset + 1)
    finally:
        await producer.stop()
    return ends


def stored_offsets(dsn: str, group: str) -> dict[TopicPartition, int]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT topic, partition, next_offset FROM readstore.consumer_offsets WHERE group_id = %s",
                            (group,)).fetchall()
    return {TopicPartition(t, p): o for t, p, o in rows}


def checksum(dsn: str) -> tuple[int, str]:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(CHECKSUM).fetchone()
    assert row is not None
    return row[0], row[1]


def entities(dsn: str) -> dict[tuple[str, str], tuple[dict[str, Any], bool]]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT aggregate_type, aggregate_id, payload, deleted FROM readstore.entities").fetchall()
    return {(t, i): (p, d) for t, i, p, d in rows}


async def run_until(settings: ReadStoreSettings, done: Callable[[], bool], timeout: float = 60.0) -> dict[str, int]:
    """Run the consumer in-process until ``done()`` holds, then stop it with the stop event."""
    stop = asyncio.Event()
    task = asyncio.create_task(rs.run_readstore(settings, stop))
    deadline = time.monotonic() + timeout
    try:
        while not done():
            if task.done():
                await task  # raises what ended it
                raise AssertionError("the consumer stopped on its own")
            assert time.monotonic() < deadline, "the consumer did not catch up in time"
            await asyncio.sleep(0.2)
    finally:
        stop.set()
        totals = await asyncio.wait_for(task, 30)
    return dict(totals)


def caught_up(dsn: str, group: str, ends: dict[TopicPartition, int]) -> Callable[[], bool]:
    def check() -> bool:
        stored = stored_offsets(dsn, group)
        return all(stored.get(tp, 0) >= end for tp, end in ends.items())
    return check


def settings(dsn: str, bootstrap: str, prefix: str, group: str, batch_size: int = 2000) -> ReadStoreSettings:
    return ReadStoreSettings(dsn=dsn, kafka=KafkaSettings(bootstrap=bootstrap), topic_prefix=prefix,
                             group=group, batch_size=batch_size)


# --------------------------------------------------------------------------- tests
def test_migrate_is_idempotent_and_preflight_catches_a_missing_schema(new_database: Callable[..., str],
                                                                      kafka_bootstrap: str) -> None:
    dsn = new_database("rs")
    with pytest.raises(NotInstalled, match="not installed"):
        asyncio.run(rs.run_readstore(settings(dsn, kafka_bootstrap, "x", "g"), asyncio.Event()))
    rs.migrate(dsn)
    rs.migrate(dsn)
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT version_num FROM readstore.alembic_version").fetchall() == [("readstore_0002",)]
        assert conn.execute("SELECT count(*) FROM readstore.current_entities").fetchone() == (0,)


def test_applies_current_rows_with_tombstones_and_replays_change_nothing(
        readstore_db: str, kafka_bootstrap: str, topic_prefix: str, group: Callable[[], str]) -> None:
    dsn, g = readstore_db, group()
    events = history(topic_prefix)
    ends = asyncio.run(produce(kafka_bootstrap, events))
    # a small batch size, so that the history spans several batches and transactions
    s = settings(dsn, kafka_bootstrap, topic_prefix, g, batch_size=7)
    totals = asyncio.run(run_until(s, caught_up(dsn, g, ends)))
    assert totals["records"] == len(events)

    want = expected_state(events)
    assert entities(dsn) == want
    assert {k for k, (_, deleted) in want.items() if deleted} == {("customer", "c1"), ("order", "o2")}
    with psycopg.connect(dsn) as conn:
        visible = {r[0] for r in conn.execute("SELECT aggregate_id FROM readstore.current_entities")}
        assert visible == {i for (_, i), (_, d) in want.items() if not d}
        assert conn.execute("SELECT to_regclass('readstore.rejected')").fetchone() == (None,)  # the DLQ replaced it
    before = checksum(dsn)

    # The same events again, plus older ones: an update older than a delete, an older create.
    older = [ev(topic_prefix, "customer", "c1", "updated", 0x101, 0, payload={"zombie": True}),
             ev(topic_prefix, "order", "o3", "created", 0x100, 1, payload={"stale": True})]
    ends = asyncio.run(produce(kafka_bootstrap, events + older))
    totals = asyncio.run(run_until(s, caught_up(dsn, g, ends)))
    assert totals["records"] == len(events) + len(older)  # resumed from the stored offsets
    assert totals["changed"] == 0
    assert checksum(dsn) == before


def test_offsets_live_in_the_database_and_kafka_mirrors_them(
        readstore_db: str, kafka_bootstrap: str, topic_prefix: str, group: Callable[[], str]) -> None:
    dsn, g = readstore_db, group()
    events = history(topic_prefix)
    ends = asyncio.run(produce(kafka_bootstrap, events))
    s = settings(dsn, kafka_bootstrap, topic_prefix, g, batch_size=5)
    asyncio.run(run_until(s, caught_up(dsn, g, ends)))

    async def kafka_committed() -> dict[TopicPartition, int]:
        admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
        await admin.start()
        try:
            got = await admin.list_consumer_group_offsets(g)
        finally:
            await admin.close()
        return {tp: om.offset for tp, om in got.items()}

    assert stored_offsets(dsn, g) == ends
    assert asyncio.run(kafka_committed()) == ends
    before = checksum(dsn)

    # Restart: nothing new, nothing re-applied.
    more = [ev(topic_prefix, "customer", "c9", "created", 0x9000)]
    ends2 = asyncio.run(produce(kafka_bootstrap, more))
    totals = asyncio.run(run_until(s, caught_up(dsn, g, ends2)))
    assert totals["records"] == 1 and totals["changed"] == 1

    # The database is the source of truth: rewind it and the consumer re-reads from there
    # (Kafka's committed offsets say otherwise), changing nothing.
    with psycopg.connect(dsn) as conn:
        conn.execute("UPDATE readstore.consumer_offsets SET next_offset = 0 WHERE group_id = %s", (g,))
    after_c9 = checksum(dsn)
    assert after_c9 != before
    all_ends = {tp: max(ends.get(tp, 0), ends2.get(tp, 0)) for tp in ends.keys() | ends2.keys()}
    totals = asyncio.run(run_until(s, caught_up(dsn, g, all_ends)))
    assert totals["records"] == len(events) + 1 and totals["changed"] == 0
    assert checksum(dsn) == after_c9


def test_poison_records_are_dead_lettered_and_do_not_block(
        readstore_db: str, kafka_bootstrap: str, topic_prefix: str, group: Callable[[], str],
        caplog: pytest.LogCaptureFixture) -> None:
    dsn, g = readstore_db, group()
    good1 = ev(topic_prefix, "customer", "a", "created", 0x10)
    no_id = ev(topic_prefix, "customer", "b", "created", 0x20)
    no_id_raw = (no_id.topic, no_id.key, no_id.value, [(k, v) for k, v in no_id.headers if k != contract.H_ID])
    bad_json = ev(topic_prefix, "customer", "c", "created", 0x30)
    bad_json_raw = (bad_json.topic, bad_json.key, b'{"name": "c", ', bad_json.headers)
    good2 = ev(topic_prefix, "customer", "d", "created", 0x40)
    ends = asyncio.run(produce(kafka_bootstrap, [good1, no_id_raw, bad_json_raw, good2]))
    with caplog.at_level("ERROR", logger="outbox.consumers.dlq"):
        totals = asyncio.run(run_until(settings(dsn, kafka_bootstrap, topic_prefix, g), caught_up(dsn, g, ends)))
    assert totals["rejected"] == 2
    assert set(entities(dsn)) == {("customer", "a"), ("customer", "d")}
    parked = sorted(kcat_read(kafka_bootstrap, f"{topic_prefix}.customer.dlq"), key=lambda r: r["key"])
    assert [r["key"] for r in parked] == ["s1:b", "s1:c"]
    h0, h1 = parked[0]["headers"], parked[1]["headers"]
    assert "ce_id" in h0["dlq_error"] and contract.H_ID not in h0
    assert "JSON" in h1["dlq_error"] or "Expecting" in h1["dlq_error"]
    assert h1[contract.H_ID] == bad_json.headers[[k for k, _ in bad_json.headers].index(contract.H_ID)][1].decode()
    assert parked[1]["payload"] == '{"name": "c", '
    for r in parked:
        h = r["headers"]
        tp = TopicPartition(h["dlq_topic"], int(h["dlq_partition"]))
        assert tp.topic == f"{topic_prefix}.customer" and 0 <= int(h["dlq_offset"]) < ends[tp]
        assert h["dlq_group"] == g and h["dlq_attempts"] == "1" and h["dlq_time"].endswith("Z")
    logged = [m for m in caplog.messages if m.startswith("parked")]
    assert len(logged) == 2 and all(f"{topic_prefix}.customer[" in m and "]@" in m for m in logged)


def test_a_row_postgresql_refuses_is_dead_lettered_alone(
        readstore_db: str, kafka_bootstrap: str, topic_prefix: str, group: Callable[[], str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The safety net behind the payload checks: the batch goes through, the bad row is parked."""
    monkeypatch.setattr(rs, "check_payload", lambda value: value.decode())  # let \u0000 through
    dsn, g = readstore_db, group()
    events = [ev(topic_prefix, "customer", "a", "created", 0x10),
              (f"{topic_prefix}.customer", b"s1:b", b'{"n": "x\\u0000"}', ev(topic_prefix, "customer", "b", "created", 0x20).headers),
              ev(topic_prefix, "customer", "c", "created", 0x30)]
    ends = asyncio.run(produce(kafka_bootstrap, events))
    totals = asyncio.run(run_until(settings(dsn, kafka_bootstrap, topic_prefix, g), caught_up(dsn, g, ends)))
    assert totals["rejected"] == 0 and totals["refused"] == 1  # found by PostgreSQL, not by the checks
    assert set(entities(dsn)) == {("customer", "a"), ("customer", "c")}
    parked = kcat_read(kafka_bootstrap, f"{topic_prefix}.customer.dlq")
    assert len(parked) == 1 and parked[0]["key"] == "s1:b" and "DataError" in parked[0]["headers"]["dlq_error"]


def test_new_topics_are_picked_up_and_dlq_topics_ignored(
        readstore_db: str, kafka_bootstrap: str, topic_prefix: str, group: Callable[[], str]) -> None:
    dsn, g = readstore_db, group()
    first = asyncio.run(produce(kafka_bootstrap, [ev(topic_prefix, "customer", "a", "created", 0x10)]))
    dead = ev(topic_prefix, "customer", "z", "created", 0x11)
    asyncio.run(produce(kafka_bootstrap, [(dead.topic + ".dlq", dead.key, dead.value, dead.headers)]))

    async def scenario() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(rs.run_readstore(settings(dsn, kafka_bootstrap, topic_prefix, g), stop))
        try:
            await wait_for(caught_up(dsn, g, first), task)
            later = await produce(kafka_bootstrap, [ev(topic_prefix, "sales.invoice", "i1", "created", 0x20)])
            await wait_for(caught_up(dsn, g, later), task, timeout=30)
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)

    asyncio.run(scenario())
    assert set(entities(dsn)) == {("customer", "a"), ("sales.invoice", "i1")}
    assert not any(t.endswith(".dlq") for t, _ in [(tp.topic, 0) for tp in stored_offsets(dsn, g)])


async def wait_for(done: Callable[[], bool], task: asyncio.Task[Any], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if task.done():
            await task
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.2)


def test_unreachable_kafka_is_one_line(readstore_db: str) -> None:
    s = settings(readstore_db, "127.0.0.1:1", "x", "g")
    with pytest.raises(KafkaUnavailable, match="cannot reach Kafka at 127.0.0.1:1"):
        asyncio.run(rs.run_readstore(s, asyncio.Event()))


# --------------------------------------------------------------------------- the command
def outbox(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "outbox.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OUTBOX_CONFIG": ""})


def test_cli_unreachable_dsn_is_one_line(kafka_bootstrap: str) -> None:
    res = outbox("consume", "readstore", "--dsn", "host=127.0.0.1 port=1 dbname=x", "--kafka-bootstrap", kafka_bootstrap)
    assert res.returncode == 1
    assert res.stderr.strip().splitlines() == [res.stderr.strip()]
    assert res.stderr.startswith("Error: cannot connect to 127.0.0.1:1/x")


def test_cli_rejects_batch_size_zero(kafka_bootstrap: str) -> None:
    res = outbox("consume", "readstore", "--dsn", "dbname=x", "--kafka-bootstrap", kafka_bootstrap, "--batch-size", "0")
    assert res.returncode == 2
    assert res.stderr.strip() == "Error: invalid setting 'batch_size': Input should be greater than or equal to 1"


def test_cli_sql_prints_the_migration_without_a_server() -> None:
    res = subprocess.run([sys.executable, "-m", "outbox.cli", "consume", "readstore", "--sql"], capture_output=True,
                         text=True, timeout=60, env={k: v for k, v in os.environ.items() if k != "KAFKA_BOOTSTRAP_SERVERS"})
    assert res.returncode == 0, res.stderr
    assert "CREATE SCHEMA IF NOT EXISTS readstore;" in res.stdout
    assert "CREATE TABLE readstore.alembic_version" in res.stdout
    assert "CREATE TABLE readstore.entities" in res.stdout and res.stdout.rstrip().endswith("COMMIT;")


def test_cli_migrates_consumes_and_stops_cleanly_on_sigterm(
        new_database: Callable[..., str], kafka_bootstrap: str, topic_prefix: str, group: Callable[[], str]) -> None:
    dsn, g = new_database("rs"), group()
    ends = asyncio.run(produce(kafka_bootstrap, history(topic_prefix)))
    proc = subprocess.Popen([sys.executable, "-m", "outbox.cli", "-v", "consume", "readstore", "--dsn", dsn,
                             "--kafka-bootstrap", kafka_bootstrap, "--topic-prefix", topic_prefix, "--group", g],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "OUTBOX_CONFIG": ""})
    try:
        deadline = time.monotonic() + 60
        done = False
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                done = caught_up(dsn, g, ends)()
            except psycopg.errors.UndefinedTable:
                done = False
            if done:
                break
            time.sleep(0.2)
        assert done, proc.stderr.read() if proc.poll() is not None else "not caught up"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert "SIGTERM received" in err
    assert f"stopped: {sum(ends.values())} records applied, 0 rejected" in err
    assert entities(dsn) == expected_state(history(topic_prefix))


def test_a_lost_database_connection_is_retried_without_losing_the_batch(
        readstore_db: str, kafka_bootstrap: str, topic_prefix: str, group: Callable[[], str],
        caplog: pytest.LogCaptureFixture) -> None:
    dsn, g = readstore_db, group()
    first = asyncio.run(produce(kafka_bootstrap, [ev(topic_prefix, "customer", "a", "created", 0x10)]))
    events = history(topic_prefix)

    async def scenario() -> dict[str, int]:
        stop = asyncio.Event()
        task = asyncio.create_task(rs.run_readstore(settings(dsn, kafka_bootstrap, topic_prefix, g), stop))
        try:
            await wait_for(caught_up(dsn, g, first), task)
            with psycopg.connect(dsn, autocommit=True) as conn:
                killed = conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                      "WHERE application_name = 'outbox-readstore' AND datname = current_database()"
                                      ).fetchall()
            assert killed == [(True,)]
            ends = await produce(kafka_bootstrap, events)
            await wait_for(caught_up(dsn, g, ends), task)
        finally:
            stop.set()
            totals = await asyncio.wait_for(task, 30)
        return dict(totals)

    with caplog.at_level("WARNING", logger="outbox.consumers.kafka"):
        totals = asyncio.run(scenario())
    assert any("not applied" in m and "retrying" in m for m in caplog.messages)
    assert totals["records"] == 1 + len(events)
    want = expected_state(events)
    want[("customer", "a")] = ({"id": "a", "lsn": 0x10}, False)
    assert entities(dsn) == want
