"""Kafka offsets a sink keeps in its own database, written in the transaction of what they cover.

Every sink that owns a database (read store, CRM ledger, CRM write-back) stores the next offset
to read per (group, topic, partition) in a ``<schema>.consumer_offsets`` table and saves it
with each batch, so its database is the truth the consumer loop seeks to on assignment.

:class:`SinkDatabase` is that database: one connection (reopened when lost), the stored offsets
(read on a connection of their own), and :meth:`SinkDatabase.transaction`, which commits an
effect together with the offsets it covers. :class:`DatabaseSink` is a batch sink on it:
``plan`` (pure, dead letters parked), then ``effect`` and the offsets in one transaction.
"""
from __future__ import annotations

import contextlib
from abc import abstractmethod
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Self, TypeVar

import psycopg
from aiokafka import TopicPartition

from outbox import dsn as dsnmod
from outbox.config import SinkDbTimeouts
from outbox.consumers.sink import BatchSink
from outbox.errors import DatabaseUnavailable

if TYPE_CHECKING:
    from outbox.consumers.dlq import Batch

P = TypeVar("P")

# What can heal by itself: a lost connection, a failover, a serialization failure or deadlock, a lock
# or statement timeout (lock_timeout, statement_timeout), our session ended by
# idle_in_transaction_session_timeout (we were frozen; a reconnect follows), a server out of resources (SQLSTATE
# class 53: disk full, out of memory, too many connections). Not class 54 (program limit exceeded:
# "index row size exceeds btree maximum", "stack depth limit exceeded"): that is the row's doing and
# never heals; see ``retriable`` and ``refused``.
RETRIABLE = (psycopg.OperationalError, psycopg.errors.SerializationFailure, psycopg.errors.DeadlockDetected,
             psycopg.errors.IdleInTransactionSessionTimeout)  # our own session, ended while we were frozen
LIMIT_CLASS = "54"


def retriable(exc: BaseException) -> bool:
    """Whether a database error is worth retrying as is (see RETRIABLE)."""
    return isinstance(exc, RETRIABLE) and not refused(exc)


def refused(exc: BaseException) -> bool:
    """A row the database will never take: a data exception (class 22) or a program limit (class 54)."""
    if isinstance(exc, psycopg.DataError):
        return True
    return isinstance(exc, psycopg.Error) and (exc.sqlstate or "").startswith(LIMIT_CLASS)


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


