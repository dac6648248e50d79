"""The read store sink: one current row per aggregate in a central PostgreSQL database.

Pure part (no I/O): :func:`classify` turns one Kafka record into a row to upsert or a rejection
(a record that breaks the event contract); :func:`plan_batch` reduces a batch to at most one
row per key, the one with the greatest source position, plus the next offset per partition.

I/O edge: :class:`ReadStore` (a ``DatabaseSink``, consumers/sink_offsets.py) parks the rejections in
``<topic>.dlq`` (consumers/dlq.py), then writes a plan in one transaction (one set-based upsert
guarded by the source position, the offsets); :func:`migrate` / :func:`migration_sql` run or
print the schema migrations; :func:`run_readstore` runs it (``outbox consume readstore``).
See docs/readstore.md.
"""
from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Annotated, Any, ClassVar

import click
import psycopg
from pydantic import Field

from outbox import contract
from outbox import dsn as dsnmod
from outbox.config import Cli, Dsn, KafkaSettings, RedriveSettings, SinkSettings
from outbox.consumers.dlq import Batch, DeadLetter, DeadLetters, RecordLike
from outbox.consumers.sink import run_sink
from outbox.consumers.sink_offsets import RETRIABLE, DatabaseSink, refused
from outbox.errors import NotInstalled

log = logging.getLogger(__name__)
logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)  # a line per plugin at INFO: noise

SCHEMA = "readstore"
_INT4_MAX = 2**31 - 1
# \u0000 that is not itself escaped (an odd number of backslashes before the 'u').
_JSON_NUL = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")


# --------------------------------------------------------------------------- pure: records
@dataclass(frozen=True, slots=True)
class Row:
    """One event as a row of readstore.entities."""

    source_id: str
    aggregate_type: str
    aggregate_id: str
    payload: str  # JSON text, checked; cast to jsonb in SQL
    event_id: str
    event_type: str
    commit_lsn: int
    txseq: int
    committed_at: datetime
    deleted: bool
    history: str | None = None  # ce_history: the WAL history the position belongs to (None: an older relay)
    reconcile_from: int | None = None  # an outbox.snapshot_complete marker: the backfill's start LSN

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.source_id, self.aggregate_type, self.aggregate_id)

    @property
    def position(self) -> tuple[int, int]:
        return (self.commit_lsn, self.txseq)


# A record that breaks the contract (a poison event): parked whole in <topic>.dlq (consumers/dlq.py).
Rejected = DeadLetter


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


_JSON = json.JSONDecoder(parse_constant=_reject_constant)  # NaN/Infinity: Python takes them, jsonb does not
_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")


def check_payload(value: bytes | None) -> str:
    """The payload as JSON text PostgreSQL's jsonb accepts; ValueError says why not."""
    if value is None:
        return "null"  # a Kafka tombstone: no image
    text = value.decode("utf-8")  # UnicodeDecodeError is a ValueError
    _JSON.decode(text)
    if "\\u0000" in text and _JSON_NUL.search(text):
        raise ValueError("contains \\u0000, which jsonb cannot store")
    return text


def classify(record: RecordLike) -> Row | Rejected:
    """Parse one record into a row, or say why it is poison. Never raises for bad input."""
    try:
        event = contract.parse_record(list(record.headers), record.value)
        payload = check_payload(record.value)
        for name in ("id", "source_id", "aggregate_type", "aggregate_id", "type"):
            text = getattr(event, name)
            if not text or "\x00" in text:
                raise ValueError(f"{name} is empty or contains a NUL character")
        if not _UUID.match(event.id):
            uuid.UUID(event.id)  # other spellings PostgreSQL's uuid also reads
        if not 0 <= event.position.seq <= _INT4_MAX:
            raise ValueError(f"{contract.H_TXSEQ} {event.position.seq} out of range")
        if event.time.tzinfo is None:
            raise ValueError(f"{contract.H_TIME} has no time zone")
        reconcile_from = None
        if event.type == contract.SNAPSHOT_COMPLETE_TYPE:
            marker = json.loads(payload)
            if not isinstance(marker, dict) or not isinstance(marker.get("start_lsn"), str):
                raise ValueError(f"{contract.SNAPSHOT_COMPLETE_TYPE} without a start_lsn")
            reconcile_from = contract.parse_lsn(marker["start_lsn"])
    except RecursionError:  # JSON nested deeper than Python's parser goes (about 1,000 levels)
        return DeadLetter.of(record, "ValueError: the payload is JSON nested too deeply to check")
    except (ValueError, UnicodeDecodeError) as exc:  # ContractError is a ValueError
        error = f"{type(exc).__name__}: {exc}".replace("\x00", "\\x00")
        return DeadLetter.of(record, error)
    return Row(
        source_id=event.source_id,
        aggregate_type=event.aggregate_type,
        aggregate_id=event.aggregate_id,
        payload=payload,
        event_id=event.id,
        event_type=event.type,
        commit_lsn=event.position.commit_lsn,
        txseq=event.position.seq,
        committed_at=event.time,
        deleted=contract.is_deletion(event.type),
        history=event.history,
        reconcile_from=reconcile_from,
    )


