"""``outbox status``: one table of every store, its relay, and the read store's consumers.

Per store (read from the store database itself):

* **slot** and **relay** up/down: the slot is ``active`` while a relay streams from it;
* **slot lag**: ``pg_current_wal_lsn() - confirmed_flush_lsn``, the WAL the relay has not yet
  confirmed (confirmed = acknowledged by Kafka); it also includes WAL of other tables, so a
  busy database shows some bytes even when the outbox is idle;
* **behind s** (needs ``--readstore-dsn``): the age of the oldest event still in
  ``outbox.events`` that was committed after the newest event the read store has applied from
  this store, on the store's clock; 0 when there is none. End to end, store to read store.

Per consumer group (from ``readstore.consumer_offsets``): the lag against Kafka's last stable
offsets when ``--kafka-bootstrap`` is given.

The read store knows stores by source id (the relay's ``--source-id``), not by DSN. Status
finds which source id is which store by looking up, in each store's ``outbox.events``, the
newest event id the read store holds per source; ``--source-id DATABASE=ID`` says it outright.

Pure parts (:func:`rank`, :func:`render`) work on values; the queries are thin.
"""
from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from typing import Any

import click
import psycopg

from outbox import contract
from outbox.doctor import format_bytes
from outbox.dsn import connect, describe, first_line, parse
from outbox.errors import ConfigError, OutboxError

CONNECT_TIMEOUT = 5


@dataclass(frozen=True)
class StoreStatus:
    store: str  # host:port/db
    database: str | None = None
    source_id: str | None = None
    slot: str | None = None
    relay: str | None = None  # "up", "down", "no slot"
    wal_status: str | None = None
    slot_lag_bytes: int | None = None
    seconds_behind: float | None = None
    error: str | None = None  # "unreachable: <one line>"


@dataclass(frozen=True)
class GroupStatus:
    group: str
    partitions: int
    updated_seconds_ago: float
    lag: int | None = None  # records; None without Kafka


@dataclass(frozen=True)
class Report:
    at: str
    stores: tuple[StoreStatus, ...]
    readstore: str | None = None
    readstore_error: str | None = None
    groups: tuple[GroupStatus, ...] = ()
    kafka_error: str | None = None


@dataclass(frozen=True)
class _Applied:
    """What the read store has applied, per source id: newest commit time and that event's id."""

    committed_at: dict[str, datetime] = field(default_factory=dict)
    newest_event: dict[str, str] = field(default_factory=dict)


# =========================================================================== pure
def severity(s: StoreStatus) -> tuple[int, float, int]:
    """Sort key, worst first: unreachable, relay down or no slot, then seconds behind, then slot lag."""
    rank = 0 if s.error else 1 if s.relay != "up" else 2
    return (rank, -(s.seconds_behind or 0.0), -(s.slot_lag_bytes or 0))


def rank(stores: Sequence[StoreStatus]) -> list[StoreStatus]:
    return sorted(stores, key=lambda s: (severity(s), s.store))


def _cell(value: Any) -> str:
    return "-" if value is None else str(value)


def render(report: Report) -> str:
    """The terminal table (already ranked)."""
    rows: list[tuple[str, ...]] = [("STORE", "SOURCE", "SLOT", "RELAY", "SLOT LAG", "LAG BYTES", "BEHIND S", "WAL")]
    for s in report.stores:
        if s.error:
            rows.append((s.store, s.error))  # spans the other columns
            continue
        behind = None if s.seconds_behind is None else f"{s.seconds_behind:.1f}"
        rows.append((s.store, _cell(s.source_id), _cell(s.slot), _cell(s.relay), format_bytes(s.slot_lag_bytes)
                     if s.slot_lag_bytes is not None else "-", _cell(s.slot_lag_bytes), _cell(behind),
                     _cell(s.wal_status)))
    lines = [f"outbox status at {report.at}: {len(report.stores)} store{'s' if len(report.stores) != 1 else ''}, "
             "worst first"]
    lines += _table(rows)
    if report.readstore:
        lines.append("")
        if report.readstore_error:
            lines.append(f"read store {report.readstore}: {report.readstore_error}")
        else:
            lines.append(f"read store {report.readstore}"
                         + (f" (consumer lag unknown: {report.kafka_error})" if report.kafka_error else ""))
            groups = [("GROUP", "PARTITIONS", "LAG", "LAST APPLIED")]
            for g in report.groups:
                groups.append((g.group, str(g.partitions), _cell(g.lag), f"{g.updated_seconds_ago:.0f} s ago"))
            lines += _table(groups) if report.groups else ["no consumer group has applied anything yet"]
    return "\n".join(lines)


