"""The read store on the real servers: events as the relay would produce them, and the consumer
run in-process until the state it must reach."""
from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any

import psycopg
from aiokafka import AIOKafkaProducer, TopicPartition

from outbox import contract
from outbox.config import KafkaSettings
from outbox.consumers import readstore as rs
from outbox.consumers.readstore import ReadStoreSettings
from tests.support.wait import wait_until

T0 = datetime(2025, 3, 1, 12, 0, 0, tzinfo=timezone.utc)

Expected = dict[tuple[str, str], tuple[dict[str, Any], bool]]


def ev(prefix: str, aggregate: str, aggregate_id: str, etype: str, lsn: int, seq: int = 0, *,
       source: str = "s1", payload: dict[str, Any] | None = None, event_id: str | None = None,
       wal_history: str | None = None) -> contract.Record:
    """One event, as the relay builds it, at position (``lsn``, ``seq``) of WAL history ``wal_history``."""
    row = contract.OutboxRow(id=event_id or str(uuid.uuid4()), aggregatetype=aggregate, aggregateid=aggregate_id,
                             type=f"{aggregate}.{etype}", payload=json.dumps(payload or {"id": aggregate_id, "lsn": lsn}))
    return contract.build_record(row, source_id=source, prefix=prefix, position=contract.Position(lsn, seq),
                                 commit_time=T0 + timedelta(microseconds=lsn), xid=lsn, history=wal_history)


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


def expected_state(records: Sequence[contract.Record]) -> Expected:
    """Per (aggregate type, id): the payload of the greatest position and whether it is a deletion."""
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
    """The next offsets the read store keeps for ``group`` (its own, not Kafka's)."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT topic, partition, next_offset FROM readstore.consumer_offsets WHERE group_id = %s",
                            (group,)).fetchall()
    return {TopicPartition(t, p): o for t, p, o in rows}


def entities(dsn: str) -> Expected:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT aggregate_type, aggregate_id, payload, deleted FROM readstore.entities").fetchall()
    return {(t, i): (p, d) for t, i, p, d in rows}


def caught_up(dsn: str, group: str, ends: dict[TopicPartition, int]) -> Callable[[], bool]:
    """A check: the read store's offsets of ``group`` reached ``ends``."""
    def check() -> bool:
        stored = stored_offsets(dsn, group)
        return all(stored.get(tp, 0) >= end for tp, end in ends.items())
    return check


def settings(dsn: str, bootstrap: str, prefix: str, group: str, batch_size: int = 2000) -> ReadStoreSettings:
    return ReadStoreSettings(dsn=dsn, kafka=KafkaSettings(bootstrap=bootstrap), topic_prefix=prefix,
                             group=group, batch_size=batch_size)


async def wait_for(done: Callable[[], bool], task: asyncio.Task[Any], timeout: float = 60,
                   message: str = "the read store to reach the awaited state") -> None:
    """In a scenario running the consumer as ``task``: wait until ``done()`` (called in a thread, so
    the consumer keeps running). If the task ends first, what ended it is raised."""
    def state() -> str | None:
        return "done" if done() else "ended" if task.done() else None

    if await asyncio.to_thread(wait_until, state, timeout, 0.2, message) == "ended":
        await task  # raises what ended it
        raise AssertionError("the consumer stopped on its own")


async def run_until(settings: ReadStoreSettings, done: Callable[[], bool], timeout: float = 60.0) -> dict[str, int]:
    """Run the consumer in-process until ``done()`` holds, then stop it with the stop event; its totals."""
    stop = asyncio.Event()
    task = asyncio.create_task(rs.run_readstore(settings, stop))
    try:
        await wait_for(done, task, timeout, "the consumer to catch up")
    finally:
        stop.set()
        totals = await asyncio.wait_for(task, 30)
    return dict(totals)
