"""The PostgreSQL edge of the relay: preflight checks and the streaming replication connection.

Thin I/O: it opens a ``replication=database`` connection, starts pgoutput on the slot, hands
raw CopyData buffers to the caller and sends standby status updates. Decoding is in
``relay.pgoutput``; what to confirm is decided in ``relay.positions``.
"""
from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import pq

from outbox import contract
from outbox.config import slot_name_for
from outbox.dsn import connect, describe, first_line
from outbox.errors import DatabaseRefused, DatabaseUnavailable, NotInstalled, PreconditionFailed
from outbox.relay import pgoutput, policy
from outbox.relay.errors import SlotInUse as SlotInUse

log = logging.getLogger(__name__)


def pg_now_us() -> int:
    """The current time as microseconds since 2000-01-01 UTC: the clock of standby status updates."""
    return pgoutput.pg_time_us(time.time_ns())


_ACTIVE_PID = re.compile(r"is active for PID (\d+)")


@dataclass(frozen=True, slots=True)
class SlotInfo:
    name: str
    database: str
    confirmed_flush: int


def preflight(dsn: str, slot: str | None) -> SlotInfo:
    """Check the store database before streaming; every failure is one line naming the fix."""
    where = describe(dsn)
    with connect(dsn, autocommit=True, application_name="outbox-relay-preflight") as conn:
        wal_level = conn.execute("SHOW wal_level").fetchone()[0]  # type: ignore[index]
        if wal_level != "logical":
            raise PreconditionFailed(
                f"wal_level is '{wal_level}' on {where}: set wal_level = logical in postgresql.conf and restart PostgreSQL"
            )
        dbname, encoding = conn.execute("SELECT current_database(), current_setting('server_encoding')").fetchone()  # type: ignore[misc]
        if encoding != "UTF8":
            raise PreconditionFailed(
                f"database {dbname} on {where} is encoded {encoding}: the relay needs UTF8 (events are JSON text)"
            )
        name = slot or slot_name_for(dbname)
        pub = conn.execute("SELECT 1 FROM pg_publication WHERE pubname = %s", (contract.PUBLICATION,)).fetchone()
        if pub is None:
            raise NotInstalled(
                f"publication {contract.PUBLICATION} not found in {where}: install the outbox first (outbox install --dsn ...)"
            )
        row = conn.execute(
            "SELECT database, plugin, slot_type, active_pid, wal_status, confirmed_flush_lsn::text"
            " FROM pg_replication_slots WHERE slot_name = %s",
            (name,),
        ).fetchone()
    if row is None:
        raise PreconditionFailed(
            f"replication slot {name} does not exist on {where}: the relay never creates it from 'now' (events "
            "since it was dropped are gone from the WAL): re-create it with 'outbox install --dsn ...', then "
            "re-snapshot the tables with 'outbox backfill'"
        )
    database, plugin, slot_type, active_pid, wal_status, confirmed = row
    if slot_type != "logical" or plugin != "pgoutput" or database != dbname:
        raise PreconditionFailed(
            f"replication slot {name} on {where} is not a pgoutput slot of database {dbname} "
            f"(type {slot_type}, plugin {plugin}, database {database}): choose another --slot"
        )
    if wal_status == "lost":
        raise PreconditionFailed(
            f"replication slot {name} on {where} was invalidated (wal_status lost: WAL it needed was removed, "
            "events are missing): drop it (SELECT pg_drop_replication_slot(...)), re-create it with "
            "'outbox install --dsn ...', then re-snapshot the tables with 'outbox backfill'"
        )
    if active_pid is not None:
        raise SlotInUse(name, active_pid, where)
    return SlotInfo(name=name, database=dbname, confirmed_flush=contract.parse_lsn(confirmed) if confirmed else 0)


# One batch: the oldest rows before a cutoff fixed once per purge, read through the btree index
# events_created_at (store revision 0006), deleted by ctid (a TID scan, no second index lookup).
PURGE_BATCH_SQL = (
    f"DELETE FROM {contract.SCHEMA}.{contract.EVENTS_TABLE} WHERE ctid = ANY(ARRAY("
    f"SELECT ctid FROM {contract.SCHEMA}.{contract.EVENTS_TABLE} WHERE created_at < %s ORDER BY created_at LIMIT %s))"
)


@dataclass(frozen=True, slots=True)
class Purged:
    deleted: int
    batches: int
    stopped: bool = False  # ``stop`` said so before the last batch


