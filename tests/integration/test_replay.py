"""``outbox replay --group ... --from ...`` on the real servers, with the read store as the sink."""
from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Callable
from datetime import datetime, timezone

import psycopg
import pytest
from aiokafka import TopicPartition

from outbox.consumers import readstore as rs
from outbox.consumers.kafka import REPLAY_MARK
from tests.support.kafka import committed_offsets
from tests.support.processes import OutboxProcess, outbox
from tests.support.readstore import caught_up, history, produce, run_until, settings, stored_offsets, wait_for

pytestmark = pytest.mark.integration

ENTITIES = """
SELECT count(*), md5(string_agg(format('%s|%s|%s|%s|%s|%s|%s|%s', source_id, aggregate_type, aggregate_id, payload,
                                       event_id, commit_lsn, txseq, deleted), ',' ORDER BY 1))
  FROM readstore.entities
"""


def snapshot(dsn: str) -> tuple[int, str]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(ENTITIES).fetchone()  # type: ignore[return-value]


def test_replay_from_earliest_redelivers_through_the_read_stores_own_offsets_and_changes_nothing(
        readstore_db: str, kafka_bootstrap: str, topic_prefix: str, group: Callable[..., str]) -> None:
    dsn, g = readstore_db, group()
    events = history(topic_prefix)
    ends = asyncio.run(produce(kafka_bootstrap, events))
    s = settings(dsn, kafka_bootstrap, topic_prefix, g, batch_size=5)
    first = asyncio.run(run_until(s, caught_up(dsn, g, ends)))
    assert first["records"] == len(events)
    before = snapshot(dsn)
    assert before[0] > 0

    topics = sorted({tp.topic for tp in ends})
    res = outbox("replay", "--group", g, *[a for t in topics for a in ("--topic", t)], "--from", "earliest",
                 "--kafka-bootstrap", kafka_bootstrap, "--yes")
    assert res.returncode == 0, res.stderr
    assert f"{len(events)} records re-delivered in all" in res.stderr
    for tp, end in ends.items():  # one line per partition: topic, partition, current, new, re-delivered
        assert f"{tp.topic:<40} {tp.partition:>4} {end:>10} {0:>10} {end:>12}" in res.stderr
    assert stored_offsets(dsn, g) == ends  # the sink's own offsets still say "done"...

    # ...yet the consumer re-delivers everything: the rewind marker wins over them, once
    replayed = asyncio.run(run_until(s, rewritten(dsn, g, ends)))
    assert replayed["records"] == len(events) and replayed["changed"] == 0
    assert snapshot(dsn) == before  # same rows, same ce_id (event_id), same positions
    # the marker is consumed: a restart resumes from the stored offsets, nothing re-delivered
    quiet = asyncio.run(run_until(s, lambda: True))
    assert quiet.get("records", 0) == 0


def rewritten(dsn: str, g: str, ends: dict[TopicPartition, int]) -> Callable[[], bool]:
    """Done when every partition's stored offset was written again (after now) and reached its end."""
    with psycopg.connect(dsn) as conn:
        since = conn.execute("SELECT clock_timestamp()").fetchone()[0]  # type: ignore[index]

    def check() -> bool:
        with psycopg.connect(dsn) as conn:
            rows = conn.execute("SELECT topic, partition, next_offset FROM readstore.consumer_offsets "
                                "WHERE group_id = %s AND updated_at > %s", (g, since)).fetchall()
        again = {TopicPartition(t, p): o for t, p, o in rows}
        return all(again.get(tp, -1) >= end for tp, end in ends.items())
    return check


