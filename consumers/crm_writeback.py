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
import logging
import re
from collections.abc import Mapping as MappingABC
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any

import psycopg
from psycopg import sql
from pydantic import Field

from outbox import contract
from outbox import dsn as dsnmod
from outbox.config import Cli, Dsn, KafkaSettings, SinkSettings
from outbox.consumers import sink_offsets
from outbox.consumers.crm_logic import ORIGIN_CRM, Change, Mapping, column_json, load_mappings, mapping_for_kind, parse_change
from outbox.consumers.dlq import Batch, DeadLetter
from outbox.consumers.sink import run_sink
from outbox.errors import ConfigError, NotInstalled

log = logging.getLogger(__name__)


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


def _target(mapping: Mapping) -> sql.Composable:
    schema, _, table = (mapping.table or "").rpartition(".")
    return sql.Identifier(schema, table) if schema else sql.Identifier(table)


def lock_statement(mapping: Mapping, columns: Sequence[str]) -> sql.Composed:
    """Lock the row by key and say, per column, whether it still holds what the CRM had before the edit,
    or already what the edit sets (no conflict either way; all typed by PostgreSQL: jsonb_populate_record).
    The key is compared as the column's own type (the parameter is untyped): the primary-key index is used."""
    same = sql.SQL(", ").join(sql.SQL("t.{c} IS NOT DISTINCT FROM p.{c} OR t.{c} IS NOT DISTINCT FROM n.{c}").format(
        c=sql.Identifier(c)) for c in columns)
    return sql.SQL("SELECT {same} FROM {t} AS t, jsonb_populate_record(NULL::{t}, %s::jsonb) AS p, "
                   "jsonb_populate_record(NULL::{t}, %s::jsonb) AS n WHERE t.{key} = %s FOR UPDATE OF t").format(
        same=same, t=_target(mapping), key=sql.Identifier(mapping.key_column))


def update_statement(mapping: Mapping, columns: Sequence[str]) -> sql.Composed:
    """UPDATE of the given columns, typed by PostgreSQL itself (jsonb_populate_record), by key."""
    cols = sql.SQL(", ").join(sql.Identifier(c) for c in columns)
    return sql.SQL("UPDATE {t} AS t SET ({cols}) = (SELECT {cols} FROM jsonb_populate_record(NULL::{t}, %s::jsonb)) "
                   "WHERE t.{key} = %s").format(t=_target(mapping), cols=cols, key=sql.Identifier(mapping.key_column))


class _Refused(Exception):
    """Some changes must be parked: roll the transaction back, park them outside it, go again."""


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

    async def apply(self, batch: Batch) -> MappingABC[str, int]:
        """``plan``, then one transaction for the changes, their delivery ids and the offsets.

        A change the store refuses (a constraint, no such row) is parked in ``<topic>.dlq``, but
        never from inside the transaction (that would hold the rows' locks while Kafka answers):
        the transaction is rolled back, the refused changes are parked, and the batch goes again
        without them. They are not claimed, so a re-drive of them applies.
        """
        plan = await self.plan(batch)
        refused: list[tuple[Any, DeadLetter]] = []
        while True:
            refused.clear()
            try:
                async with self.transaction(self.offsets(plan, batch)) as conn:
                    counts = await self._write(conn, plan, refused)
                    if refused:
                        raise _Refused
            except _Refused:
                await batch.dead_letters.park([letter for _, letter in refused])  # no transaction open on the store
                gone = {id(record) for record, _ in refused}
                plan.changes = [c for c in plan.changes if id(c[0]) not in gone]
                continue
            return counts

    async def effect(self, conn: psycopg.AsyncConnection[Any], plan: Plan) -> dict[str, int]:
        refused: list[tuple[Any, DeadLetter]] = []
        counts = await self._write(conn, plan, refused)
        if refused:
            raise _Refused
        return counts

    async def _write(self, conn: psycopg.AsyncConnection[Any], plan: Plan,
                     refused: list[tuple[Any, DeadLetter]]) -> dict[str, int]:
        applied = conflicts = 0
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
                    async with conn.transaction():  # a savepoint: a refused change is noted, the others go on
                        outcome = await self._write_one(conn, change, mapping, columns)
                except (psycopg.DataError, psycopg.IntegrityError) as exc:
                    refused.append((record, DeadLetter.of(record, f"{mapping.table} refused the change: "
                                                   f"{type(exc).__name__}: {dsnmod.first_line(exc)}")))
                    continue
                if outcome is None:
                    refused.append((record, DeadLetter.of(record, f"no row {mapping.key_column} = {change.aggregate_id} in "
                                                   f"{mapping.table} (records created in the CRM are not written back)")))
                    continue
                written, lost = outcome
                applied += bool(written)
                conflicts += bool(lost)
        skipped = len(plan.changes) - applied + plan.other
        return {"changed": applied, "skipped": skipped, "conflicts": conflicts}

    async def _write_one(self, conn: psycopg.AsyncConnection[Any], change: Change, mapping: Mapping,
                         columns: dict[str, Any]) -> tuple[list[str], list[str]] | None:
        """Write the columns the store has not changed since the CRM last had them; None: no such row.

        A column whose store value differs from the CRM's previous value was changed in the store
        meanwhile (its event is on its way to the CRM): the store wins, the column is left alone, and
        the other columns are written with origin unset, so their event carries the store's value to
        the CRM as well (the capture trigger skips an UPDATE that changes nothing, so when every
        column conflicts the store's own pending event is what brings the CRM in line).
        """
        names = sorted(columns)
        previous = mapping.previous_columns(change)
        row = await (await conn.execute(lock_statement(mapping, names), (
            column_json(previous if previous is not None else {}), column_json(columns), change.aggregate_id))).fetchone()
        if row is None:
            return None
        same = dict(zip(names, row)) if previous is not None else dict.fromkeys(names, True)
        written = [c for c in names if same[c]]
        lost = [c for c in names if not same[c]]
        if lost:
            log.info("CRM change %s of %s:%s: the store changed %s since the CRM had it; the store's value stays",
                     change.delivery_id, change.source_id, change.aggregate_id, ", ".join(lost))
        if written:
            if lost:  # origin unset: this event goes to the CRM, which then holds the store's value too
                await conn.execute("SELECT set_config(%s, '', true)", (contract.ORIGIN_SETTING,))
            await conn.execute(update_statement(mapping, written), (column_json(columns), change.aggregate_id))
            if lost:
                await conn.execute("SELECT set_config(%s, %s, true)", (contract.ORIGIN_SETTING, ORIGIN_CRM))
        return written, lost


async def run_writeback(settings: CrmWritebackSettings, stop: asyncio.Event | None = None) -> MappingABC[str, int]:
    """Apply CRM changes to the store database until ``stop`` (or SIGTERM/SIGINT)."""
    return await run_sink(Writeback.create(settings), settings, stop)