class SinkDatabase:
    """A sink's own PostgreSQL database: connection, offsets table ``<schema>.consumer_offsets``, and
    transactions that write an effect with its offsets. ``async with`` or ``start``/``close``."""

    schema: ClassVar[str]  # holds consumer_offsets
    application_name: ClassVar[str]
    what: ClassVar[str] = "database"  # names it in retriable errors: "read store: <reason>"
    described_as: ClassVar[str] = ""  # prefix of the database in "cannot connect to ..." ("the ledger database ")
    setup_sql: ClassVar[str | None] = None  # DDL run at start (one migrator at a time: an advisory lock)

    def __init__(self, dsn: str, group: str, timeouts: SinkDbTimeouts | None = None) -> None:
        self.dsn = dsn
        self.group = group
        self.timeouts = timeouts or SinkDbTimeouts()
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._save = save_sql(self.schema)
        self._load = load_sql(self.schema)

    def bounded(self, timeouts: SinkDbTimeouts) -> Self:
        """Use these session bounds (the sink's settings: ``db_lock_timeout``...) on every connection; returns self."""
        self.timeouts = timeouts
        return self

    async def __aenter__(self) -> Any:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> psycopg.AsyncConnection[Any]:
        """A new connection; one line naming the database when it cannot be reached (DatabaseUnavailable)."""
        dsnmod.parse(self.dsn)
        try:
            conn = await psycopg.AsyncConnection.connect(self.dsn, application_name=self.application_name)
        except psycopg.OperationalError as exc:
            raise DatabaseUnavailable(f"cannot connect to {self.described_as}{dsnmod.describe(self.dsn)}: "
                                      f"{dsnmod.first_line(exc)} (check --dsn and the PG* environment variables)") from None
        try:  # session settings: bounded lock waits, statements and idle transactions (SinkDbTimeouts)
            names, values = zip(*self.timeouts.session_settings().items())
            await conn.execute("SELECT set_config(n, v, false) FROM unnest(%s::text[], %s::text[]) AS s(n, v)",
                               (list(names), list(values)))
            await conn.commit()
        except psycopg.OperationalError as exc:
            await conn.close()
            raise DatabaseUnavailable(f"{self.described_as or self.what + ' '}{dsnmod.describe(self.dsn)}: "
                                      f"{dsnmod.first_line(exc)}") from None
        except BaseException:
            await conn.close()
            raise
        return conn

    async def start(self) -> None:
        self._conn = await self.connect()
        try:
            await self.preflight(self._conn)
        except BaseException:
            await self.close()
            raise

    async def preflight(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Check or create what the sink needs; by default run ``setup_sql`` (idempotent DDL)."""
        if self.setup_sql:
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"{self.application_name} schema",))
            await conn.execute(self.setup_sql)  # our own constant DDL
            await conn.commit()

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()
            self._conn = None

    async def connection(self) -> psycopg.AsyncConnection[Any]:
        """The sink's connection, reopened when lost; SinkUnavailable (retriable) while it cannot be."""
        from outbox.consumers.kafka import SinkUnavailable

        if self._conn is None or self._conn.closed or self._conn.broken:
            if self._conn is not None:
                await self._conn.close()
                self._conn = None
            try:
                self._conn = await self.connect()
            except DatabaseUnavailable as exc:
                raise SinkUnavailable(exc.message) from None
        return self._conn

    async def stored_offsets(self, partitions: Sequence[TopicPartition]) -> dict[TopicPartition, int]:
        """Read on a connection of its own: it runs in Kafka's rebalance callback, which may come
        while a batch is being written on the main connection."""
        from outbox.consumers.kafka import SinkUnavailable

        try:
            conn = await self.connect()
        except DatabaseUnavailable as exc:
            raise SinkUnavailable(exc.message) from None
        try:
            return await load(conn, self._load, self.group, partitions)
        except RETRIABLE as exc:  # a lost connection, a lock timeout: the loop asks again
            raise SinkUnavailable(f"{self.what}: {dsnmod.first_line(exc)}") from None
        finally:
            await conn.close()

    async def save_offsets(self, conn: Any, offsets: Mapping[tuple[str, int], int]) -> None:
        """Write ``offsets`` inside the current transaction (the last step before its commit)."""
        await save(conn, self._save, self.group, offsets)

    @contextlib.asynccontextmanager
    async def transaction(self, offsets: Mapping[tuple[str, int], int]) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """``async with db.transaction(offsets) as conn:`` write the effect; the offsets are saved after it
        and both commit together, or neither does. Retriable failures raise SinkUnavailable."""
        from outbox.consumers.kafka import SinkUnavailable

        conn = await self.connection()
        try:
            async with conn.transaction():
                yield conn
                await self.save_offsets(conn, offsets)
        except RETRIABLE as exc:
            if not retriable(exc):  # a program limit (class 54): the caller isolates the row, or it is fatal
                raise
            raise SinkUnavailable(f"{self.what}: {dsnmod.first_line(exc)}") from None


class DatabaseSink(SinkDatabase, BatchSink, Generic[P]):
    """A batch sink whose effect lives in its own database (the read store, the CRM write-back).

    ``apply`` = ``plan`` (no writes; parks the records it cannot apply) + one transaction holding
    ``effect`` and the batch's offsets. A duplicate or an older event must change nothing in
    ``effect`` (a guard by position, or a tracking row): that is what makes re-delivery safe.
    """

    @abstractmethod
    async def plan(self, batch: Batch) -> P:
        """Decide what the batch does; park what can never be applied (before anything commits)."""

    @abstractmethod
    async def effect(self, conn: psycopg.AsyncConnection[Any], plan: P) -> Mapping[str, int]:
        """Write the plan inside the open transaction; return the counters (``changed``, ``skipped``...)."""

    def offsets(self, plan: P, batch: Batch) -> Mapping[tuple[str, int], int]:
        """The offsets the transaction records: by default, the whole fetch's."""
        return batch.offsets

    async def apply(self, batch: Batch) -> Mapping[str, int]:
        plan = await self.plan(batch)
        async with self.transaction(self.offsets(plan, batch)) as conn:
            return await self.effect(conn, plan)
