"""The way back: changes made in the CRM reach the store databases' legacy tables (docs/crm.md).

    CRM (agent edit) --webhook--> outbox consume crm-webhook --> Kafka topic crm.changes
        --> outbox consume crm-writeback (one per store) --> UPDATE pos.customers ... with
            outbox.origin = 'crm' --> capture trigger stamps origin 'crm' into the event
        --> relay --> Kafka --> the CRM sink skips it (ce_origin = crm): one hop, no loop.

- :func:`run_webhook_receiver`: an HTTP endpoint that answers the CRM only after Kafka has
  acknowledged the notification (acks=all), so an answered webhook is never lost; the CRM
  retries unanswered ones. Key: the record's external id (per-record order).
- :class:`Writeback`: a read-store-like sink on the store database: each batch in one
  transaction with ``SET LOCAL outbox.origin = 'crm'``, the delivery ids applied (a replayed
  webhook is a no-op) and the Kafka offsets, in the schema ``outbox_crm`` it creates.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
from collections.abc import Mapping as MappingABC, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from aiohttp import web
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError
from psycopg import sql

from outbox.consumers.crm_logic import ORIGIN_CRM, Mapping, load_mappings
from outbox.consumers import sink_offsets
from outbox.consumers.dlq import Batch, DeadLetter
from outbox.consumers.kafka import Progress, SinkUnavailable, run_consumer
from outbox import contract, dsn as dsnmod
from outbox.config import CrmWebhookSettings, CrmWritebackSettings
from outbox.secret import SIGNATURE_HEADER, sign
from outbox.signals import stop_on_signals
from outbox.errors import ConfigError, DatabaseUnavailable, KafkaUnavailable

log = logging.getLogger(__name__)

H_DELIVERY = "crm_delivery_id"


# --------------------------------------------------------------------------- pure: a change
@dataclass(frozen=True, slots=True)
class Change:
    """One CRM change notification, as the writeback applies it."""

    delivery_id: str
    kind: str
    source_id: str
    aggregate_id: str
    fields: dict[str, Any]


def parse_change(value: bytes | None) -> Change:
    """Read a notification (the reference CRM's webhook body); ValueError says why it is unusable."""
    body = json.loads(value or b"")
    if not isinstance(body, dict):
        raise ValueError("the notification is not a JSON object")
    delivery, kind, external_id, fields = (body.get(k) for k in ("id", "kind", "external_id", "fields"))
    if not all(isinstance(v, str) and v for v in (delivery, kind, external_id)) or not isinstance(fields, dict):
        raise ValueError("the notification needs id, kind, external_id (strings) and fields (an object)")
    source_id, sep, aggregate_id = str(external_id).partition(":")
    if not sep or not source_id or not aggregate_id:
        raise ValueError(f"external id {external_id!r} is not <source_id>:<aggregate_id>")
    return Change(str(delivery), str(kind), source_id, aggregate_id, fields)


def mapping_for_kind(mappings: MappingABC[str, Mapping], kind: str) -> Mapping | None:
    for m in mappings.values():
        if m.kind == kind and m.table:
            return m
    return None


# --------------------------------------------------------------------------- I/O: the webhook receiver
class WebhookReceiver:
    """POST /webhook -> the Kafka topic, acknowledged before the CRM gets its 204."""

    def __init__(self, settings: CrmWebhookSettings) -> None:
        self.s = settings
        self.port = settings.port
        self._secret = settings.secret.get_secret_value().encode() if settings.secret else None
        self._producer: AIOKafkaProducer | None = None
        self._runner: web.AppRunner | None = None
        self.received = 0

    async def start(self) -> None:
        self._producer = AIOKafkaProducer(**self.s.kafka.client_kwargs(), client_id="outbox-crm-webhook", acks="all",
                                          enable_idempotence=True, linger_ms=2)
        try:
            await self._producer.start()
        except KafkaError as exc:
            await self._producer.stop()
            raise KafkaUnavailable(f"cannot reach Kafka at {self.s.kafka.bootstrap}: {exc} (check --kafka-bootstrap)") from None
        # ask for the topic's metadata now: a broker that creates topics on demand creates it, so
        # the writebacks subscribed to it are assigned before the first notification arrives
        with contextlib.suppress(KafkaError, asyncio.TimeoutError):
            await asyncio.wait_for(self._producer.partitions_for(self.s.topic), 10)
        app = web.Application(client_max_size=1024 * 1024)
        app.add_routes([web.post("/webhook", self.webhook), web.get("/healthz", self.health)])
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.s.host, self.s.port)
        try:
            await site.start()
        except OSError as exc:
            await self.stop()
            raise ConfigError(f"cannot listen on {self.s.host}:{self.s.port}: {exc.strerror or exc} (choose another --port)") from None
        server = site._server  # noqa: SLF001 - the port chosen for --port 0
        assert server is not None and server.sockets
        self.port = server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._producer is not None:
            await self._producer.stop()

    async def health(self, _request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def webhook(self, request: web.Request) -> web.Response:
        body = await request.read()
        if self._secret is not None:
            given = request.headers.get(SIGNATURE_HEADER, "")
            if not hmac.compare_digest(given, sign(self._secret, body)):
                return web.json_response({"error": "bad or missing signature"}, status=401)
        try:
            change = parse_change(body)
        except ValueError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        assert self._producer is not None
        key = f"{change.source_id}:{change.aggregate_id}".encode()
        try:
            future = await self._producer.send(self.s.topic, value=body, key=key, headers=[
                (H_DELIVERY, change.delivery_id.encode()), (contract.H_CONTENT_TYPE, contract.CONTENT_TYPE.encode())])
            await asyncio.wait_for(future, 30)
        except (KafkaError, asyncio.TimeoutError) as exc:
            log.warning("webhook %s not taken: Kafka did not acknowledge it (%s)", change.delivery_id, exc)
            return web.json_response({"error": "Kafka unavailable, retry later"}, status=503, headers={"Retry-After": "5"})
        self.received += 1
        return web.Response(status=204)


async def run_webhook_receiver(settings: CrmWebhookSettings, stop: asyncio.Event | None = None,
                               started: asyncio.Event | None = None) -> int:
    """Serve until ``stop`` (or SIGTERM/SIGINT); returns how many notifications went to Kafka."""
    own_stop = stop is None
    stop = stop or asyncio.Event()
    receiver = WebhookReceiver(settings)
    await receiver.start()
    try:
        log.info("CRM webhooks on http://%s:%d/webhook -> Kafka topic %s", settings.host, receiver.port, settings.topic)
        if started is not None:
            started.set()
        with stop_on_signals(stop) if own_stop else contextlib.nullcontext():
            await stop.wait()
    finally:
        await receiver.stop()
    return receiver.received


# --------------------------------------------------------------------------- I/O: the writeback sink
WRITEBACK_SCHEMA = """
CREATE SCHEMA IF NOT EXISTS outbox_crm;
CREATE TABLE IF NOT EXISTS outbox_crm.applied (
    delivery_id text PRIMARY KEY,
    applied_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);
""" + sink_offsets.table_sql("outbox_crm")
CLAIM = "INSERT INTO outbox_crm.applied (delivery_id) SELECT unnest(%s::text[]) ON CONFLICT DO NOTHING RETURNING delivery_id"
SAVE_OFFSETS = sink_offsets.save_sql("outbox_crm")
LOAD_OFFSETS = sink_offsets.load_sql("outbox_crm")


def update_statement(mapping: Mapping, columns: Sequence[str]) -> sql.Composed:
    """UPDATE of the mapped columns, typed by PostgreSQL itself (jsonb_populate_record), by key."""
    schema, _, table = (mapping.table or "").rpartition(".")
    target = sql.Identifier(schema, table) if schema else sql.Identifier(table)
    cols = sql.SQL(", ").join(sql.Identifier(c) for c in columns)
    return sql.SQL("UPDATE {t} AS t SET ({cols}) = (SELECT {cols} FROM jsonb_populate_record(NULL::{t}, %s::jsonb)) "
                   "WHERE t.{key}::text = %s").format(t=target, cols=cols, key=sql.Identifier(mapping.key_column))


class Writeback:
    """CRM changes -> one store database, with origin 'crm' so the CRM sink drops the echo."""

    name = "crm-writeback"

    def __init__(self, dsn: str, source_id: str, group: str, mappings: MappingABC[str, Mapping]) -> None:
        self.dsn = dsn
        self.source_id = source_id
        self.group = group
        self.mappings = mappings
        self._conn: psycopg.AsyncConnection[Any] | None = None

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        try:
            return await psycopg.AsyncConnection.connect(self.dsn, application_name="outbox-crm-writeback")
        except psycopg.OperationalError as exc:
            raise DatabaseUnavailable(f"cannot connect to {dsnmod.describe(self.dsn)}: {dsnmod.first_line(exc)} "
                                      "(check --dsn and the PG* environment variables)") from None

    async def start(self) -> None:
        self._conn = await self._connect()
        await self._conn.execute("SELECT pg_advisory_xact_lock(hashtext('outbox-crm-writeback schema'))")
        await self._conn.execute(WRITEBACK_SCHEMA)
        await self._conn.commit()

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()

    async def stored_offsets(self, partitions: Sequence[TopicPartition]) -> dict[TopicPartition, int]:
        conn = await self._connect()
        try:
            return await sink_offsets.load(conn, LOAD_OFFSETS, self.group, partitions)
        finally:
            await conn.close()

    async def apply(self, batch: Batch) -> dict[str, int]:
        changes: list[tuple[Any, Change, Mapping]] = []
        letters = []
        other = 0
        for r in batch.records:
            try:
                change = parse_change(r.value)
            except ValueError as exc:
                letters.append(DeadLetter.of(r, f"{type(exc).__name__}: {exc}"))
                continue
            if change.source_id != self.source_id:
                other += 1  # another store's record: its own writeback applies it
                continue
            mapping = mapping_for_kind(self.mappings, change.kind)
            if mapping is None:
                letters.append(DeadLetter.of(r, f"no mapping with a table for CRM kind {change.kind!r}"))
                continue
            changes.append((r, change, mapping))
        if letters:
            await batch.dead_letters.park(letters)
        if self._conn is None or self._conn.closed or self._conn.broken:
            try:
                self._conn = await self._connect()
            except DatabaseUnavailable as exc:
                raise SinkUnavailable(exc.message) from None
        try:
            applied, missing = await self._write(self._conn, changes, batch)
        except (psycopg.OperationalError, psycopg.errors.SerializationFailure, psycopg.errors.DeadlockDetected) as exc:
            raise SinkUnavailable(f"store database: {dsnmod.first_line(exc)}") from None
        return {"changed": applied, "skipped": len(changes) - applied - missing + other}

    async def _write(self, conn: psycopg.AsyncConnection[Any], changes: list[tuple[Any, Change, Mapping]],
                     batch: Batch) -> tuple[int, int]:
        applied = 0
        missing: list[DeadLetter] = []
        async with conn.transaction():
            # transaction-local: the capture trigger stamps it into outbox.events.origin
            await conn.execute("SELECT set_config(%s, %s, true)", (contract.ORIGIN_SETTING, ORIGIN_CRM))
            if changes:
                fresh = {r[0] for r in await (await conn.execute(CLAIM, ([c.delivery_id for _, c, _ in changes],))).fetchall()}
                for record, change, mapping in changes:
                    if change.delivery_id not in fresh:
                        continue  # a webhook delivered twice: applied the first time
                    fresh.discard(change.delivery_id)
                    columns = mapping.columns(change.fields)
                    if not columns:
                        continue
                    try:
                        async with conn.transaction():  # a savepoint: a refused change is parked, the batch goes on
                            cur = await conn.execute(update_statement(mapping, sorted(columns)),
                                                     (json.dumps(columns), change.aggregate_id))
                    except (psycopg.DataError, psycopg.IntegrityError) as exc:
                        missing.append(DeadLetter.of(record, f"{mapping.table} refused the change: "
                                                             f"{type(exc).__name__}: {dsnmod.first_line(exc)}"))
                        continue
                    if cur.rowcount:
                        applied += 1
                    else:
                        missing.append(DeadLetter.of(record, f"no row {mapping.key_column} = {change.aggregate_id} in "
                                                             f"{mapping.table} (records created in the CRM are not written back)"))
            if missing:  # parked before the transaction (and its offsets) commits
                await batch.dead_letters.park(missing)
            await sink_offsets.save(conn, SAVE_OFFSETS, self.group, batch.offsets)
        return applied, len(missing)


async def run_writeback(settings: CrmWritebackSettings, stop: asyncio.Event | None = None) -> MappingABC[str, int]:
    """Apply CRM changes to the store database until ``stop`` (or SIGTERM/SIGINT)."""
    own_stop = stop is None
    stop = stop or asyncio.Event()
    group = settings.group or f"outbox-crm-writeback-{settings.source_id}"
    progress = Progress(f"crm-writeback[{group}]")
    sink = Writeback(settings.dsn, settings.source_id, group, load_mappings(settings.mapping))
    await sink.start()
    try:
        with stop_on_signals(stop) if own_stop else contextlib.nullcontext():
            await run_consumer(settings.kafka, group=group, pattern=f"^{_escape(settings.topic)}$", sink=sink, stop=stop,
                               batch_size=settings.batch_size, client_id="outbox-crm-writeback", progress=progress)
    finally:
        await sink.close()
    return progress.totals


def _escape(topic: str) -> str:
    import re

    return re.escape(topic)