def _table(rows: Sequence[Sequence[str]]) -> list[str]:
    """Aligned columns; a shorter row's last cell runs on (an error message spanning the rest)."""
    full = [r for r in rows if len(r) == len(rows[0])]
    widths = [max(len(r[i]) for r in full) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def to_json(report: Report) -> dict[str, Any]:
    return asdict(report)


def parse_source_ids(values: Sequence[str]) -> dict[str, str]:
    mapping = {}
    for v in values:
        db, sep, source = v.partition("=")
        if not sep or not db or not source:
            raise ConfigError(f"invalid --source-id {v!r}: expected DATABASE=SOURCE_ID, e.g. demo_store1=store1")
        mapping[db] = source
    return mapping


# =========================================================================== reading
_STORE_SQL = """
SELECT current_database(), s.slot_name, s.active, s.wal_status,
       pg_wal_lsn_diff(pg_current_wal_lsn(), s.confirmed_flush_lsn)::bigint,
       to_regclass(%(events)s) IS NOT NULL
FROM (SELECT 1) one
LEFT JOIN LATERAL (SELECT * FROM pg_replication_slots
                   WHERE database = current_database() AND plugin = 'pgoutput'
                   ORDER BY slot_name = %(prefix)s || current_database() DESC, slot_name LIMIT 1) s ON true
"""

_EVENTS = f"{contract.SCHEMA}.{contract.EVENTS_TABLE}"


def read_store(dsn: str, applied: _Applied | None, source_ids: dict[str, str]) -> StoreStatus:
    """One store's row; never raises for an unreachable or broken store."""
    where = describe(dsn)
    try:
        with connect(dsn, autocommit=True, application_name="outbox-status", connect_timeout=CONNECT_TIMEOUT) as conn:
            row = conn.execute(_STORE_SQL, {"events": _EVENTS, "prefix": "outbox_"}).fetchone()
            assert row is not None
            database, slot, active, wal_status, lag, installed = row
            status = StoreStatus(where, database, source_ids.get(database), slot,
                                 None if slot is None else "up" if active else "down", wal_status, lag)
            if slot is None:
                status = replace(status, relay="no slot")
            if applied is not None and installed:
                status = _behind(conn, status, applied)
            return status
    except OutboxError as exc:
        return StoreStatus(where, error=_unreachable(exc.message, where))
    except psycopg.Error as exc:
        return StoreStatus(where, error=_unreachable(first_line(exc), where))


def _unreachable(message: str, where: str) -> str:
    message = message.removeprefix(f"cannot connect to {where}: ")
    return "unreachable: " + message.removesuffix(" (check --dsn and the PG* environment variables)")


def _behind(conn: psycopg.Connection[Any], status: StoreStatus, applied: _Applied) -> StoreStatus:
    source = status.source_id
    if source is None and applied.newest_event:
        hit = conn.execute(f"SELECT id::text FROM {_EVENTS} WHERE id = ANY(%s::uuid[]) LIMIT 1",
                           (list(applied.newest_event.values()),)).fetchone()
        if hit:
            source = next(s for s, e in applied.newest_event.items() if e == hit[0])
    if source is None and status.database in applied.committed_at:
        source = status.database
    since = applied.committed_at.get(source) if source else None
    if source is None:
        # never applied anything we can tie to this store: behind by its oldest event, if any
        row = conn.execute(f"SELECT extract(epoch FROM now() - min(created_at))::float8 FROM {_EVENTS}"
                           " WHERE type <> %s", (contract.HEARTBEAT_TYPE,)).fetchone()
    else:
        row = conn.execute(f"SELECT extract(epoch FROM now() - min(created_at))::float8 FROM {_EVENTS} "
                           "WHERE created_at > %s AND type <> %s", (since, contract.HEARTBEAT_TYPE)).fetchone()
    behind = row[0] if row and row[0] is not None else 0.0
    return replace(status, source_id=source, seconds_behind=max(behind, 0.0))


def read_readstore(dsn: str) -> tuple[_Applied, list[tuple[str, str, int, int, float]]]:
    """Per source: newest applied commit time and event; the consumer offsets of every group."""
    with connect(dsn, autocommit=True, application_name="outbox-status", connect_timeout=CONNECT_TIMEOUT) as conn:
        newest = conn.execute(
            "SELECT DISTINCT ON (source_id) source_id, source_committed_at, event_id::text FROM readstore.entities "
            "ORDER BY source_id, source_committed_at DESC").fetchall()
        offsets = conn.execute(
            "SELECT group_id, topic, partition, next_offset, extract(epoch FROM now() - updated_at)::float8 "
            "FROM readstore.consumer_offsets ORDER BY 1, 2, 3").fetchall()
    return (_Applied({s: t for s, t, _ in newest}, {s: e for s, _, e in newest}),
            [(g, t, p, o, a) for g, t, p, o, a in offsets])


async def _end_offsets(bootstrap: str, partitions: set[tuple[str, int]]) -> dict[tuple[str, int], int]:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                isolation_level="read_committed", request_timeout_ms=10_000)
    await consumer.start()
    try:
        existing = await consumer.topics()
        tps = [TopicPartition(t, p) for t, p in partitions if t in existing]
        ends = await asyncio.wait_for(consumer.end_offsets(tps), 15) if tps else {}
        return {(tp.topic, tp.partition): off for tp, off in ends.items()}
    finally:
        await consumer.stop()


