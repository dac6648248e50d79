"""The write-back sink: CRM changes from Kafka -> one store database's legacy tables (docs/crm.md).

The way back, step two (step one, the webhook receiver, is consumers/crm_inbound.py). A
``DatabaseSink`` (consumers/sink_offsets.py) on the store database: each batch in one transaction
with ``SET LOCAL outbox.origin = 'crm'`` (the capture trigger stamps it, so the CRM sink drops the
echo), the delivery ids it applied (a replayed webhook is a no-op) and the Kafka offsets, in the
schema ``outbox_crm`` that ``outbox install`` creates (store revision 0004): the write-back
creates nothing in the store database itself.
"""
from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Mapping as MappingABC, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any

import psycopg
from psycopg import sql
from pydantic import Field

from outbox.consumers import sink_offsets
from outbox.consumers.crm_logic import ORIGIN_CRM, Change, Mapping, load_mappings, mapping_for_kind, parse_change
from outbox.consumers.dlq import Batch, DeadLetter
from outbox.consumers.sink import run_sink
from outbox import contract, dsn as dsnmod
from outbox.config import Cli, Dsn, KafkaSettings, SinkSettings
from outbox.errors import ConfigError, NotInstalled


class CrmWritebackSettings(SinkSettings):
    """``outbox consume crm-writeback``: CRM changes from Kafka -> one store database's legacy tables."""

    dsn: Annotated[Dsn, Field(description="The store database whose legacy tables receive the CRM's changes.")]
    source_id: Annotated[str, Field(description=(
        "This store's source id: only records <source_id>:<id> are applied here."))]
    kafka: KafkaSettings
    topic: Annotated[str, Field(description="Kafka topic of the CRM's notifications.")] = "crm.changes"
    group: Annotated[str | None, Field(description=(  # None: outbox-crm-writeback-<source_id>
        "Kafka consumer group id [default: outbox-crm-writeback-<source-id>]."))] = None
    mapping: Annotated[str | None, Field(description=(
        "The sink's mapping file (CRM fields -> columns; 'table' names the legacy table) [default: contacts -> "
        "pos.customers, orders -> pos.orders].")), Cli(file=True)] = None
    batch_size: Annotated[int, Field(ge=1, description="Notifications per database transaction.")] = 500


# schema outbox_crm: store revision 0004 (migrations/store), made by outbox install. Read from the
# catalog, which needs no privilege; then whether this role may use it (outbox grant --writeback-role).
INSTALLED = """
SELECT count(*) = 2, bool_and(has_schema_privilege('outbox_crm', 'USAGE'))
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname = 'outbox_crm' AND c.relname IN ('applied', 'consumer_offsets') AND c.relkind = 'r'
"""
CLAIM = "INSERT INTO outbox_crm.applied (delivery_id) SELECT unnest(%s::text[]) ON CONFLICT DO NOTHING RETURNING delivery_id"


def update_statement(mapping: Mapping, columns: Sequence[str]) -> sql.Composed:
    """UPDATE of the mapped columns, typed by PostgreSQL itself (jsonb_populate_record), by key."""
    schema, _, table = (mapping.table or "").rpartition(".")
    target = sql.Identifier(schema, table) if schema else sql.Identifier(table)
    cols = sql.SQL(", ").join(sql.Identifier(c) for c in columns)
    return sql.SQL("UPDATE {t} AS t SET ({cols}) = (SELECT {cols} FROM jsonb_populate_record(NULL::{t}, %s::jsonb)) "
                   "WHERE t.{key}::text = %s").format(t=target, cols=cols, key=sql.Identifier(mapping.key_column))


@dataclass(slots=True)
class Plan:
    """What one batch does: the changes for this store, and the counts of the others."""

    batch: Batch
    changes: list[tuple[Any, Change, Mapping]] = field(default_factory=list)
    other: int = 0  # other stores' records: their own writeback applies them