@dataclass(slots=True)
class Plan:
    """What one batch does to the read store."""

    rows: list[Row] = field(default_factory=list)  # at most one per key: the greatest position
    rejected: list[Rejected] = field(default_factory=list)
    offsets: dict[tuple[str, int], int] = field(default_factory=dict)  # (topic, partition) -> next offset
    received: int = 0
    records: dict[tuple[str, str, str], RecordLike] = field(default_factory=dict)  # the record behind each row
    truncations: list[Row] = field(default_factory=list)  # <aggregate>.truncated events, applied after the rows
    marks: list[tuple[Row, RecordLike]] = field(default_factory=list)  # outbox.snapshot_complete markers, in order
    tombstoned: int = 0  # rows the markers turned into tombstones (counted in what write returns)


def plan_batch(records: Iterable[RecordLike]) -> Plan:
    """Reduce a batch: per key keep the event with the greatest (commit_lsn, txseq).

    On equal positions (the same event delivered twice) the later record wins; they are equal.
    Deletes are events like any other: a delete after an update wins, an update older than a
    delete loses (here, and in SQL against the stored row).
    """
    best: dict[tuple[str, str, str], Row] = {}
    plan = Plan(records={})
    for record in records:
        plan.received += 1
        tp = (record.topic, record.partition)
        if record.offset + 1 > plan.offsets.get(tp, -1):
            plan.offsets[tp] = record.offset + 1
        item = classify(record)
        if isinstance(item, Rejected):
            plan.rejected.append(item)
            continue
        if contract.is_truncation(item.event_type):  # tombstones every older row of its source and type (TRUNCATE)
            plan.truncations.append(item)
            continue
        if item.reconcile_from is not None:
            plan.marks.append((item, record))
            continue
        current = best.get(item.key)
        # of two histories the later record is the newer one (positions of different histories do not compare)
        if (current is None or item.position >= current.position
                or (item.history != current.history and None not in (item.history, current.history))):
            best[item.key] = item
            plan.records[item.key] = record
    plan.rows = list(best.values())
    return plan


def row_columns(rows: Sequence[Row]) -> list[list[Any]]:
    """Column arrays for the set-based upsert (see UPSERT)."""
    return [
        [r.source_id for r in rows],
        [r.aggregate_type for r in rows],
        [r.aggregate_id for r in rows],
        [r.payload for r in rows],
        [r.event_id for r in rows],
        [r.event_type for r in rows],
        [contract.format_lsn(r.commit_lsn) for r in rows],
        [r.txseq for r in rows],
        [r.committed_at for r in rows],
        [r.deleted for r in rows],
    ]


