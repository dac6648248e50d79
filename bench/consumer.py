"""``python -m bench consumer``: how fast the read store applies events.

N events are produced beforehand onto one topic of 3 partitions, built exactly as the relay
builds them (``contract.build_record``: ~400-byte JSON order payloads, CloudEvents headers,
transactions of 10 events) with an aiokafka producer (acks=all, idempotent). Every event has
its own aggregate id, so nothing collapses inside a batch: the worst case for the read store.
Then ``run_readstore`` (in this process, default batch size) starts on a fresh, migrated read
store database and is timed until the offsets it stores with each batch cover all N events.
The rate is quoted from its start (consumer group join included) and from its first applied
batch (the steady apply rate).
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from datetime import datetime, timezone
from typing import Any

import psycopg

from bench.common import Result, Scratch, bootstrap, create_topics, figure, median, say, spread
from outbox import contract

NAME = "consumer"


def payload(i: int) -> str:
    return json.dumps({
        "id": i, "customer_id": 48213 + i % 977, "status": "paid", "total": "44.80", "currency": "EUR",
        "placed_at": "2024-05-06T07:08:09.123456+00:00", "note": None,
        "store": {"id": "store-0042", "register": 3, "cashier": "Zoë Müller"},
        "lines": [{"sku": "SKU-01029", "qty": 2, "unit_price": "19.90"}, {"sku": "SKU-02231", "qty": 1, "unit_price": "5.00"},
                  {"sku": "SKU-00017", "qty": 3, "unit_price": "12.30"}],
        "ref": uuid.uuid4().hex,
    }, ensure_ascii=False)


async def produce(topic_prefix: str, count: int) -> float:
    """Produce ``count`` relay-shaped events; returns events/s of the producer."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap(), enable_idempotence=True, acks="all", linger_ms=5,
                                max_batch_size=512 * 1024)
    await producer.start()
    started = time.perf_counter()
    try:
        now = datetime.now(timezone.utc)
        for i in range(count):
            row = contract.OutboxRow(id=str(uuid.uuid4()), aggregatetype="order", aggregateid=str(i),
                                     type="order.created", payload=payload(i))
            record = contract.build_record(row, source_id="bench", prefix=topic_prefix,
                                           position=contract.Position(0x1000000 + (i // 10) * 256, i % 10),
                                           commit_time=now, xid=1000 + i // 10)
            await producer.send(record.topic, value=record.value, key=record.key, headers=record.headers)
        await producer.flush()
    finally:
        await producer.stop()
    return count / (time.perf_counter() - started)


async def _applied(conn: psycopg.AsyncConnection[Any], group: str) -> int:
    cur = await conn.execute("SELECT coalesce(sum(next_offset), 0) FROM readstore.consumer_offsets WHERE group_id = %s",
                             (group,))
    row = await cur.fetchone()
    return int(row[0]) if row else 0


async def run(quick: bool, events: int | None = None, runs: int | None = None) -> Result:
    from outbox.config import KafkaSettings
    from outbox.consumers.readstore import ReadStoreSettings, migrate, run_readstore

    n = events or (10_000 if quick else 100_000)
    runs = runs or (1 if quick else 3)
    result = Result(NAME, quick, params={"events": n, "runs": runs, "partitions": 3, "batch_size": 2000,
                                          "keys": "one aggregate id per event"})
    with Scratch() as scratch:
        prefix = scratch.topic_prefix("bench-cons")
        await create_topics([f"{prefix}.order"])
        produce_rate = await produce(prefix, n)
        say(f"produced {n} events ({produce_rate:,.0f}/s with aiokafka)")
        for i in range(runs):
            db = scratch.database("bench_cons_rs")
            await asyncio.to_thread(migrate, f"dbname={db}")
            group = f"{prefix}-rs{i}"
            settings = ReadStoreSettings(dsn=f"dbname={db}", kafka=KafkaSettings(bootstrap=bootstrap()),
                                         topic_prefix=prefix, group=group)
            stop = asyncio.Event()
            async with await psycopg.AsyncConnection.connect(dbname=db, autocommit=True) as conn:
                started = time.perf_counter()
                task = asyncio.create_task(run_readstore(settings, stop))
                first_at, first_count = None, 0
                while True:
                    done = await _applied(conn, group)
                    now = time.perf_counter()
                    if done and first_at is None:
                        first_at, first_count = now, done
                    if done >= n:
                        break
                    if task.done():
                        task.result()
                        raise RuntimeError("run_readstore stopped early")
                    if now - started > 300:
                        raise RuntimeError(f"read store applied {done} of {n} events in 300 s")
                    await asyncio.sleep(0.02)
                stop.set()
                await task
            run_ = {"run": i + 1, "events_per_s": n / (now - started), "seconds": now - started,
                    "startup_s": (first_at or now) - started,
                    "steady_events_per_s": (n - first_count) / (now - first_at) if first_at and now > first_at else float("nan")}
            result.runs.append(run_)
            say(f"run {i + 1}/{runs}: {run_['events_per_s']:,.0f} events/s from start, "
                f"{run_['steady_events_per_s']:,.0f}/s after the first batch")
    f = result.figures
    for k in ("events_per_s", "steady_events_per_s", "startup_s"):
        f[k] = median([r[k] for r in result.runs])
    f["produce_events_per_s"] = produce_rate
    print(f"consumer: read store applying {n} pre-produced events, median of {runs} run(s)")
    figure(NAME, "read-store apply (after first batch)", f["steady_events_per_s"], "events/s",
           spread([r["steady_events_per_s"] for r in result.runs]))
    figure(NAME, "read-store apply (from start, group join incl.)", f["events_per_s"], "events/s",
           spread([r["events_per_s"] for r in result.runs]))
    figure(NAME, "aiokafka producer (pre-producing)", produce_rate, "events/s")
    result.save()
    return result
