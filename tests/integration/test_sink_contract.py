"""One contract, every sink: the same abstract test class runs against each sink on the real servers.

:class:`SinkContract` states what every sink promises (design.md, "Consumers"): re-applying a
batch changes nothing; an older event after a newer one changes nothing; the effect and the
Kafka offsets it covers commit in one database transaction (a failure between them leaves
neither); a poison record is parked in ``<topic>.dlq`` with its reason while the rest is applied.
A subclass per sink says how to build its records and how to read its target. A new sink adds a
subclass here (docs/architecture.md, "Adding a sink").

Records are handed to the sink directly (``apply``, or ``submit`` for the pipelined CRM sink), as
the Kafka loop would; dead letters go to the real Kafka, effects to the real PostgreSQL and to the
reference CRM running as a process.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, ClassVar

import psycopg
import pytest
from aiokafka import TopicPartition

from outbox import contract
from outbox.config import KafkaSettings
from outbox.consumers import crm, crm_writeback, readstore
from outbox.consumers.crm_logic import DEFAULT_MAPPINGS, H_DELIVERY
from outbox.consumers.dlq import H_ERROR, H_GROUP, H_OFFSET, Batch, DeadLetters
from outbox.consumers.kafka import SinkUnavailable
from outbox.consumers.sink import Sink
from outbox.consumers.sink_offsets import SinkDatabase
from tests.support.crm import Crm
from tests.support.db import install_pos
from tests.support.kafka import kcat_read
from tests.support.records import Rec

pytestmark = pytest.mark.integration

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)



@dataclass
class Env:
    """What a test of one sink has: its topic, group, Kafka, and the sink's databases."""

    topic: str
    group: str
    kafka: KafkaSettings
    dsn: str  # the sink's own database (offsets live there)