# --------------------------------------------------------------------------- SQL
# Parameters go in binary (%b): dumping text arrays in text form costs psycopg a regex per
# element, and took two thirds of the apply time.
# One statement per batch. The WHERE clause is the idempotence guard: a duplicate, a replay or
# an older event (smaller position) changes nothing, and a tombstone is never resurrected.
# A delete without an image (JSON null) keeps the last image the row had.
UPSERT = """
INSERT INTO readstore.entities AS e
       (source_id, aggregate_type, aggregate_id, payload, event_id, event_type,
        commit_lsn, txseq, source_committed_at, applied_at, deleted)
SELECT u.source_id, u.aggregate_type, u.aggregate_id, u.payload::jsonb, u.event_id::uuid, u.event_type,
       u.commit_lsn::pg_lsn, u.txseq, u.committed_at, clock_timestamp(), u.deleted
  FROM unnest(%b::text[], %b::text[], %b::text[], %b::text[], %b::text[], %b::text[],
              %b::text[], %b::int4[], %b::timestamptz[], %b::bool[])
       AS u(source_id, aggregate_type, aggregate_id, payload, event_id, event_type,
            commit_lsn, txseq, committed_at, deleted)
  LEFT JOIN readstore.reconciled w ON w.source_id = u.source_id AND w.aggregate_type = u.aggregate_type
 WHERE w.start_lsn IS NULL OR u.commit_lsn::pg_lsn >= w.start_lsn
ON CONFLICT (source_id, aggregate_type, aggregate_id) DO UPDATE SET
       payload = CASE WHEN EXCLUDED.deleted AND jsonb_typeof(EXCLUDED.payload) = 'null'
                      THEN e.payload ELSE EXCLUDED.payload END,
       event_id = EXCLUDED.event_id,
       event_type = EXCLUDED.event_type,
       commit_lsn = EXCLUDED.commit_lsn,
       txseq = EXCLUDED.txseq,
       source_committed_at = EXCLUDED.source_committed_at,
       applied_at = EXCLUDED.applied_at,
       deleted = EXCLUDED.deleted
 WHERE (e.commit_lsn, e.txseq) < (EXCLUDED.commit_lsn, EXCLUDED.txseq)
"""

# <aggregate>.truncated: every row of that source and aggregate type older than the event becomes
# a tombstone (its last image kept). Rows of the same batch were upserted first: newer ones stay.
TRUNCATE = """
UPDATE readstore.entities SET deleted = true, event_id = %s::uuid, event_type = %s, commit_lsn = %s::pg_lsn,
       txseq = %s, source_committed_at = %s, applied_at = clock_timestamp()
 WHERE source_id = %s AND aggregate_type = %s AND (commit_lsn, txseq) < (%s::pg_lsn, %s)
"""

# An outbox.snapshot_complete marker (outbox backfill --reconcile): from now on events of that source
# and type below the backfill's start are stale (every row that existed got a snapshot at or after
# it, every later change is after it); live rows still below it were deleted while no event could
# say so: they become tombstones at (start, -1), under every event at or after the start.
RECONCILE_MARK = """
INSERT INTO readstore.reconciled AS r (source_id, aggregate_type, start_lsn, run, event_id)
VALUES (%(source)s, %(type)s, %(start)s::pg_lsn, %(run)s, %(event)s::uuid)
ON CONFLICT (source_id, aggregate_type) DO UPDATE SET start_lsn = EXCLUDED.start_lsn, run = EXCLUDED.run,
       event_id = EXCLUDED.event_id, applied_at = clock_timestamp()
 WHERE r.start_lsn < EXCLUDED.start_lsn
"""
RECONCILE_TOMBSTONES = """
UPDATE readstore.entities
   SET deleted = true, event_id = %(event)s::uuid, event_type = %(event_type)s, commit_lsn = %(start)s::pg_lsn,
       txseq = -1, source_committed_at = %(time)s, applied_at = clock_timestamp()
 WHERE source_id = %(source)s AND aggregate_type = %(type)s AND NOT deleted
   AND (commit_lsn, txseq) < (%(start)s::pg_lsn, -1)
"""
# The WAL history each source's stored positions belong to (locked: a concurrent reset waits).
LOAD_HISTORIES = "SELECT source_id, history FROM readstore.sources WHERE source_id = ANY(%s) FOR UPDATE"
ADOPT_HISTORY = """
INSERT INTO readstore.sources (source_id, history) VALUES (%s, %s)
ON CONFLICT (source_id) DO UPDATE SET history = EXCLUDED.history, since = clock_timestamp()
 WHERE readstore.sources.history IS NULL
"""


