"""Where a sink that keeps its own offsets starts reading (consumers/kafka.py ``_SeekToStored``),
on the real servers: never from Kafka's committed offset, never silently past lost records, and
never twice within one assignment."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import psycopg
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.records_to_delete import RecordsToDelete
from prometheus_client import REGISTRY

from outbox.config import KafkaSettings
from outbox.consumers import kafka as loop
from outbox.consumers.dlq import DeadLetters
from tests.support.kafka import committed_offsets, create_topics
from tests.support.readstore import caught_up, entities, ev, expected_state, history, produce, run_until, settings
from tests.support.wait import wait_until

pytestmark = pytest.mark.integration


def test_a_partition_the_read_store_has_no_offset_for_starts_at_the_log_start(
        readstore_db: str, kafka_bootstrap: str, topic_prefix: str, group: Callable[[], str]) -> None:
    """A read store restored from a backup taken before it ever read a topic: it must catch up on
    that topic, not start from Kafka's committed offset (which is past everything)."""
    dsn, g = readstore_db, group()
    events = history(topic_prefix)
    ends = asyncio.run(produce(kafka_bootstrap, events))
    s = settings(dsn, kafka_bootstrap, topic_prefix, g, batch_size=5)
    asyncio.run(run_until(s, caught_up(dsn, g, ends)))
    order = {tp: end for tp, end in ends.items() if tp.topic == f"{topic_prefix}.order"}
    committed = asyncio.run(committed_offsets(kafka_bootstrap, g))
    assert order and all(committed[tp] == end for tp, end in order.items())

    with psycopg.connect(dsn) as conn:  # the backup knew nothing of the order topic
        conn.execute("DELETE FROM readstore.entities WHERE aggregate_type = 'order'")
        conn.execute("DELETE FROM readstore.consumer_offsets WHERE topic = %s", (f"{topic_prefix}.order",))
    totals = asyncio.run(run_until(s, caught_up(dsn, g, ends), timeout=30))
    assert totals["records"] == sum(order.values())
    assert entities(dsn) == expected_state(events)


def test_a_stored_offset_below_the_log_start_is_an_error_and_a_metric(
        readstore_db: str, kafka_bootstrap: str, topic_prefix: str, group: Callable[[], str],
        caplog: pytest.LogCaptureFixture) -> None:
    dsn, g = readstore_db, group()
    asyncio.run(create_topics(kafka_bootstrap, [f"{topic_prefix}.customer"], partitions=1))
    events = [ev(topic_prefix, "customer", f"c{i}", "created", 0x100 + i) for i in range(8)]
    ends = asyncio.run(produce(kafka_bootstrap, events))
    tp = TopicPartition(f"{topic_prefix}.customer", 0)
    s = settings(dsn, kafka_bootstrap, topic_prefix, g)
    asyncio.run(run_until(s, caught_up(dsn, g, ends)))

    async def delete_before(offset: int) -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
        await admin.start()
        try:
            await admin.delete_records({tp: RecordsToDelete(before_offset=offset)})
        finally:
            await admin.close()

    asyncio.run(delete_before(5))  # retention took offsets 0..4
    with psycopg.connect(dsn) as conn:  # a read store restored from a backup taken at offset 2
        conn.execute("UPDATE readstore.consumer_offsets SET next_offset = 2 WHERE group_id = %s", (g,))
    labels = {"group": g, "sink": "readstore", "topic": tp.topic}
    with caplog.at_level(logging.ERROR, logger="outbox.consumers.kafka"):
        totals = asyncio.run(run_until(s, caught_up(dsn, g, ends), timeout=30))
    assert totals["records"] == 3  # 5, 6, 7
    lost = [m for m in caplog.messages if "deleted from Kafka" in m]
    assert len(lost) == 1 and f"{tp.topic}[0]: offsets 2..4" in lost[0] and "3 records lost" in lost[0], caplog.messages
    assert REGISTRY.get_sample_value("outbox_consumer_records_lost_total", labels) == 3


