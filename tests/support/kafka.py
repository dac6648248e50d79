"""Kafka helpers: reading topics with kcat (an independent client), topics and groups of a test's own."""
from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Sequence
from typing import Any

from aiokafka import TopicPartition

from tests.support.wait import wait_until


def kcat_read(bootstrap: str, topic: str, isolation: str = "read_committed") -> list[dict[str, Any]]:
    """Every record of a topic up to its end, read with kcat, headers as a dict ([] without the topic)."""
    proc = subprocess.run(
        ["kcat", "-b", bootstrap, "-C", "-t", topic, "-J", "-e", "-q", "-o", "beginning", "-X", f"isolation.level={isolation}"],
        capture_output=True, text=True, timeout=60,
    )
    if proc.returncode != 0:
        if "Unknown topic" in proc.stderr or "UNKNOWN_TOPIC" in proc.stderr:
            return []
        raise AssertionError(f"kcat failed: {proc.stderr.strip()}")
    records = []
    for line in proc.stdout.splitlines():
        rec = json.loads(line)
        h = rec.get("headers") or []
        rec["headers"] = dict(zip(h[::2], h[1::2]))
        records.append(rec)
    return records


def read_topics(bootstrap: str, topics: Sequence[str], isolation: str = "read_committed") -> dict[str, list[dict[str, Any]]]:
    return {t: kcat_read(bootstrap, t, isolation) for t in topics}


def wait_for_records(bootstrap: str, topics: list[str], count: int, timeout: float = 60) -> dict[str, list[dict[str, Any]]]:
    """Poll with kcat until the topics hold at least ``count`` records together; returns them all."""
    return wait_until(lambda: read_topics(bootstrap, topics), timeout=timeout, interval=0.5,
                      until=lambda got: sum(len(v) for v in got.values()) >= count,
                      message=f"{count} records on {', '.join(topics)}")


def wait_for_ids(bootstrap: str, topics: Sequence[str], ids: set[str], timeout: float = 90,
                 isolation: str = "read_committed") -> list[dict[str, Any]]:
    """Poll with kcat until every event id of ``ids`` (a ce_id header) is on the topics; returns every record."""
    def records() -> list[dict[str, Any]]:
        return [r for t in topics for r in kcat_read(bootstrap, t, isolation)]

    def missing(got: list[dict[str, Any]]) -> set[str]:
        return ids - {r["headers"].get("ce_id") for r in got}

    return wait_until(records, timeout=timeout, interval=0.5, until=lambda got: not missing(got),
                      message=lambda: f"{len(ids)} committed events on {', '.join(topics)}, "
                                      f"{len(missing(records()))} still missing")


async def create_topics(bootstrap: str, topics: Sequence[str], partitions: int = 1) -> None:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(t, num_partitions=partitions, replication_factor=1) for t in topics])
    finally:
        await admin.close()


async def delete_topics(bootstrap: str, prefix: str) -> None:
    """Delete the topics named ``<prefix>.*`` and ``__<prefix>*``."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        topics = [t for t in await admin.list_topics() if t.startswith((prefix + ".", "__" + prefix))]
        if topics:
            await admin.delete_topics(topics)
    finally:
        await admin.close()


async def delete_groups(bootstrap: str, groups: Sequence[str]) -> None:
    """Delete consumer groups, best effort: a group that never committed may be unknown."""
    # aiokafka 0.14's admin client has no delete_consumer_groups: send DeleteGroups to each
    # group's coordinator.
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.protocol.admin import DeleteGroupsRequest

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        for name in groups:
            try:
                node = await admin.find_coordinator(name)
                await admin._send_request_to_node(node, DeleteGroupsRequest([name]))
            except Exception:  # noqa: BLE001
                pass
    finally:
        await admin.close()


async def delete_groups_named(bootstrap: str, prefix: str) -> None:
    """Delete the consumer groups whose names start with ``prefix`` (an exactly-once relay's position
    groups are ``<offsets topic>.<source id>``)."""
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.errors import GroupLoadInProgressError

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        for attempt in range(60):  # right after a broker restart the coordinator loads its groups first
            try:
                names = [g[0] for g in await admin.list_consumer_groups() if g[0].startswith(prefix)]
                break
            except GroupLoadInProgressError:
                if attempt == 59:
                    raise
                await asyncio.sleep(0.5)
    finally:
        await admin.close()
    if names:
        await delete_groups(bootstrap, names)


async def committed_offsets(bootstrap: str, group: str, *, metadata: bool = False) -> dict[TopicPartition, Any]:
    """The offsets Kafka holds for ``group``; with ``metadata``, (offset, metadata) pairs."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        got = await admin.list_consumer_group_offsets(group)
    finally:
        await admin.close()
    return {tp: (om.offset, om.metadata) if metadata else om.offset for tp, om in got.items()}


async def end_offsets(bootstrap: str, topic: str) -> dict[TopicPartition, int]:
    """End offsets of the topic's partitions that hold records."""
    from aiokafka import AIOKafkaConsumer
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await admin.start()
    await consumer.start()
    try:
        described = await admin.describe_topics([topic])
        tps = [TopicPartition(d["topic"], p["partition"]) for d in described for p in d["partitions"]]
        return {tp: o for tp, o in (await consumer.end_offsets(tps)).items() if o}
    finally:
        await consumer.stop()
        await admin.close()
