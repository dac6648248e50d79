"""Re-drive on the real servers: re-driven records land where the relay puts their key, and manual
re-drives with different filters do not hide each other's records."""
from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import pytest

from outbox import contract
from outbox.config import KafkaSettings
from outbox.consumers import dlq
from outbox.relay.publisher import Publisher
from tests.support.kafka import create_topics, kcat_read
from tests.support.processes import outbox
from tests.support.readstore import ev

pytestmark = pytest.mark.integration

PARTITIONS = 6


async def _relay_publish(kafka: KafkaSettings, records: list[contract.Record]) -> None:
    """Through the relay's own producer (librdkafka, its partitioner)."""
    publisher = Publisher(kafka)
    await publisher.start()
    errors: list[Any] = []
    try:
        for record in records:
            await publisher.send(record, lambda err, _msg: errors.append(err) if err is not None else None)
        assert await publisher.flush(30)
    finally:
        await publisher.stop()
    assert errors == []


def _park_all(kafka: KafkaSettings, topic: str, group: str) -> None:
    async def park() -> None:
        async with dlq.DeadLetters(kafka, group) as letters:
            await letters.park([dlq.DeadLetter.of(_Rec(r), "RuntimeError: test") for r in kcat_read(kafka.bootstrap, topic)])
    asyncio.run(park())


class _Rec:
    """A kcat record as a RecordLike."""

    def __init__(self, r: dict[str, Any]) -> None:
        self.topic, self.partition, self.offset = r["topic"], r["partition"], r["offset"]
        self.key = r["key"].encode() if r["key"] is not None else None
        self.value = r["payload"].encode() if r["payload"] is not None else None
        self.headers = [(k, v.encode()) for k, v in r["headers"].items()]


def test_redriven_and_parked_records_land_on_the_partition_the_relay_chose_for_their_key(
        kafka_bootstrap: str, topic_prefix: str, group: Callable[..., str]) -> None:
    kafka = KafkaSettings(bootstrap=kafka_bootstrap)
    g = group()
    topic = f"{topic_prefix}.customer"
    asyncio.run(create_topics(kafka_bootstrap, [topic, dlq.dlq_topic(topic)], partitions=PARTITIONS))
    records = [ev(topic_prefix, "customer", f"c{i}", "created", 0x100 + i) for i in range(60)]
    asyncio.run(_relay_publish(kafka, records))
    by_relay = {r["key"]: r["partition"] for r in kcat_read(kafka_bootstrap, topic)}
    assert len(by_relay) == 60 and len(set(by_relay.values())) == PARTITIONS

    _park_all(kafka, topic, g)
    parked = kcat_read(kafka_bootstrap, dlq.dlq_topic(topic))
    assert {r["key"]: r["partition"] for r in parked} == by_relay  # the dead-letter topic keeps the layout

    cursor = group(dlq.cursor_group(dlq.Filter()))
    done = asyncio.run(dlq.redrive(kafka, [dlq.dlq_topic(topic)], dlq.Filter(), cursor_group=cursor))
    assert done.redriven == 60
    back = [r for r in kcat_read(kafka_bootstrap, topic) if "dlq_redrive" in r["headers"]]
    moved = {r["key"]: (by_relay[r["key"]], r["partition"]) for r in back if r["partition"] != by_relay[r["key"]]}
    assert len(back) == 60 and moved == {}


def test_relay_partitioner_is_librdkafkas_consistent_random() -> None:
    # CRC32 (zlib's, as librdkafka's rd_crc32) of the key, modulo the partition count
    assert contract.partition_for(b"s1:c0", 6) == __import__("zlib").crc32(b"s1:c0") % 6
    assert contract.partition_for(b"", 6) is None and contract.partition_for(None, 6) is None
    assert dlq.relay_partitioner(b"s1:c0", [3, 1, 0, 2, 5, 4], [0]) == contract.partition_for(b"s1:c0", 6)
    assert dlq.relay_partitioner(None, [0, 1, 2], [2]) == 2  # no key: one of the available partitions


def test_manual_redrives_with_different_filters_each_find_their_records(
        kafka_bootstrap: str, topic_prefix: str, group: Callable[..., str]) -> None:
    kafka = KafkaSettings(bootstrap=kafka_bootstrap)
    g = group()
    topic = f"{topic_prefix}.customer"
    asyncio.run(create_topics(kafka_bootstrap, [topic, dlq.dlq_topic(topic)], partitions=1))
    records = [ev(topic_prefix, "customer", "a", "created", 0x10), ev(topic_prefix, "customer", "b", "updated", 0x20),
               ev(topic_prefix, "customer", "c", "created", 0x30)]
    asyncio.run(_relay_publish(kafka, records))
    _park_all(kafka, topic, g)
    for flt in (["type=customer.updated"], ["type=customer.created"], []):
        group(dlq.cursor_group(dlq.Filter.parse(flt)))  # the cursor groups, deleted afterwards
    group("outbox-redrive")

    def run(*filters: str) -> str:
        args = [a for f in filters for a in ("--filter", f)]
        res = outbox("replay", "--dlq", dlq.dlq_topic(topic), *args, "--kafka-bootstrap", kafka_bootstrap, "--yes")
        return res.stderr

    assert "1 of 3 parked records" in run("type=customer.updated")
    assert "2 of 3 parked records" in run("type=customer.created")  # not hidden by the first run's cursor
    assert "0 of 0 parked records" in run("type=customer.created")  # its own cursor moved past them
    # without a filter: what the filtered runs left behind, from the first record they did not all match (b)
    assert "2 of 2 parked records" in run()
    redriven = [json.loads(r["payload"])["id"] for r in kcat_read(kafka_bootstrap, topic) if "dlq_redrive" in r["headers"]]
    assert sorted(redriven) == ["a", "b", "b", "c", "c"]