class _NewHistory(Exception):
    """Events of a source whose WAL history is not the one its stored positions belong to."""

    def __init__(self, sources: dict[str, tuple[str, str]]) -> None:
        super().__init__(sources)
        self.sources = sources  # source id -> (accepted history, history of the events)

    def reason(self, row: Row) -> str:
        accepted, seen = self.sources[row.source_id]
        return (f"NewHistory: source {row.source_id} sent WAL history {seen}, the read store holds positions of {accepted}: "
                f"run SELECT readstore.reset_source('{row.source_id}', '{seen}') (docs/operations.md), then re-drive")


def _run_of(mark: Row) -> int | None:
    run = json.loads(mark.payload).get("run")
    return run if isinstance(run, int) else None


# --------------------------------------------------------------------------- settings and command
class ReadStoreSettings(RedriveSettings, SinkSettings):
    """``outbox consume readstore``."""

    dsn: Annotated[Dsn, Field(description=(
        "Read store database: a libpq string ('dbname=readstore host=...') or a postgresql:// URL; PGHOST, PGPORT, "
        "PGUSER, PGPASSWORD... fill what it leaves out, as with psql."))]
    kafka: KafkaSettings
    topic_prefix: Annotated[str, Field(description=(
        "Consume every topic <prefix>.<aggregate_type> (not *.dlq); new topics are picked up within 5 s."))] = \
        contract.DEFAULT_TOPIC_PREFIX
    group: Annotated[str, Field(description="Kafka consumer group id.")] = "outbox-readstore"
    batch_size: Annotated[int, Field(ge=1, description="Records fetched and applied per database transaction.")] = 2000
    migrate: Annotated[bool, Field(description="Bring the readstore schema up to date before consuming."),
                       Cli(flag="--migrate/--no-migrate")] = True