class SinkContract(ABC):
    """The abstract contract; subclasses bind it to one sink."""

    #: True: an older event the sink has never seen (a new event id, a smaller source position) is
    #: refused by position. False: the sink orders by Kafka partition order, and the older event
    #: that can reach it after a newer one is a re-delivery (a replay, a rewind): the same event.
    guards_positions: ClassVar[bool] = True
    offsets_schema: ClassVar[str]

    # -- per sink
    @abstractmethod
    def env(self, request: pytest.FixtureRequest) -> Env: ...

    @abstractmethod
    def sink(self, env: Env) -> Sink: ...

    @abstractmethod
    def record(self, env: Env, key: str, version: int, offset: int, *, event_id: str | None = None) -> Rec:
        """Event ``version`` of ``key`` (greater versions are newer in the source)."""

    @abstractmethod
    def poison(self, env: Env, offset: int) -> Rec: ...

    @abstractmethod
    def effect(self, env: Env, key: str) -> int | None:
        """The version of ``key`` the sink's target holds (None: nothing)."""

    @abstractmethod
    def snapshot(self, env: Env) -> Any:
        """Everything a write to the target would change (timestamps, write logs), to compare."""

    def committed(self, env: Env, key: str) -> Any:
        """What the sink's transaction made durable for ``key`` (default: the effect itself)."""
        return self.effect(env, key)

    def database(self, sink: Sink) -> SinkDatabase:
        assert isinstance(sink, SinkDatabase)
        return sink

    async def apply(self, sink: Sink, records: Sequence[Rec], dead_letters: DeadLetters) -> None:
        """Hand ``records`` to the sink and return once they are durably done."""
        offsets: dict[tuple[str, int], int] = {}
        for r in records:
            offsets[(r.topic, r.partition)] = max(offsets.get((r.topic, r.partition), 0), r.offset + 1)
        await sink.apply(Batch(list(records), offsets, dead_letters))  # type: ignore[attr-defined]

    # -- helpers
    def stored(self, env: Env) -> dict[TopicPartition, int]:
        with psycopg.connect(env.dsn) as conn:
            rows = conn.execute(f"SELECT topic, partition, next_offset FROM {self.offsets_schema}.consumer_offsets "
                                "WHERE group_id = %s", (env.group,)).fetchall()
        return {TopicPartition(t, p): o for t, p, o in rows}

    def run(self, env: Env, scenario: Callable[[Sink, DeadLetters], Any]) -> None:
        async def main() -> None:
            sink = self.sink(env)
            dead_letters = DeadLetters(env.kafka, env.group)
            try:
                await sink.start()
                await scenario(sink, dead_letters)
            finally:
                await sink.close()
                await dead_letters.close()
        asyncio.run(main())

    # -- the contract
    def test_reapplying_a_batch_changes_nothing(self, request: pytest.FixtureRequest) -> None:
        env = self.env(request)
        batch = [self.record(env, "1", 1, 0), self.record(env, "2", 1, 1)]
        seen: list[Any] = []

        async def scenario(sink: Sink, dead_letters: DeadLetters) -> None:
            await self.apply(sink, batch, dead_letters)
            seen.append(self.snapshot(env))
            await self.apply(sink, batch, dead_letters)

        self.run(env, scenario)
        assert (self.effect(env, "1"), self.effect(env, "2")) == (1, 1)
        assert self.snapshot(env) == seen[0], "the second delivery of the batch changed the target"
        assert self.stored(env) == {TopicPartition(env.topic, 0): 2}

    def test_an_older_event_after_a_newer_one_changes_nothing(self, request: pytest.FixtureRequest) -> None:
        env = self.env(request)
        older = self.record(env, "1", 1, 0)
        newer = self.record(env, "1", 2, 1)
        late = self.record(env, "1", 1, 2) if self.guards_positions else older
        seen: list[Any] = []

        async def scenario(sink: Sink, dead_letters: DeadLetters) -> None:
            await self.apply(sink, [older, newer], dead_letters)
            assert self.effect(env, "1") == 2
            seen.append(self.snapshot(env))
            await self.apply(sink, [late], dead_letters)

        self.run(env, scenario)
        assert self.effect(env, "1") == 2
        assert self.snapshot(env) == seen[0], "an older event changed the target"

    def test_the_effect_and_its_offsets_commit_together(self, request: pytest.FixtureRequest) -> None:
        env = self.env(request)
        records = [self.record(env, "1", 1, 0)]
        between: list[Any] = []

        async def scenario(sink: Sink, dead_letters: DeadLetters) -> None:
            db = self.database(sink)
            save = db.save_offsets
            calls = 0

            async def failing(conn: Any, offsets: Any) -> None:
                nonlocal calls
                calls += 1
                if calls == 1:  # effect and offsets written, then the connection "drops" before the commit
                    await save(conn, offsets)
                    raise psycopg.OperationalError("injected: connection lost before the commit")
                between.append((self.committed(env, "1"), self.stored(env)))  # what the failed attempt left
                await save(conn, offsets)

            db.save_offsets = failing  # type: ignore[method-assign]
            try:
                await self.apply(sink, records, dead_letters)
            except SinkUnavailable:  # a batch sink: the loop would retry the batch
                await self.apply(sink, records, dead_letters)

        self.run(env, scenario)
        assert between == [(None, {})], "a failed transaction left part of its writes"
        assert self.committed(env, "1") is not None and self.effect(env, "1") == 1
        assert self.stored(env) == {TopicPartition(env.topic, 0): 1}

    def test_a_poison_record_is_parked_with_its_reason_and_the_rest_applied(self, request: pytest.FixtureRequest) -> None:
        env = self.env(request)
        batch = [self.record(env, "1", 1, 0), self.poison(env, 1), self.record(env, "2", 1, 2)]

        async def scenario(sink: Sink, dead_letters: DeadLetters) -> None:
            await self.apply(sink, batch, dead_letters)

        self.run(env, scenario)
        assert (self.effect(env, "1"), self.effect(env, "2")) == (1, 1)
        assert self.stored(env) == {TopicPartition(env.topic, 0): 3}
        parked = kcat_read(env.kafka.bootstrap, env.topic + contract.DLQ_SUFFIX)
        assert [(p["headers"][H_OFFSET], p["headers"][H_GROUP]) for p in parked] == [("1", env.group)]
        assert parked[0]["headers"][H_ERROR]