def purge_events(dsn: str, older_than_s: float, batch: int = policy.PURGE_BATCH, *,
                 pause: float = policy.PURGE_PAUSE, statement_timeout: float = policy.PURGE_STATEMENT_TIMEOUT,
                 lock_timeout: float = policy.PURGE_LOCK_TIMEOUT, stop: Callable[[], bool] = lambda: False) -> Purged:
    """Delete published history from outbox.events (the WAL, not the table, carries events).

    Rows are only an audit trail once committed: the relay reads the WAL, so deleting them never
    loses an event. Each batch is one short statement (``statement_timeout``, ``lock_timeout``)
    over the btree index on created_at, and ``pause`` seconds separate batches, so catching up
    after an outage is a trickle of small deletes that autovacuum and the writers can keep up with.
    """
    deleted = batches = 0
    where = describe(dsn)
    try:
        with connect(dsn, autocommit=True, application_name="outbox-relay-purge", connect_timeout=10) as conn:
            conn.execute(f"SET statement_timeout = {int(statement_timeout * 1000)}")
            conn.execute(f"SET lock_timeout = {int(lock_timeout * 1000)}")
            cutoff = conn.execute("SELECT now() - make_interval(secs => %s)", (older_than_s,)).fetchone()[0]  # type: ignore[index]
            while True:
                if stop():
                    return Purged(deleted, batches, stopped=True)
                n = conn.execute(PURGE_BATCH_SQL, (cutoff, batch)).rowcount
                deleted += n
                batches += 1
                if n < batch:
                    return Purged(deleted, batches)
                time.sleep(pause)
    except psycopg.errors.QueryCanceled as exc:  # statement_timeout or lock_timeout
        raise DatabaseUnavailable(f"purge of {contract.SCHEMA}.{contract.EVENTS_TABLE} on {where} stopped after "
                                  f"{deleted} rows: {first_line(exc)} (statement_timeout "
                                  f"{statement_timeout:g} s, lock_timeout {lock_timeout:g} s); it goes on next time") from None
    except psycopg.errors.InsufficientPrivilege as exc:
        raise DatabaseRefused(f"cannot purge {contract.SCHEMA}.{contract.EVENTS_TABLE} on {where}: {first_line(exc)} "
                              "(GRANT DELETE on it to the relay's role, or --retention 0)") from None
    except psycopg.Error as exc:
        raise DatabaseUnavailable(f"cannot purge {contract.SCHEMA}.{contract.EVENTS_TABLE} on {where}: "
                                  f"{first_line(exc)}") from None


@dataclass(frozen=True, slots=True)
class SlotSample:
    """The slot as pg_replication_slots shows it, and the server's WAL end, at one moment."""

    wal_end: int  # pg_current_wal_lsn()
    wal_status: str | None  # reserved, extended, unreserved, lost; None when the slot is gone
    retained_bytes: int | None  # pg_current_wal_lsn() - restart_lsn
    safe_wal_size: int | None  # None without max_slot_wal_keep_size (or when lost)
    foreign_slots: int = 0  # logical slots of the cluster that outbox did not create (outbox doctor names them)


SLOT_SAMPLE = """
SELECT pg_current_wal_lsn()::text, s.wal_status, pg_wal_lsn_diff(pg_current_wal_lsn(), s.restart_lsn)::bigint,
       s.safe_wal_size,
       (SELECT count(*) FROM pg_replication_slots f WHERE f.slot_type = 'logical' AND f.slot_name <> %(slot)s
           AND NOT (f.slot_name LIKE 'outbox\\_%%' AND f.plugin = 'pgoutput'))::int
  FROM (SELECT 1) AS one LEFT JOIN pg_replication_slots AS s ON s.slot_name = %(slot)s
"""


HEARTBEAT_INSERT = (
    f"INSERT INTO {contract.SCHEMA}.{contract.EVENTS_TABLE} (aggregatetype, aggregateid, type, payload)"
    " VALUES (%s, %s, %s, jsonb_build_object('sent_at', clock_timestamp()))"
)