def group_lags(offsets: Sequence[tuple[str, str, int, int, float]],
               ends: dict[tuple[str, int], int] | None) -> list[GroupStatus]:
    """Sum, per group, how far each partition's applied offset is behind its end (pure)."""
    groups: dict[str, list[tuple[str, int, int, float]]] = {}
    for g, t, p, o, age in offsets:
        groups.setdefault(g, []).append((t, p, o, age))
    out = []
    for g, parts in groups.items():
        lag = None if ends is None else sum(max(0, ends.get((t, p), o) - o) for t, p, o, _ in parts)
        out.append(GroupStatus(g, len(parts), min(a for *_, a in parts), lag))
    return sorted(out, key=lambda x: (-(x.lag or 0), x.group))


def collect(dsns: Sequence[str], *, readstore_dsn: str | None = None, kafka_bootstrap: str | None = None,
            source_ids: dict[str, str] | None = None) -> Report:
    applied: _Applied | None = None
    readstore_error = kafka_error = None
    groups: list[GroupStatus] = []
    if readstore_dsn:
        try:
            applied, offsets = read_readstore(readstore_dsn)
        except OutboxError as exc:
            readstore_error = _unreachable(exc.message, describe(readstore_dsn))
        except psycopg.Error as exc:
            readstore_error = "unreadable: " + first_line(exc) + " (is it migrated? outbox consume readstore ...)"
        else:
            ends = None
            if kafka_bootstrap:
                try:
                    ends = asyncio.run(_end_offsets(kafka_bootstrap, {(t, p) for _, t, p, _, _ in offsets}))
                except Exception as exc:  # any Kafka failure leaves the lag unknown, never a traceback
                    kafka_error = f"Kafka at {kafka_bootstrap}: {first_line(exc)}"
            groups = group_lags(offsets, ends)
    with ThreadPoolExecutor(max_workers=min(16, max(1, len(dsns)))) as pool:
        stores = list(pool.map(lambda d: read_store(d, applied, source_ids or {}), dsns))
    return Report(datetime.now(timezone.utc).isoformat(timespec="seconds"), tuple(rank(stores)),
                  describe(readstore_dsn) if readstore_dsn else None, readstore_error, tuple(groups), kafka_error)


# =========================================================================== click
@click.command()
@click.option("--dsn", "dsns", multiple=True, metavar="DSN",
              help="A store database (repeatable). In the config file: [status] dsns = [...].")
@click.option("--readstore-dsn", default=None, metavar="DSN",
              help="The read store: adds seconds behind per store and the consumer groups.")
@click.option("--kafka-bootstrap", default=None, metavar="HOST:PORT",
              help="Kafka, to show each consumer group's lag in records (plaintext connection).")
@click.option("--source-id", "source_ids", multiple=True, metavar="DATABASE=ID",
              help="The relay's --source-id for a database, when status cannot find it out (repeatable).")
@click.option("--watch", type=float, is_flag=False, flag_value=2.0, default=None, metavar="[SECONDS]",
              help="Refresh every SECONDS (default 2) until Ctrl-C.")
@click.option("--json", "as_json", is_flag=True, default=False,
              help="Print a JSON document (with --watch: one per line).")
def status(dsns: tuple[str, ...], readstore_dsn: str | None, kafka_bootstrap: str | None,
           source_ids: tuple[str, ...], watch: float | None, as_json: bool) -> None:
    """One table of every store: slot, relay up/down, slot lag, seconds behind; consumer lag.

    Stores come from --dsn or the config file's [status] table (dsns, readstore_dsn, ...).
    Worst first: unreachable stores, then relays down, then the furthest behind. Read-only.
    """
    if not dsns:
        raise ConfigError("name the stores: --dsn DSN (repeatable) or [status] dsns = [...] in --config")
    for d in (*dsns, *([readstore_dsn] if readstore_dsn else [])):
        parse(d)
    if watch is not None and watch <= 0:
        raise ConfigError("--watch SECONDS must be positive")
    mapping = parse_source_ids(source_ids)
    try:
        while True:
            report = collect(dsns, readstore_dsn=readstore_dsn, kafka_bootstrap=kafka_bootstrap, source_ids=mapping)
            if as_json:
                click.echo(json.dumps(to_json(report), indent=None if watch else 2, default=str))
            else:
                if watch:
                    click.clear()
                click.echo(render(report))
            if not watch:
                return
            time.sleep(watch)
    except KeyboardInterrupt:
        return