# --------------------------------------------------------------------------- the pipelined loop
class SlowOffsetsSink:
    """A PipelinedSink whose database answers ``stored_offsets`` slowly; records every offset submitted
    per partition since it was (re)assigned, and completes them at once."""

    name = "slowtest"

    def __init__(self, db: dict[TopicPartition, int], delay: float) -> None:
        self.db = db  # the "database": next offset per partition, shared by the members
        self.delay = delay
        self.seen: dict[TopicPartition, list[int]] = {}
        self.twice: list[tuple[TopicPartition, int]] = []

    async def stored_offsets(self, partitions: Sequence[TopicPartition]) -> Mapping[TopicPartition, int]:
        for tp in partitions:
            self.seen[tp] = []  # a new assignment: re-reading from the stored offset is legitimate
        stored = {tp: self.db[tp] for tp in partitions if tp in self.db}  # the query's snapshot...
        await asyncio.sleep(self.delay)  # ...answered slowly
        return stored

    async def submit(self, records: Sequence[Any], dead_letters: DeadLetters) -> None:
        for r in records:
            tp = TopicPartition(r.topic, r.partition)
            offsets = self.seen.setdefault(tp, [])
            if r.offset in offsets:
                self.twice.append((tp, r.offset))
            offsets.append(r.offset)
            self.db[tp] = max(self.db.get(tp, 0), r.offset + 1)

    def buffered(self, tp: TopicPartition) -> int:
        return 0

    def completed(self) -> tuple[dict[TopicPartition, int], list[Any]]:
        # what is done on the partitions it holds, every time (a commit lost in a rebalance is made again)
        return {tp: self.db[tp] for tp in self.seen if tp in self.db}, []

    async def release(self, partitions: set[TopicPartition]) -> None:
        for tp in partitions:
            self.seen.pop(tp, None)

    def check(self) -> None:
        pass

    async def close(self) -> None:
        pass


def test_the_pipelined_loop_never_fetches_a_partition_twice_while_it_is_being_assigned(
        kafka_bootstrap: str, topic_prefix: str, group: Callable[[], str]) -> None:
    """A slow sink database and members joining and leaving: no offset is submitted twice within
    one assignment, and the committed offsets reach the end."""
    g = group()
    topic = f"{topic_prefix}.customer"
    asyncio.run(create_topics(kafka_bootstrap, [topic], partitions=4))
    asyncio.run(produce(kafka_bootstrap, [ev(topic_prefix, "customer", f"c{i}", "created", 0x100 + i)
                                          for i in range(200)]))
    kafka = KafkaSettings(bootstrap=kafka_bootstrap)
    db: dict[TopicPartition, int] = {}

    async def scenario() -> list[tuple[TopicPartition, int]]:
        first = SlowOffsetsSink(db, delay=1.5)
        stop = asyncio.Event()
        task = asyncio.create_task(loop.run_pipelined(kafka, group=g, pattern=f"^{topic}$", sink=first, stop=stop,
                                                      batch_size=10, client_id="first"))
        twice: list[tuple[TopicPartition, int]] = []
        try:
            for _ in range(3):  # a second member joins, then leaves: two rebalances each time
                other = SlowOffsetsSink(db, delay=1.5)
                other_stop = asyncio.Event()
                second = asyncio.create_task(loop.run_pipelined(kafka, group=g, pattern=f"^{topic}$", sink=other,
                                                                stop=other_stop, batch_size=10, client_id="second"))
                await asyncio.to_thread(wait_until, lambda o=other, t=second: bool(o.seen) or t.done(), 60, 0.2,
                                        "the second member to get partitions")
                await produce(kafka_bootstrap, [ev(topic_prefix, "customer", f"d{i}", "created", 0x1000 + i)
                                                for i in range(40)])
                other_stop.set()
                await asyncio.wait_for(second, 60)
                twice += other.twice
            ends_now = await _end_offsets(kafka_bootstrap, topic)
            await asyncio.to_thread(wait_until, lambda: all(db.get(tp, 0) >= e for tp, e in ends_now.items()), 60, 0.2,
                                    "the sinks to reach the end")

            def committed_to_the_end() -> dict[int, tuple[int | None, int]]:
                committed = asyncio.run(committed_offsets(kafka_bootstrap, g))
                return {tp.partition: (committed.get(tp), e) for tp, e in ends_now.items() if committed.get(tp, 0) < e}

            # the committed offsets keep moving: Kafka hears of everything done, once the group settled
            await asyncio.to_thread(wait_until, committed_to_the_end, 60, 0.5, "the committed offsets to reach the end",
                                    until=lambda behind: behind == {})
        finally:
            stop.set()
            await asyncio.wait_for(task, 60)
        return twice + first.twice

    assert asyncio.run(scenario()) == []


async def _end_offsets(bootstrap: str, topic: str) -> dict[TopicPartition, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        if not tps:
            await consumer.topics()
            tps = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        return dict(await consumer.end_offsets(tps))
    finally:
        await consumer.stop()