class SlotMonitor:
    """Samples the slot on an ordinary connection of its own (off the hot path, every few seconds).

    Blocking: call :meth:`sample` through ``asyncio.to_thread``. The connection is opened on
    first use and reopened after an error.
    """

    def __init__(self, dsn: str, slot: str) -> None:
        self._dsn = dsn
        self._slot = slot
        self._conn: psycopg.Connection[Any] | None = None

    def sample(self) -> SlotSample:
        try:
            if self._conn is None or self._conn.closed:
                self._conn = connect(self._dsn, autocommit=True, application_name="outbox-relay-monitor", connect_timeout=5)
            row = self._conn.execute(SLOT_SAMPLE, {"slot": self._slot}).fetchone()
        except psycopg.Error as exc:
            self.close()
            raise DatabaseUnavailable(f"cannot sample slot {self._slot}: {first_line(exc)}") from None
        assert row is not None
        wal_end, wal_status, retained, safe, foreign = row
        return SlotSample(contract.parse_lsn(wal_end), wal_status, retained, safe, foreign)

    def heartbeat(self, source_id: str) -> None:
        """Write a heartbeat row: it travels through the WAL and the slot like an event."""
        try:
            if self._conn is None or self._conn.closed:
                self._conn = connect(self._dsn, autocommit=True, application_name="outbox-relay-monitor", connect_timeout=5)
            self._conn.execute(HEARTBEAT_INSERT, (contract.HEARTBEAT_TYPE, source_id, contract.HEARTBEAT_TYPE))
        except psycopg.Error as exc:
            self.close()
            raise DatabaseUnavailable(f"cannot write a heartbeat into {contract.SCHEMA}.{contract.EVENTS_TABLE}: "
                                      f"{first_line(exc)} (GRANT INSERT on it to the relay's role, or --heartbeat-interval 0)") from None

    def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            try:
                conn.close()
            except psycopg.Error:  # already broken
                pass


PARK_INSERT = (
    f"INSERT INTO {contract.SCHEMA}.{contract.PARKED_TABLE} (id, aggregatetype, aggregateid, type, payload, origin,"
    " traceparent, created_at, topic, commit_lsn, xid, txseq, size_bytes, error)"
    " VALUES (%s, %s, %s, %s, %s::jsonb, %s, %s, (SELECT created_at FROM outbox.events WHERE id = %s::uuid),"
    " %s, %s::pg_lsn, %s, %s, %s, %s)"
    " ON CONFLICT (id) DO NOTHING"  # replayed after a restart: parked once
)


@dataclass(frozen=True, slots=True)
class ParkedEvent:
    row: contract.OutboxRow  # as the WAL carried it
    topic: str
    commit_lsn: int
    xid: int
    txseq: int
    size: int
    error: str


