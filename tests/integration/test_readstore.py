"""The read store consumer against real PostgreSQL and Kafka servers."""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Callable

import psycopg
import pytest
from aiokafka import TopicPartition

from outbox import contract
from outbox.consumers import readstore as rs
from outbox.errors import KafkaUnavailable, NotInstalled
from tests.support.kafka import committed_offsets, kcat_read
from tests.support.processes import NO_CONFIG, outbox
from tests.support.readstore import caught_up, entities, ev, expected_state, history, produce, run_until, settings, stored_offsets, wait_for
from tests.support.wait import wait_until

pytestmark = pytest.mark.integration

CHECKSUM = """
SELECT count(*), md5(coalesce(string_agg(e::text, '|' ORDER BY source_id, aggregate_type, aggregate_id), ''))
  FROM readstore.entities e
"""


def checksum(dsn: str) -> tuple[int, str]:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(CHECKSUM).fetchone()
    assert row is not None
    return row[0], row[1]


# --------------------------------------------------------------------------- tests
def test_migrate_is_idempotent_and_preflight_catches_a_missing_schema(new_database: Callable[..., str],
                                                                      kafka_bootstrap: str) -> None:
    dsn = new_database("rs")
    with pytest.raises(NotInstalled, match="not installed"):
        asyncio.run(rs.run_readstore(settings(dsn, kafka_bootstrap, "x", "g"), asyncio.Event()))
    rs.migrate(dsn)
    rs.migrate(dsn)
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT version_num FROM readstore.alembic_version").fetchall() == [("readstore_0003",)]
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

    assert stored_offsets(dsn, g) == ends
    assert asyncio.run(committed_offsets(kafka_bootstrap, g)) == ends
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


def test_unreachable_kafka_is_one_line(readstore_db: str) -> None:
    s = settings(readstore_db, "127.0.0.1:1", "x", "g")
    with pytest.raises(KafkaUnavailable, match="cannot reach Kafka at 127.0.0.1:1"):
        asyncio.run(rs.run_readstore(s, asyncio.Event()))


# --------------------------------------------------------------------------- the command
def test_cli_unreachable_dsn_is_one_line(kafka_bootstrap: str) -> None:
    res = outbox("consume", "readstore", "--dsn", "host=127.0.0.1 port=1 dbname=x", "--kafka-bootstrap", kafka_bootstrap,
                 check=False)
    assert res.returncode == 1
    assert res.stderr.strip().splitlines() == [res.stderr.strip()]
    assert res.stderr.startswith("Error: cannot connect to 127.0.0.1:1/x")


def test_cli_rejects_batch_size_zero(kafka_bootstrap: str) -> None:
    res = outbox("consume", "readstore", "--dsn", "dbname=x", "--kafka-bootstrap", kafka_bootstrap, "--batch-size", "0",
                 check=False)
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
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **NO_CONFIG})
    try:
        def done() -> bool:
            assert proc.poll() is None, proc.stderr.read()  # type: ignore[union-attr]
            return caught_up(dsn, g, ends)()

        wait_until(done, timeout=60, message="the consumer to catch up", ignore=(psycopg.errors.UndefinedTable,))
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


def test_events_of_a_new_wal_history_are_parked_not_skipped_until_the_source_is_reset(
        readstore_db: str, kafka_bootstrap: str, topic_prefix: str, group: Callable[[], str]) -> None:
    """A store restored from a backup (or a promoted standby, a new cluster) sends LSNs below the
    ones applied: the position guard must not drop them silently (issue #19 item 5, #20 item 4)."""
    dsn, g = readstore_db, group()
    s = settings(dsn, kafka_bootstrap, topic_prefix, g)
    old = [ev(topic_prefix, "customer", "c1", "created", 0x5000, wal_history="7001.1", payload={"v": "old"})]
    ends = asyncio.run(produce(kafka_bootstrap, old))
    asyncio.run(run_until(s, caught_up(dsn, g, ends)))
    new = [ev(topic_prefix, "customer", "c1", "updated", 0x100, wal_history="7002.1", payload={"v": "new"}),
           ev(topic_prefix, "customer", "c2", "created", 0x200, wal_history="7002.1", payload={"v": "new"})]
    ends = asyncio.run(produce(kafka_bootstrap, new))
    totals = asyncio.run(run_until(s, caught_up(dsn, g, ends)))
    state = entities(dsn)
    assert ("customer", "c2") not in state and state[("customer", "c1")][0] == {"v": "old"}, state
    assert totals["refused"] == 2  # counted in outbox_consumer_events_rejected_total: OutboxEventsRejected fires
    parked = kcat_read(kafka_bootstrap, f"{topic_prefix}.customer.dlq")
    assert len(parked) == 2 and all("NewHistory: source s1" in r["headers"]["dlq_error"] for r in parked)

    with psycopg.connect(dsn) as conn:  # the documented reset (docs/operations.md)
        assert conn.execute("SELECT readstore.reset_source('s1', '7002.1')").fetchone() == (1,)
    ends = asyncio.run(produce(kafka_bootstrap, new))  # what a re-drive of the dead letters sends
    asyncio.run(run_until(s, caught_up(dsn, g, ends)))
    state = entities(dsn)
    assert state[("customer", "c1")][0] == {"v": "new"} and state[("customer", "c2")][0] == {"v": "new"}
    late = [ev(topic_prefix, "customer", "c1", "updated", 0x9000, wal_history="7001.1", payload={"v": "stale"})]
    ends = asyncio.run(produce(kafka_bootstrap, late))  # a straggler of the old history: parked too
    totals = asyncio.run(run_until(s, caught_up(dsn, g, ends)))
    assert totals["refused"] == 1 and entities(dsn)[("customer", "c1")][0] == {"v": "new"}