def test_replay_refuses_an_active_group_an_unknown_group_and_no_terminal(
        readstore_db: str, kafka_bootstrap: str, topic_prefix: str, group: Callable[..., str]) -> None:
    dsn, g = readstore_db, group()
    ends = asyncio.run(produce(kafka_bootstrap, history(topic_prefix)))
    topic = sorted({tp.topic for tp in ends})[0]
    common = ["--topic", topic, "--from", "earliest", "--kafka-bootstrap", kafka_bootstrap]

    unknown = outbox("replay", "--group", f"{g}-nope", *common, "--yes", check=False)
    assert unknown.returncode == 1
    assert unknown.stderr.strip() == (f"Error: consumer group {g}-nope does not exist on Kafka at {kafka_bootstrap} "
                                      "(check --group; kafka-consumer-groups.sh --list shows them)")
    no_topic = outbox("replay", "--group", g, "--topic", f"{topic_prefix}.nope", "--from", "earliest",
                      "--kafka-bootstrap", kafka_bootstrap, "--yes", check=False)
    assert no_topic.returncode == 1 and "does not exist" in no_topic.stderr

    async def scenario() -> tuple[subprocess.CompletedProcess[str], subprocess.CompletedProcess[str]]:
        stop = asyncio.Event()
        task = asyncio.create_task(rs.run_readstore(settings(dsn, kafka_bootstrap, topic_prefix, g), stop))
        try:
            await wait_for(caught_up(dsn, g, ends), task)
            active = await asyncio.to_thread(outbox, "replay", "--group", g, *common, "--yes", check=False)
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)
        unconfirmed = await asyncio.to_thread(outbox, "replay", "--group", g, *common, check=False)  # no terminal, no --yes
        return active, unconfirmed

    active, unconfirmed = asyncio.run(scenario())
    assert active.returncode == 1
    last = active.stderr.strip().splitlines()[-1]
    assert last.startswith(f"Error: consumer group {g} has 1 active member(s) (outbox-readstore@127.0.0.1)")
    assert "--force" in last
    assert unconfirmed.returncode == 1
    assert unconfirmed.stderr.strip().splitlines()[-1] == "Error: not confirmed: no terminal to ask on; run again with --yes"
    assert "re-delivered in all" in unconfirmed.stderr  # the plan is shown before asking
    bad_from = outbox("replay", "--group", g, "--topic", topic, "--from", "yesterday", "--kafka-bootstrap", kafka_bootstrap,
                      check=False)
    assert bad_from.returncode == 2 and bad_from.stderr.startswith("Error: invalid --from 'yesterday'")


def test_replay_from_a_time_and_from_an_offset_count_what_they_redeliver(
        readstore_db: str, kafka_bootstrap: str, topic_prefix: str, group: Callable[..., str]) -> None:
    dsn, g = readstore_db, group()
    ends = asyncio.run(produce(kafka_bootstrap, history(topic_prefix)))
    asyncio.run(run_until(settings(dsn, kafka_bootstrap, topic_prefix, g), caught_up(dsn, g, ends)))
    topics = sorted({tp.topic for tp in ends})
    args = [a for t in topics for a in ("--topic", t)] + ["--kafka-bootstrap", kafka_bootstrap, "--dry-run"]
    future = datetime.now(timezone.utc).replace(year=datetime.now().year + 1).isoformat()
    assert "0 records re-delivered in all" in outbox("replay", "--group", g, "--from", future, *args).stdout
    past = outbox("replay", "--group", g, "--from", "2000-01-01T00:00:00Z", *args).stdout
    assert f"{sum(ends.values())} records re-delivered in all" in past
    one = outbox("replay", "--group", g, "--from", "1", *args).stdout
    assert f"{sum(ends.values()) - len(ends)} records re-delivered in all" in one


def test_force_waits_for_the_members_to_leave_then_rewinds(
        readstore_db: str, kafka_bootstrap: str, topic_prefix: str, group: Callable[..., str]) -> None:
    dsn, g = readstore_db, group()
    ends = asyncio.run(produce(kafka_bootstrap, history(topic_prefix)))
    topics = sorted({tp.topic for tp in ends})
    args = [a for t in topics for a in ("--topic", t)] + ["--from", "earliest", "--kafka-bootstrap", kafka_bootstrap]

    forced = OutboxProcess("replay", "--group", g, *args, "--yes", "--force", name="replay")

    async def scenario() -> int:
        stop = asyncio.Event()
        task = asyncio.create_task(rs.run_readstore(settings(dsn, kafka_bootstrap, topic_prefix, g), stop))
        try:
            await wait_for(caught_up(dsn, g, ends), task)
            forced.start()
            # it planned, saw the member and waits (the consumer runs meanwhile: wait in a thread)
            await asyncio.to_thread(forced.wait_for_output, "--force: waiting up to 90 s for 1 member(s) to leave the group",
                                    60)
            # still waiting: the member is there, so the offsets are not rewound (no marker yet)
            committed = await committed_offsets(kafka_bootstrap, g, metadata=True)
            assert not [tp for tp, (_, meta) in committed.items() if (meta or "").startswith(REPLAY_MARK)], committed
            forced.assert_running()
        finally:
            stop.set()  # the consumer leaves the group
            await asyncio.wait_for(task, 30)
        assert forced.proc is not None
        return await asyncio.to_thread(forced.proc.wait, 120)

    try:
        returncode = asyncio.run(scenario())
        output = forced.log.read_text()
    finally:
        forced.close()
    assert returncode == 0, output
    assert f"{sum(ends.values())} records re-delivered in all" in output
    replayed = asyncio.run(run_until(settings(dsn, kafka_bootstrap, topic_prefix, g), rewritten(dsn, g, ends)))
    assert replayed["records"] == sum(ends.values())