# --------------------------------------------------------------------------- events on Kafka
def event_record(topic: str, key: str, version: int, offset: int, event_id: str | None = None) -> Rec:
    prefix, _, aggregate = topic.partition(".")
    row = contract.OutboxRow(id=event_id or str(uuid.uuid4()), aggregatetype=aggregate, aggregateid=key,
                             type=f"{aggregate}.updated", payload=json.dumps({"id": key, "name": f"v{version}", "v": version}))
    lsn = 0x1000 + version * 0x100
    r = contract.build_record(row, source_id="s1", prefix=prefix, position=contract.Position(lsn, 0),
                              commit_time=T0 + timedelta(microseconds=lsn), xid=lsn)
    return Rec(r.topic, 0, offset, r.key, r.value, list(r.headers))


def version_of(name: str | None) -> int | None:
    return int(name[1:]) if name and name != "v0" else None


class TestReadStore(SinkContract):
    offsets_schema = "readstore"

    def env(self, request: pytest.FixtureRequest) -> Env:
        prefix = request.getfixturevalue("topic_prefix")
        return Env(f"{prefix}.customer", f"{prefix}-rs", KafkaSettings(bootstrap=request.getfixturevalue("kafka_bootstrap")),
                   request.getfixturevalue("readstore_db"))

    def sink(self, env: Env) -> Sink:
        return readstore.ReadStore(env.dsn, env.group)

    def record(self, env: Env, key: str, version: int, offset: int, *, event_id: str | None = None) -> Rec:
        return event_record(env.topic, key, version, offset, event_id)

    def poison(self, env: Env, offset: int) -> Rec:
        return Rec(env.topic, 0, offset, b"s1:x", b"{not json", [])

    def effect(self, env: Env, key: str) -> int | None:
        with psycopg.connect(env.dsn) as conn:
            row = conn.execute("SELECT payload->>'v' FROM readstore.entities WHERE aggregate_id = %s", (key,)).fetchone()
        return int(row[0]) if row else None

    def snapshot(self, env: Env) -> Any:
        with psycopg.connect(env.dsn) as conn:
            return conn.execute("SELECT aggregate_id, payload, event_id, applied_at FROM readstore.entities "
                                "ORDER BY 1").fetchall()