class Parker:
    """Writes events Kafka cannot take into outbox.parked (rare: one connection, opened on first use).

    Blocking: call :meth:`park` through ``asyncio.to_thread``; it returns once the row is committed
    and flushed (its session turns ``synchronous_commit`` on when the default is off).
    """

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self._conn: psycopg.Connection[Any] | None = None

    def park(self, event: ParkedEvent) -> None:
        r = event.row
        try:
            if self._conn is None or self._conn.closed:
                self._conn = connect(self._dsn, autocommit=True, application_name="outbox-relay-parker", connect_timeout=5)
                # The slot moves past the event once its marker is acknowledged: the parked row must be
                # on disk by then, whatever the role's or the database's default (issue #19 item 12).
                # (off only: local, remote_write, remote_apply already wait for the flush)
                self._conn.execute("SELECT set_config('synchronous_commit', 'on', false)"
                                   " WHERE current_setting('synchronous_commit') = 'off'")
            self._conn.execute(PARK_INSERT, (
                r.id, r.aggregatetype, r.aggregateid, r.type, r.payload, r.origin, r.traceparent, r.id, event.topic,
                contract.format_lsn(event.commit_lsn),
                event.xid, event.txseq, event.size, event.error))
        except psycopg.errors.UndefinedTable:
            raise NotInstalled(f"{contract.SCHEMA}.{contract.PARKED_TABLE} is missing on {describe(self._dsn)}: "
                               "upgrade the outbox with 'outbox install --dsn ...'") from None
        except psycopg.Error as exc:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            error = DatabaseRefused if isinstance(exc, psycopg.errors.InsufficientPrivilege) else DatabaseUnavailable
            raise error(f"cannot park event {r.id} in {contract.SCHEMA}.{contract.PARKED_TABLE}: {first_line(exc)}"
                        " (the relay's role needs INSERT on it: outbox install --relay-role ...)") from None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class ReplicationStream:
    """A logical replication stream of the outbox publication, read without blocking the loop."""

    def __init__(self, dsn: str, slot: str, publication: str = contract.PUBLICATION) -> None:
        self._dsn = dsn
        self._slot = slot
        self._publication = publication
        self._conn: psycopg.Connection[Any] | None = None
        self._readable = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        # ce_history of every event this stream sends: the cluster's WAL history (IDENTIFY_SYSTEM)
        self.history: bytes | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._conn = await asyncio.to_thread(
            connect, self._dsn, autocommit=True, replication="database", application_name="outbox-relay"
        )
        pgconn = self._conn.pgconn
        try:
            identified = await asyncio.to_thread(pgconn.exec_, b"IDENTIFY_SYSTEM")
        except psycopg.OperationalError as exc:
            self.close()
            raise DatabaseUnavailable(f"cannot identify the system of {describe(self._dsn)}: {first_line(exc)}") from None
        if identified.status == pq.ExecStatus.TUPLES_OK and identified.ntuples == 1:
            systemid, timeline = identified.get_value(0, 0), identified.get_value(0, 1)
            if systemid is not None and timeline is not None:
                self.history = contract.history_for(systemid.decode(), int(timeline)).encode()
        command = (
            f'START_REPLICATION SLOT "{self._slot}" LOGICAL 0/0 '
            f"(proto_version '1', publication_names '{self._publication}')"
        ).encode()
        try:
            result = await asyncio.to_thread(pgconn.exec_, command)
        except psycopg.OperationalError as exc:
            self.close()
            raise DatabaseUnavailable(f"cannot start replication on slot {self._slot}: {first_line(exc)}") from None
        if result.status != pq.ExecStatus.COPY_BOTH:
            message = first_line(RuntimeError((result.error_message or b"").decode(errors="replace")))
            self.close()
            active = _ACTIVE_PID.search(message)
            if active:
                raise SlotInUse(self._slot, int(active.group(1)), describe(self._dsn))
            if "does not exist" in message or "can no longer get changes" in message or "invalidated" in message:
                raise PreconditionFailed(f"cannot start replication on slot {self._slot}: {message}: re-create the slot "
                                         "with 'outbox install --dsn ...', then re-snapshot with 'outbox backfill'")
            raise DatabaseUnavailable(f"cannot start replication on slot {self._slot}: {message}")
        self._loop.add_reader(pgconn.socket, self._readable.set)

    async def read(self, timeout: float) -> list[pgoutput.XLogData | pgoutput.Keepalive]:
        """Everything the server has sent so far; waits up to ``timeout`` seconds when nothing is there."""
        assert self._conn is not None
        pgconn = self._conn.pgconn
        out: list[pgoutput.XLogData | pgoutput.Keepalive] = []
        for attempt in (0, 1):
            try:
                pgconn.consume_input()
                while True:
                    nbytes, data = pgconn.get_copy_data(1)
                    if nbytes > 0:
                        out.append(pgoutput.parse_copy_data(data))
                        continue
                    if nbytes == 0:
                        break
                    raise DatabaseUnavailable(f"replication stream ended: {self._error(pgconn)}")
            except psycopg.OperationalError as exc:
                raise DatabaseUnavailable(f"replication connection lost: {first_line(exc)}") from None
            if out or attempt:
                return out
            self._readable.clear()
            try:
                await asyncio.wait_for(self._readable.wait(), timeout)
            except TimeoutError:
                return out
        return out

    def send_status(self, write_lsn: int, flush_lsn: int, now_us: int, reply: bool = False) -> None:
        """A standby status update; ``now_us`` is the client clock (microseconds since 2000, :func:`pg_now_us`)."""
        assert self._conn is not None
        pgconn = self._conn.pgconn
        message = pgoutput.standby_status_update(write_lsn, flush_lsn, flush_lsn, now_us, reply)
        try:
            if pgconn.put_copy_data(message) != 1 or pgconn.flush() != 0:
                raise DatabaseUnavailable(f"cannot send status to PostgreSQL: {self._error(pgconn)}")
        except psycopg.OperationalError as exc:
            raise DatabaseUnavailable(f"replication connection lost: {first_line(exc)}") from None

    def close(self) -> None:
        if self._conn is None:
            return
        if self._loop is not None:
            try:
                self._loop.remove_reader(self._conn.pgconn.socket)
            except Exception:  # the socket may already be gone
                pass
        self._conn.close()
        self._conn = None

    @staticmethod
    def _error(pgconn: Any) -> str:
        result = pgconn.get_result()
        text = (result.error_message if result is not None else pgconn.error_message) or b""
        return text.decode(errors="replace").strip() or "no message"
