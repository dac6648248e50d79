"""End to end: stores → relays → Kafka → read store, with relay kills and a full replay."""
from __future__ import annotations

import threading
import time
from collections.abc import Callable

import psycopg
import pytest

from outbox.dev.pos import run_workload
from tests.support.db import install_pos
from tests.support.processes import ConsumerProcess, RelayProcess, wait_converged
from tests.support.wait import wait_until

pytestmark = pytest.mark.integration


def table_checksum(dsn: str) -> tuple[int, str]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            "SELECT count(*), md5(string_agg(format('%s|%s|%s|%s|%s|%s', source_id, aggregate_type, aggregate_id,"
            " payload, event_id, deleted), ',' ORDER BY source_id, aggregate_type, aggregate_id))"
            " FROM readstore.entities").fetchone()  # type: ignore[return-value]


def test_read_store_converges_through_relay_kills_and_a_full_replay(
        new_database: Callable[..., str], topic_prefix: str, kafka_bootstrap: str) -> None:
    stores = {"s1": new_database("store"), "s2": new_database("store")}
    readstore = new_database("readstore")
    for dsn in stores.values():
        install_pos(dsn)
    relays = [RelayProcess(dsn, source, topic_prefix, kafka_bootstrap) for source, dsn in stores.items()]
    consumer = ConsumerProcess(readstore, topic_prefix, kafka_bootstrap, f"{topic_prefix}-rs")
    replayer = ConsumerProcess(readstore, topic_prefix, kafka_bootstrap, f"{topic_prefix}-replay")
    try:
        for r in relays:
            r.start()
        consumer.start()
        writers = [threading.Thread(target=run_workload, args=(dsn, 400, n)) for n, dsn in enumerate(stores.values())]
        for w in writers:
            w.start()
        time.sleep(1.0)
        relays[0].kill()  # at-least-once: what it had not confirmed is published again
        relays[0].start()
        for w in writers:
            w.join()
        wait_converged(readstore, stores, relays + [consumer])
        before = table_checksum(readstore)
        assert before[0] > 0

        # replay everything from the beginning under another group: the read store must not move
        consumer.terminate()
        replayer.start()
        with psycopg.connect(readstore, autocommit=True) as conn:
            total = sum(int(r.split()[-1]) for r in end_offsets(kafka_bootstrap, topic_prefix))
            applied = wait_until(
                lambda: conn.execute(
                    "SELECT coalesce(sum(next_offset), 0) FROM readstore.consumer_offsets WHERE group_id = %s",
                    (f"{topic_prefix}-replay",)).fetchone()[0],  # type: ignore[index]
                timeout=120, interval=0.3, until=lambda n: n >= total, message=f"the replay to apply {total} records")
            assert total > 0 and applied >= total, f"replay applied {applied} of {total} records"
        assert table_checksum(readstore) == before
        assert replayer.terminate() == 0
    finally:
        for p in relays + [consumer, replayer]:
            p.close()


def end_offsets(bootstrap: str, prefix: str) -> list[str]:
    """End offsets of every partition of the prefix's topics, as 'topic partition offset' lines."""
    import asyncio

    from aiokafka import AIOKafkaConsumer

    async def ends() -> list[str]:
        from aiokafka import TopicPartition
        from aiokafka.admin import AIOKafkaAdminClient

        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        c = AIOKafkaConsumer(bootstrap_servers=bootstrap)
        await admin.start()
        await c.start()
        try:
            topics = [t for t in await admin.list_topics() if t.startswith(prefix + ".")]
            described = await admin.describe_topics(topics)
            tps = [TopicPartition(d["topic"], p["partition"]) for d in described for p in d["partitions"]]
            return [f"{tp.topic} {tp.partition} {off}" for tp, off in (await c.end_offsets(tps)).items()]
        finally:
            await c.stop()
            await admin.close()

    return asyncio.run(ends())
