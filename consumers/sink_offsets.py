"""Kafka offsets a sink keeps in its own database, written in the transaction of what they cover.

Every sink that owns a database (read store, CRM ledger, CRM write-back) stores the next offset
to read per (group, topic, partition) in a ``<schema>.consumer_offsets`` table and saves it
with each batch, so its database is the truth the consumer loop seeks to on assignment.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from aiokafka import TopicPartition


def table_sql(schema: str) -> str:
    """DDL of the offsets table (the read store creates the same table in its Alembic migration)."""
    return f"""
CREATE TABLE IF NOT EXISTS {schema}.consumer_offsets (
    group_id    text NOT NULL,
    topic       text NOT NULL,
    partition   integer NOT NULL,
    next_offset bigint NOT NULL,
    updated_at  timestamptz NOT NULL,
    PRIMARY KEY (group_id, topic, partition)
);
"""


def save_sql(schema: str) -> str:
    return f"""
INSERT INTO {schema}.consumer_offsets AS o (group_id, topic, partition, next_offset, updated_at)
SELECT %s, u.topic, u.partition, u.next_offset, clock_timestamp()
  FROM unnest(%s::text[], %s::int4[], %s::int8[]) AS u(topic, partition, next_offset)
ON CONFLICT (group_id, topic, partition) DO UPDATE SET
       next_offset = EXCLUDED.next_offset, updated_at = EXCLUDED.updated_at
"""


def load_sql(schema: str) -> str:
    return f"""
SELECT topic, partition, next_offset FROM {schema}.consumer_offsets
 WHERE group_id = %s AND (topic, partition) IN (SELECT * FROM unnest(%s::text[], %s::int4[]))
"""


async def save(conn: Any, sql: str, group: str, offsets: Mapping[tuple[str, int], int]) -> None:
    """Save ``offsets`` (``(topic, partition) -> next offset``) with ``save_sql``, on a connection or cursor."""
    if offsets:
        tps = sorted(offsets)
        await conn.execute(sql, (group, [t for t, _ in tps], [p for _, p in tps], [offsets[tp] for tp in tps]))


async def load(conn: Any, sql: str, group: str, partitions: Sequence[TopicPartition]) -> dict[TopicPartition, int]:
    """The stored next offsets of ``partitions`` (those the sink knows), with ``load_sql``."""
    cur = await conn.execute(sql, (group, [tp.topic for tp in partitions], [tp.partition for tp in partitions]))
    return {TopicPartition(t, p): o for t, p, o in await cur.fetchall()}
