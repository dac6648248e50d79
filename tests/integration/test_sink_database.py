"""A sink's own database on the real servers (consumers/sink_offsets.py): bounded sessions, so a
frozen consumer cannot block its successor, and rows the database can never take are parked."""
from __future__ import annotations

import asyncio
from collections.abc import Callable

import psycopg
import pytest

from outbox.consumers import readstore as rs
from outbox.consumers.kafka import SinkUnavailable
from tests.support.kafka import kcat_read
from tests.support.readstore import caught_up, entities, ev, produce, run_until, settings

pytestmark = pytest.mark.integration


def test_a_consumer_frozen_mid_transaction_does_not_block_its_successor(
        readstore_db: str, kafka_bootstrap: str, topic_prefix: str, group: Callable[[], str]) -> None:
    dsn = readstore_db
    frozen_group, g = group(), group()
    event = ev(topic_prefix, "customer", "k", "created", 0x10)
    ends = asyncio.run(produce(kafka_bootstrap, [event]))
    bounds = {"db_lock_timeout": 1.0, "db_idle_in_transaction_timeout": 3.0}
    s = settings(dsn, kafka_bootstrap, topic_prefix, g).model_copy(update=bounds)

    async def scenario() -> BaseException | None:
        frozen = rs.ReadStore.create(settings(dsn, kafka_bootstrap, topic_prefix, frozen_group).model_copy(update=bounds))
        await frozen.start()
        thaw = asyncio.Event()
        locked = asyncio.Event()

        async def freeze() -> None:
            plan = rs.plan_batch([_Rec(event)])
            async with frozen.transaction(plan.offsets) as conn:
                await frozen.effect(conn, plan)  # holds the row's lock...
                locked.set()
                await thaw.wait()  # ...and stops, mid-transaction (SIGSTOP, a paused VM)

        task = asyncio.create_task(freeze())
        await locked.wait()
        try:
            await run_until(s, caught_up(dsn, g, ends), timeout=30)  # the successor gets through
        finally:
            thaw.set()
            failure = (await asyncio.gather(task, return_exceptions=True))[0]
            await frozen.close()
        return failure

    failure = asyncio.run(scenario())
    assert isinstance(failure, SinkUnavailable), failure  # its session was ended: retriable, it reconnects
    assert set(entities(dsn)) == {("customer", "k")}


class _Rec:
    def __init__(self, r: object, partition: int = 0, offset: int = 0) -> None:
        self.topic, self.key, self.value, self.headers = r.topic, r.key, r.value, list(r.headers)  # type: ignore[attr-defined]
        self.partition, self.offset = partition, offset


def test_a_row_over_an_index_limit_is_parked_not_retried_forever(
        readstore_db: str, kafka_bootstrap: str, topic_prefix: str, group: Callable[[], str]) -> None:
    """SQLSTATE 54000 (index row size exceeds btree maximum), from an expression index on the payload."""
    dsn, g = readstore_db, group()
    with psycopg.connect(dsn) as conn:
        conn.execute("CREATE INDEX entities_name ON readstore.entities ((payload->>'name'))")
    big = "".join(f"{i:08x}" for i in range(2000))  # 16 kB of hex: does not compress below the btree limit
    events = [ev(topic_prefix, "customer", "a", "created", 0x10),
              ev(topic_prefix, "customer", "big", "created", 0x20, payload={"name": big}),
              ev(topic_prefix, "customer", "c", "created", 0x30)]
    ends = asyncio.run(produce(kafka_bootstrap, events))
    totals = asyncio.run(run_until(settings(dsn, kafka_bootstrap, topic_prefix, g), caught_up(dsn, g, ends), timeout=30))
    assert totals["refused"] == 1
    assert set(entities(dsn)) == {("customer", "a"), ("customer", "c")}
    parked = kcat_read(kafka_bootstrap, f"{topic_prefix}.customer.dlq")
    assert [r["key"] for r in parked] == ["s1:big"] and "index row" in parked[0]["headers"]["dlq_error"]


def test_deeply_nested_json_is_parked(
        readstore_db: str, kafka_bootstrap: str, topic_prefix: str, group: Callable[[], str]) -> None:
    dsn, g = readstore_db, group()
    deep = ev(topic_prefix, "customer", "deep", "created", 0x20)
    value = b"[" * 1000 + b"1" + b"]" * 1000
    events = [ev(topic_prefix, "customer", "a", "created", 0x10), (deep.topic, deep.key, value, deep.headers),
              ev(topic_prefix, "customer", "c", "created", 0x30)]
    ends = asyncio.run(produce(kafka_bootstrap, events))
    totals = asyncio.run(run_until(settings(dsn, kafka_bootstrap, topic_prefix, g), caught_up(dsn, g, ends), timeout=30))
    assert totals["rejected"] == 1
    assert set(entities(dsn)) == {("customer", "a"), ("customer", "c")}
    parked = kcat_read(kafka_bootstrap, f"{topic_prefix}.customer.dlq")
    assert [r["key"] for r in parked] == ["s1:deep"] and "nested" in parked[0]["headers"]["dlq_error"]