class TestCrmSink(SinkContract):
    """The CRM sink against the reference CRM as a real process; its ledger database holds the offsets."""

    # guarded by position: crm_sink.positions holds the newest event applied per CRM record
    offsets_schema = "crm_sink"

    @pytest.fixture(autouse=True)
    def _crm(self, new_database: Callable[..., str]) -> Iterator[None]:
        self.crm = Crm(new_database("crm")).start()
        yield
        self.crm.proc.close()

    def env(self, request: pytest.FixtureRequest) -> Env:
        prefix = request.getfixturevalue("topic_prefix")
        ledger = request.getfixturevalue("new_database")("ledger")
        return Env(f"{prefix}.customer", f"{prefix}-crm", KafkaSettings(bootstrap=request.getfixturevalue("kafka_bootstrap")),
                   ledger)

    def sink(self, env: Env) -> Sink:
        settings = crm.CrmSinkSettings(crm_url=self.crm.url, dsn=env.dsn, kafka=env.kafka, group=env.group,
                                       rate=500, burst=50, retry_base=0.05, retry_max=0.5)
        return crm.CrmSink.create(settings)

    def database(self, sink: Sink) -> SinkDatabase:
        assert isinstance(sink, crm.CrmSink)
        return sink.ledger

    async def apply(self, sink: Sink, records: Sequence[Rec], dead_letters: DeadLetters) -> None:
        assert isinstance(sink, crm.CrmSink)
        want = {}
        for r in records:
            want[TopicPartition(r.topic, r.partition)] = max(want.get(TopicPartition(r.topic, r.partition), 0), r.offset + 1)
        await sink.submit(list(records), dead_letters)
        done: dict[TopicPartition, int] = {}
        deadline = time.monotonic() + 60
        while not all(done.get(tp, -1) >= o for tp, o in want.items()):
            sink.check()
            assert time.monotonic() < deadline, f"the CRM sink did not finish: {done} of {want}"
            await asyncio.sleep(0.05)
            done.update(sink.completed()[0])

    def record(self, env: Env, key: str, version: int, offset: int, *, event_id: str | None = None) -> Rec:
        return event_record(env.topic, key, version, offset, event_id)

    def poison(self, env: Env, offset: int) -> Rec:
        return Rec(env.topic, 0, offset, b"s1:x", b"{}", [("ce_type", b"customer.updated")])  # no ce_id, no position

    def effect(self, env: Env, key: str) -> int | None:
        rows = self.crm.query("SELECT fields->>'name' FROM crm.records WHERE kind = 'contacts' AND external_id = %s",
                              f"s1:{key}")
        return version_of(rows[0][0]) if rows else None

    def committed(self, env: Env, key: str) -> Any:
        with psycopg.connect(env.dsn) as conn:
            rows = conn.execute("SELECT event_id FROM crm_sink.ledger WHERE group_id = %s AND external_id = %s",
                                (env.group, f"s1:{key}")).fetchall()
        return rows or None

    def snapshot(self, env: Env) -> Any:
        return (self.crm.query("SELECT kind, external_id, fields, version, updated_at FROM crm.records ORDER BY 1, 2"),
                self.crm.query("SELECT count(*) FROM crm.writes"))


class TestCrmWriteback(SinkContract):
    """CRM changes into a store's legacy table (with the outbox's capture trigger installed)."""

    guards_positions = False  # notifications carry no source position; a re-delivered one is claimed already
    offsets_schema = "outbox_crm"

    def env(self, request: pytest.FixtureRequest) -> Env:
        prefix = request.getfixturevalue("topic_prefix")
        store = request.getfixturevalue("new_database")("store")
        install_pos(store)
        with psycopg.connect(store) as conn:
            conn.execute("INSERT INTO pos.customers (id, name) VALUES (1, 'v0'), (2, 'v0')")
        return Env(f"{prefix}.crmchanges", f"{prefix}-wb", KafkaSettings(bootstrap=request.getfixturevalue("kafka_bootstrap")),
                   store)

    def sink(self, env: Env) -> Sink:
        return crm_writeback.Writeback(env.dsn, "store1", env.group, DEFAULT_MAPPINGS)

    def record(self, env: Env, key: str, version: int, offset: int, *, event_id: str | None = None) -> Rec:
        delivery = event_id or str(uuid.uuid4())
        body = {"id": delivery, "kind": "contacts", "external_id": f"store1:{key}", "fields": {"name": f"v{version}"}}
        return Rec(env.topic, 0, offset, f"store1:{key}".encode(), json.dumps(body).encode(),
                   [(H_DELIVERY, delivery.encode())])

    def poison(self, env: Env, offset: int) -> Rec:
        return Rec(env.topic, 0, offset, b"store1:1", b"{not json", [])

    def effect(self, env: Env, key: str) -> int | None:
        with psycopg.connect(env.dsn) as conn:
            row = conn.execute("SELECT name FROM pos.customers WHERE id = %s", (int(key),)).fetchone()
        return version_of(row[0]) if row else None

    def snapshot(self, env: Env) -> Any:
        with psycopg.connect(env.dsn) as conn:
            return (conn.execute("SELECT id, name FROM pos.customers ORDER BY 1").fetchall(),
                    conn.execute("SELECT count(*) FROM outbox.events").fetchall(),  # each write-back is captured
                    conn.execute("SELECT count(*) FROM outbox_crm.applied").fetchall())