def _print_sql(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    click.echo(migration_sql(), nl=False)
    ctx.exit(0)


_SQL_OPTION = click.option("--sql", is_flag=True, is_eager=True, expose_value=False, callback=_print_sql,
                           help="Print the schema migration SQL for review and exit (needs no server, touches nothing).")


# --------------------------------------------------------------------------- I/O: the database
class ReadStore(DatabaseSink[Plan]):
    """The read store database, as a sink for the Kafka loop. ``async with`` opens and closes it."""

    name = "readstore"  # the ``sink`` label of its metrics
    Settings = ReadStoreSettings
    client_id = "outbox-readstore"
    cli_options: ClassVar[dict[str, list[Any]]] = {"migrate": [_SQL_OPTION]}
    help = """Keep a central PostgreSQL read store current: one row per aggregate, in source order.

    Each batch is applied in one transaction together with its Kafka offsets; duplicates and
    older events change nothing; deletes leave tombstones (view readstore.current_entities
    hides them). Records that break the event contract are parked in <topic>.dlq. SIGTERM or
    SIGINT finishes the current batch and exits 0. See docs/readstore.md.
    """
    schema = SCHEMA
    application_name = "outbox-readstore"
    what = "read store"

    @classmethod
    def create(cls, settings: ReadStoreSettings) -> ReadStore:
        return cls(settings.dsn, settings.group).bounded(settings)

    @classmethod
    def prepare(cls, settings: ReadStoreSettings) -> None:
        if settings.migrate:
            migrate(settings.dsn)

    @classmethod
    def stopped(cls, totals: Mapping[str, int]) -> str:
        return f"stopped: {totals.get('records', 0)} records applied, {totals.get('rejected', 0)} rejected"

    async def preflight(self, conn: psycopg.AsyncConnection[Any]) -> None:
        head = _script_head()
        cur = await conn.execute("SELECT to_regclass('readstore.alembic_version') IS NOT NULL")
        row = await cur.fetchone()
        version = None
        if row and row[0]:
            cur = await conn.execute("SELECT version_num FROM readstore.alembic_version")
            found = await cur.fetchone()
            version = found[0] if found else None
        await conn.rollback()
        if version != head:
            where = dsnmod.describe(self.dsn)
            state = "is not installed" if version is None else f"is at revision {version}, not {head}"
            raise NotInstalled(f"the read store schema in {where} {state}: run outbox consume readstore "
                               "--migrate (the default), or review the SQL with --sql")

    # -- DatabaseSink
    async def plan(self, batch: Batch) -> Plan:
        plan = plan_batch(batch.records)
        for (topic, partition), offset in batch.offsets.items():  # the fetch may hold records not for us
            plan.offsets[(topic, partition)] = max(offset, plan.offsets.get((topic, partition), 0))
        return plan

    def offsets(self, plan: Plan, batch: Batch) -> Mapping[tuple[str, int], int]:
        return plan.offsets

    async def effect(self, conn: psycopg.AsyncConnection[Any], plan: Plan) -> Mapping[str, int]:
        changed = plan.tombstoned = 0
        async with conn.cursor() as cur:
            await self._check_histories(cur, plan)  # _NewHistory: write() parks that source's events
            for mark, _ in plan.marks:
                params = {"source": mark.source_id, "type": mark.aggregate_type, "event": mark.event_id,
                          "start": contract.format_lsn(mark.reconcile_from or 0), "run": _run_of(mark),
                          "event_type": mark.event_type, "time": mark.committed_at}
                await cur.execute(RECONCILE_MARK, params)
                await cur.execute(RECONCILE_TOMBSTONES, params)
                plan.tombstoned += cur.rowcount
            changed = plan.tombstoned
            if plan.rows:
                await cur.execute(UPSERT, row_columns(plan.rows))
                changed += cur.rowcount
            for t in plan.truncations:
                lsn = contract.format_lsn(t.commit_lsn)
                await cur.execute(TRUNCATE, (t.event_id, t.event_type, lsn, t.txseq, t.committed_at, t.source_id,
                                             t.aggregate_type, lsn, t.txseq))
                changed += cur.rowcount
        return {"changed": changed}

    async def apply(self, batch: Batch) -> dict[str, int]:
        plan = await self.plan(batch)
        checked = len(plan.rejected)
        changed = await self.write(plan, batch.dead_letters)
        # skipped: rows the guarded upsert left alone (duplicates, replays, events older than the stored row);
        # rejected: by the contract checks; refused: rows PostgreSQL refused (see write); both parked in <topic>.dlq
        return {"changed": changed, "skipped": max(0, len(plan.rows) - (changed - plan.tombstoned)), "rejected": checked,
                "refused": len(plan.rejected) - checked}

    async def write(self, plan: Plan, dead_letters: DeadLetters) -> int:
        """Park the plan's rejections, then write its rows and offsets in one transaction; returns
        how many rows changed. Retriable errors raise SinkUnavailable (or DeadLetterUnavailable).
        A row PostgreSQL refuses (a DataError the checks did not foresee, or a program limit, SQLSTATE
        class 54: an index row too large, a document nested too deeply) is found row by row, parked
        too (``plan`` is updated), and the batch goes through."""
        await dead_letters.park(plan.rejected)  # acknowledged by Kafka before the offsets pass them
        try:
            async with self.transaction(plan.offsets) as conn:
                return (await self.effect(conn, plan))["changed"]
        except _NewHistory as new:
            # refused loudly, never skipped by the position guard: parked in <topic>.dlq until the reset
            parked = [DeadLetter.of(record, new.reason(row)) for row, record in self._by_source(plan, new.sources)]
            for source, (accepted, seen) in sorted(new.sources.items()):
                log.error("read store: source %s sent events of WAL history %s, but its rows hold positions of "
                          "history %s (a restored backup, a promoted standby or a new cluster): its events are "
                          "parked in <topic>.dlq, not applied. Recovery (docs/operations.md#a-store-with-a-new-wal-history): "
                          "SELECT readstore.reset_source('%s', '%s'); then outbox replay --dlq and "
                          "outbox backfill --reconcile", source, seen, accepted, source, seen)
            self._drop_sources(plan, set(new.sources))
            await dead_letters.park(parked)
            plan.rejected.extend(parked)
            async with self.transaction(plan.offsets) as conn:
                return (await self.effect(conn, plan))["changed"]
        except psycopg.Error as exc:
            if not refused(exc):
                raise
            isolated = await self._isolate(plan)
            await dead_letters.park(isolated.rejected[len(plan.rejected):])
            plan.rows, plan.rejected = isolated.rows, isolated.rejected
            async with self.transaction(plan.offsets) as conn:
                return (await self.effect(conn, plan))["changed"]

    @staticmethod
    def _by_source(plan: Plan, sources: Mapping[str, object]) -> list[tuple[Row, RecordLike]]:
        return ([(row, plan.records[row.key]) for row in plan.rows if row.source_id in sources]
                + [(row, record) for row, record in plan.marks if row.source_id in sources])

    @staticmethod
    def _drop_sources(plan: Plan, sources: set[str]) -> None:
        plan.rows = [row for row in plan.rows if row.source_id not in sources]
        plan.marks = [(row, record) for row, record in plan.marks if row.source_id not in sources]

    async def _check_histories(self, cur: psycopg.AsyncCursor[Any], plan: Plan) -> None:
        """Adopt the history of a source seen for the first time; raise _NewHistory for another one."""
        seen: dict[str, str] = {}
        for row in [*plan.rows, *(row for row, _ in plan.marks)]:
            if row.history is not None:
                seen.setdefault(row.source_id, row.history)
        if not seen:
            return
        await cur.execute(LOAD_HISTORIES, (sorted(seen),))
        accepted = dict(await cur.fetchall())
        refused: dict[str, tuple[str, str]] = {}
        for row in [*plan.rows, *(row for row, _ in plan.marks)]:
            known = accepted.get(row.source_id)
            if row.history is None or known == row.history or row.source_id in refused:
                continue
            if known is None:
                await cur.execute(ADOPT_HISTORY, (row.source_id, row.history))
                accepted[row.source_id] = row.history
            else:
                refused[row.source_id] = (known, row.history)
        if refused:
            raise _NewHistory(refused)

    async def _isolate(self, plan: Plan) -> Plan:
        """Slow path: try each row alone (rolled back) to find the ones PostgreSQL refuses."""
        from outbox.consumers.kafka import SinkUnavailable

        good: list[Row] = []
        rejected = list(plan.rejected)
        conn = await self.connection()
        try:
            async with conn.transaction(force_rollback=True):
                for row in plan.rows:
                    try:
                        async with conn.transaction():
                            await conn.execute(UPSERT, row_columns([row]))
                        good.append(row)
                    except psycopg.Error as exc:
                        if not refused(exc):
                            raise
                        kind = "DataError" if isinstance(exc, psycopg.DataError) else type(exc).__name__
                        rejected.append(DeadLetter.of(plan.records[row.key], f"{kind}: {dsnmod.first_line(exc)}"))
        except RETRIABLE as exc:
            raise SinkUnavailable(f"{self.what}: {dsnmod.first_line(exc)}") from None
        return Plan(rows=good, rejected=rejected, offsets=plan.offsets, received=plan.received, records=plan.records,
                    truncations=plan.truncations, marks=plan.marks)


# --------------------------------------------------------------------------- migrations
def _alembic_config(buffer: io.StringIO | None = None) -> Any:
    from outbox import migrate

    return migrate.config(migrate.READSTORE, output=buffer)


def _script_head() -> str:
    from outbox import migrate

    return migrate.head(migrate.READSTORE)


def migrate(dsn: str, revision: str = "head") -> None:
    """Bring the read store schema to ``revision`` (online; idempotent; one migrator at a time)."""
    from alembic import command
    from sqlalchemy import create_engine

    dsnmod.parse(dsn)
    dsnmod.connect(dsn).close()  # one clear line when the database cannot be reached
    engine = create_engine("postgresql+psycopg://", creator=lambda: dsnmod.connect(dsn, application_name="outbox-readstore"))
    try:
        with engine.connect() as connection:
            cfg = _alembic_config()
            cfg.attributes["connection"] = connection
            command.upgrade(cfg, revision)
    finally:
        engine.dispose()


def migration_sql(revision: str = "head") -> str:
    """The SQL ``migrate`` would run on an empty database, for a DBA to review (Alembic offline mode)."""
    from alembic import command

    buffer = io.StringIO()
    command.upgrade(_alembic_config(buffer), revision, sql=True)
    return buffer.getvalue()


# --------------------------------------------------------------------------- wiring
async def run_readstore(settings: ReadStoreSettings, stop: asyncio.Event | None = None) -> Mapping[str, int]:
    """Apply events to the read store until ``stop`` is set (or SIGTERM/SIGINT when stop is None).

    The schema must be migrated first (``migrate``). Returns the totals (records, changed, rejected).
    """
    return await run_sink(ReadStore.create(settings), settings, stop)