class Writeback(sink_offsets.DatabaseSink[Plan]):
    """CRM changes -> one store database, with origin 'crm' so the CRM sink drops the echo."""

    name = "crm-writeback"
    Settings = CrmWritebackSettings
    client_id = "outbox-crm-writeback"
    help = """Apply CRM changes to a store database's legacy tables (the way back, step two).

    Writes run with outbox.origin = 'crm', so the capture trigger marks their events and the
    CRM sink does not send them back. A notification applied once is never applied again.
    See docs/crm.md.
    """
    schema = "outbox_crm"
    application_name = "outbox-crm-writeback"
    what = "store database"

    def __init__(self, dsn: str, source_id: str, group: str, mappings: MappingABC[str, Mapping]) -> None:
        super().__init__(dsn, group)
        self.source_id = source_id
        self.mappings = mappings

    @classmethod
    def create(cls, settings: CrmWritebackSettings) -> Writeback:
        group = settings.group or f"outbox-crm-writeback-{settings.source_id}"
        return cls(settings.dsn, settings.source_id, group, load_mappings(settings.mapping)).bounded(settings)

    @classmethod
    def stopped(cls, totals: MappingABC[str, int]) -> str:
        return f"stopped: {totals.get('changed', 0)} rows changed"

    def pattern(self, settings: CrmWritebackSettings) -> str:
        return f"^{re.escape(settings.topic)}$"

    # -- DatabaseSink
    async def preflight(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """outbox_crm must be installed (outbox install) and usable by this role (outbox grant --writeback-role)."""
        row = await (await conn.execute(INSTALLED)).fetchone()
        await conn.rollback()
        installed, usable = row if row else (False, None)
        where, user = dsnmod.describe(self.dsn), conn.info.user
        if not installed:
            raise NotInstalled(f"schema outbox_crm is missing in {where}: run outbox install --dsn ... on this "
                               "store database (it creates the write-back's tables)")
        if not usable:
            raise ConfigError(f"role {user} may not use schema outbox_crm in {where}: "
                              f"outbox grant --dsn ... --writeback-role {user} (as the owner)")

    async def plan(self, batch: Batch) -> Plan:
        plan = Plan(batch)
        letters = []
        for r in batch.records:
            try:
                change = parse_change(r.value)
            except ValueError as exc:
                letters.append(DeadLetter.of(r, f"{type(exc).__name__}: {exc}"))
                continue
            if change.source_id != self.source_id:
                plan.other += 1  # another store's record: its own writeback applies it
                continue
            mapping = mapping_for_kind(self.mappings, change.kind)
            if mapping is None:
                letters.append(DeadLetter.of(r, f"no mapping with a table for CRM kind {change.kind!r}"))
                continue
            plan.changes.append((r, change, mapping))
        if letters:
            await batch.dead_letters.park(letters)
        return plan

    async def effect(self, conn: psycopg.AsyncConnection[Any], plan: Plan) -> dict[str, int]:
        applied = 0
        missing: list[DeadLetter] = []
        # transaction-local: the capture trigger stamps it into outbox.events.origin
        await conn.execute("SELECT set_config(%s, %s, true)", (contract.ORIGIN_SETTING, ORIGIN_CRM))
        if plan.changes:
            fresh = {r[0] for r in await (await conn.execute(CLAIM, ([c.delivery_id for _, c, _ in plan.changes],))).fetchall()}
            for record, change, mapping in plan.changes:
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
            await plan.batch.dead_letters.park(missing)
        return {"changed": applied, "skipped": len(plan.changes) - applied - len(missing) + plan.other}


async def run_writeback(settings: CrmWritebackSettings, stop: asyncio.Event | None = None) -> MappingABC[str, int]:
    """Apply CRM changes to the store database until ``stop`` (or SIGTERM/SIGINT)."""
    return await run_sink(Writeback.create(settings), settings, stop)
