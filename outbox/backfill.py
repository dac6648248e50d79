"""``outbox backfill``: emit ``<aggregate>.snapshot`` events for the existing rows of a captured table.

Safe while the application writes and the relay streams (docs/backfill.md argues it): each chunk
of rows, read in primary-key order (keyset pagination, composite keys too), is locked
``FOR SHARE`` and written as snapshot events into ``outbox.events`` in ONE short transaction,
together with the chunk's progress in the audit table ``outbox.backfills``. A concurrent update
or delete of a row in the chunk therefore commits wholly before the chunk (the snapshot reads
its result) or wholly after it (its event comes later in the WAL, so later in Kafka and with a
greater position): a snapshot image can never overwrite a newer change in any sink that applies
a partition in order. This is the lock-based form of the DBLog watermark algorithm: the chunk's
transaction is the window, and locking it closes it to writers instead of having the relay
de-duplicate inside it.

Pure part: :func:`key_sql`, :func:`chunk_sql`, :class:`Progress` formatting. I/O: :func:`run_backfill`.
"""
from __future__ import annotations

import getpass
import json
import logging
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, TextIO

import click
import psycopg

from outbox import contract
from outbox.config import BackfillSettings, options_for, settings_from
from outbox.dsn import connect, describe, first_line
from outbox.errors import NotInstalled, OutboxError, PreconditionFailed
from outbox.install import quote_ident, quote_literal

log = logging.getLogger(__name__)

SNAPSHOT_SUFFIX = ".snapshot"
AUDIT_TABLE = f"{contract.SCHEMA}.backfills"
# A chunk waits at most this long for a row a writer holds, then gives way and is retried. Shorter
# than PostgreSQL's deadlock_timeout (1 s by default) minus a chunk's duration: in a lock cycle
# with a writer (a transaction updating several rows out of key order) the chunk always times out
# before the writer's deadlock check runs, so writers never get a deadlock error from a backfill.
LOCK_TIMEOUT = "200ms"
# A chunk's rows stay locked FOR SHARE until it commits: a writer that hits one waits for the whole
# chunk. Bounded: a chunk that takes longer is cancelled (its locks go) and the run stops, resumable.
CHUNK_STATEMENT_TIMEOUT = "2s"
CHUNK_RETRIES = 50
PLAIN_EVERY = 5.0  # seconds between progress lines when stderr is not a terminal
BAR_EVERY = 0.2
_LOCK_NAMESPACE = 0x6F62  # advisory lock (namespace, table oid): one backfill per table at a time


# The end of a --reconcile run: written here, not through outbox.emit (which refuses outbox.* types).
MARKER_SQL = (f"INSERT INTO {contract.SCHEMA}.{contract.EVENTS_TABLE} (aggregatetype, aggregateid, type, payload) "
              "VALUES (%s, %s, %s, %s::jsonb)")


class BackfillError(OutboxError):
    """A backfill cannot start or cannot go on (table, capture, WHERE clause)."""


# --------------------------------------------------------------------------- pure: SQL
def snapshot_type(aggregate: str) -> str:
    return aggregate + SNAPSHOT_SUFFIX


def key_sql(columns: Sequence[str], image: str = "image") -> str:
    """The aggregate id from a row image, exactly as the capture trigger computes it."""
    if len(columns) == 1:
        return f"{image} ->> {quote_literal(columns[0])}"
    parts = [f"replace(replace({image} ->> {quote_literal(c)}, '\\', '\\\\'), ':', '\\:')" for c in columns]
    return " || ':' || ".join(parts)


@dataclass(frozen=True)
class Target:
    """A captured table as the backfill sees it."""

    table: str  # quoted, schema-qualified
    oid: int
    aggregate: str
    keys: tuple[str, ...]
    key_types: tuple[str, ...]

    def cols(self, alias: str = "t") -> str:
        return ", ".join(f"{alias}.{quote_ident(k)}" for k in self.keys)


def chunk_sql(t: Target, where: str | None, after: bool, *, emit: bool) -> str:
    """One chunk: the next rows after the last key (``%(n)s`` of them), locked, as snapshot events.

    Parameters: ``n`` (chunk size), ``k0``.. (the last key, when ``after``), ``run`` (audit id, when
    ``emit``). Returns one row: rows emitted, rows the chunk's range held, then the chunk's last
    key as text values (NULLs when no row is left: the walk is done).

    The range is fixed first, from the statement's snapshot and without locks (``b``: the next n
    keys; its greatest key is the chunk's upper bound), then the rows inside it are locked. A row
    whose key a concurrent transaction changes while the chunk waits for its lock comes back from
    ``FOR SHARE`` as its new version (PostgreSQL's EvalPlanQual re-checks the new version against
    the WHERE clause): with the bound in that clause it is dropped when its new key left the range,
    and the walk goes on from the bound, never from the moved row's new key, so no row in between is
    skipped. The moved row is captured anyway: its update's own event, and later chunks at its new key.
    """
    conditions = [f"({where.replace('%', '%%')})"] if where else []
    if after:
        params = ", ".join(f"%(k{i})s::{typ}" for i, typ in enumerate(t.key_types))
        conditions.append(f"({t.cols()}) > ({params})")
    where_sql = f" WHERE {' AND '.join(conditions)}" if conditions else ""
    order = t.cols()
    keys = ", ".join(quote_ident(k) for k in t.keys)
    bound = (f"b AS MATERIALIZED (SELECT {order} FROM {t.table} t{where_sql} ORDER BY {order} LIMIT %(n)s), "
             f"bound AS (SELECT {keys} FROM b ORDER BY {_order_desc(t, 'b')} LIMIT 1)")
    last = ", ".join(f"(SELECT {quote_ident(k)}::text FROM bound)" for k in t.keys)
    if not emit:
        return f"WITH {bound} SELECT (SELECT count(*) FROM b), (SELECT count(*) FROM b), {last}"
    in_range = " AND ".join([*conditions, f"({order}) <= (SELECT {keys} FROM bound)"])
    select = (f"SELECT {order}, to_jsonb(t) AS image FROM {t.table} t WHERE {in_range} ORDER BY {order} LIMIT %(n)s"
              " FOR SHARE OF t")
    return (
        f"WITH {bound}, c AS ({select}), "
        f"e AS (INSERT INTO {contract.SCHEMA}.{contract.EVENTS_TABLE} (aggregatetype, aggregateid, type, payload) "
        f"SELECT {quote_literal(t.aggregate)}, {key_sql(t.keys, 'c.image')}, {quote_literal(snapshot_type(t.aggregate))}, "
        f"c.image FROM c ORDER BY {t.cols('c')}) "
        f"SELECT (SELECT count(*) FROM c), (SELECT count(*) FROM b), {last}"
    )


def _order_desc(t: Target, alias: str) -> str:
    return ", ".join(f"{alias}.{quote_ident(k)} DESC" for k in t.keys)


# --------------------------------------------------------------------------- pure: progress
def format_duration(seconds: float) -> str:
    s = int(max(0, seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


@dataclass
class Progress:
    """Rows done of an estimated total; a bar on a terminal, plain lines otherwise."""

    total: int
    out: TextIO
    tty: bool
    done: int = 0
    started: float = 0.0
    _shown: float = 0.0

    def __post_init__(self) -> None:
        self.started = self._shown = time.monotonic()

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = self.done / elapsed
        total = max(self.total, self.done)
        eta = format_duration((total - self.done) / rate) if rate > 0 else "?"
        pct = 100.0 * self.done / total if total else 100.0
        return f"{self.done:,}/{total:,} rows ({pct:.0f}%), {rate:,.0f} rows/s, ETA {eta}"

    def add(self, rows: int) -> None:
        self.done += rows
        now = time.monotonic()
        if now - self._shown < (BAR_EVERY if self.tty else PLAIN_EVERY):
            return
        self._shown = now
        self.show()

    def show(self) -> None:
        if self.tty:
            total = max(self.total, self.done)
            filled = int(30 * self.done / total) if total else 30
            self.out.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {self.line()}   ")
        else:
            self.out.write(f"backfill: {self.line()}\n")
        self.out.flush()

    def finish(self) -> None:
        self.show()
        if self.tty:
            self.out.write("\n")
            self.out.flush()


# --------------------------------------------------------------------------- I/O
@dataclass
class Outcome:
    run_id: int
    rows: int
    chunks: int
    seconds: float
    result: str
    resumed_from: int | None = None


def _target(conn: psycopg.Connection[Any], table: str, where_db: str) -> Target:
    row = conn.execute("SELECT c.oid, format('%%I.%%I', n.nspname, c.relname) FROM pg_class c "
                       "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = to_regclass(%s)", (table,)).fetchone()
    if row is None or row[0] is None:
        raise BackfillError(f"table {table} does not exist in {where_db} (give it as SCHEMA.TABLE)")
    oid = row[0]
    if conn.execute("SELECT to_regclass(%s) IS NULL", (AUDIT_TABLE,)).fetchone() == (True,):
        raise NotInstalled(f"{AUDIT_TABLE} does not exist in {where_db}: run outbox install --dsn ... "
                           "(it upgrades the outbox schema)")
    cap = conn.execute(f"SELECT aggregate_type, key_columns FROM {contract.SCHEMA}.captures "
                       "WHERE to_regclass(table_name) = %s::oid", (oid,)).fetchone()
    if cap is None:
        raise BackfillError(f"table {table} is not captured in {where_db}: outbox install --dsn ... "
                            f"--capture {table}=AGGREGATE first")
    aggregate, keys = cap[0], tuple(cap[1])
    types = dict(conn.execute("SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute "
                              "WHERE attrelid = %s AND attname = ANY(%s) AND NOT attisdropped", (oid, list(keys))).fetchall())
    missing = [k for k in keys if k not in types]
    if missing:
        raise BackfillError(f"table {table} no longer has its key column(s) {', '.join(missing)}: "
                            "capture it again with outbox install")
    return Target(row[1], oid, aggregate, keys, tuple(types[k] for k in keys))


def _refuse_row_security(conn: psycopg.Connection[Any], t: Target, where_db: str) -> None:
    """Row-level security would silently leave rows out of the snapshot, unless this role bypasses it."""
    row = conn.execute("SELECT c.relrowsecurity AND NOT (r.rolsuper OR r.rolbypassrls OR (pg_has_role(c.relowner, "
                       "'USAGE') AND NOT c.relforcerowsecurity)), current_user FROM pg_class c, pg_roles r "
                       "WHERE c.oid = %s AND r.rolname = current_user", (t.oid,)).fetchone()
    if row is not None and row[0]:
        raise BackfillError(f"{t.table} has row-level security enabled on {where_db} and role {row[1]} does not bypass "
                            "it: its snapshot would silently miss the rows its policies hide; run the backfill as a "
                            "role with BYPASSRLS (or the table's owner, without FORCE ROW LEVEL SECURITY)")


def _estimate(conn: psycopg.Connection[Any], t: Target, where: str | None, exact: bool) -> int:
    """Rows to emit: EXPLAIN's estimate (which also checks the WHERE clause), or an exact count."""
    where_sql = f" WHERE ({where})" if where else ""
    try:
        with conn.transaction():
            if exact:
                return int(conn.execute(f"SELECT count(*) FROM {t.table} t{where_sql}").fetchone()[0])  # type: ignore[index]
            plan = conn.execute(f"EXPLAIN (FORMAT JSON) SELECT 1 FROM {t.table} t{where_sql}").fetchone()[0]  # type: ignore[index]
    except psycopg.Error as exc:
        raise BackfillError(f"--where {where!r} fails on {t.table}: {first_line(exc)}") from None
    return int(plan[0]["Plan"]["Plan Rows"])


def _resume_point(conn: psycopg.Connection[Any], s: BackfillSettings, t: Target) -> tuple[int | None, list[str] | None]:
    row = conn.execute(
        f"SELECT id, last_key FROM {AUDIT_TABLE} WHERE to_regclass(table_name) = %s::oid AND source_id = %s "
        "AND where_clause IS NOT DISTINCT FROM %s AND result NOT IN ('done', 'dry-run') ORDER BY id DESC LIMIT 1",
        (t.oid, s.source_id, s.where)).fetchone()
    if row is None:
        return None, None
    return row[0], row[1]


@contextmanager
def _stop_on_signals() -> Iterator[Callable[[], bool]]:
    """SIGINT/SIGTERM: finish the current chunk, then stop (resumable)."""
    stopped = {"sig": False}

    def handler(signum: int, _frame: Any) -> None:
        stopped["sig"] = True
        log.info("%s received: stopping after the current chunk", signal.Signals(signum).name)

    previous = [(sig, signal.signal(sig, handler)) for sig in (signal.SIGINT, signal.SIGTERM)]
    try:
        yield lambda: stopped["sig"]
    finally:
        for sig, old in previous:
            signal.signal(sig, old)


def run_backfill(s: BackfillSettings, *, out: TextIO | None = None, tty: bool | None = None,
                 stop: Callable[[], bool] | None = None) -> Outcome:
    """Emit snapshot events for the table's rows, chunk by chunk; returns what was done."""
    out = out or sys.stderr
    tty = out.isatty() if tty is None else tty
    where_db = describe(s.dsn)
    with connect(s.dsn, autocommit=True, application_name="outbox-backfill") as conn:
        if conn.execute("SELECT to_regclass(%s) IS NULL", (f"{contract.SCHEMA}.captures",)).fetchone() == (True,):
            raise NotInstalled(f"no outbox in {where_db}: outbox install --dsn ... --capture {s.table}=AGGREGATE first")
        t = _target(conn, s.table, where_db)
        if s.reconcile and (s.where or s.resume):
            raise BackfillError("--reconcile needs the whole table in one run: without --where (sinks would drop the "
                                "rows it leaves out) and without --resume (the earlier run's snapshots are older "
                                "than this run's start); run outbox backfill --reconcile again from the first row")
        _refuse_row_security(conn, t, where_db)
        if not conn.execute("SELECT pg_try_advisory_lock(%s, %s)", (_LOCK_NAMESPACE, t.oid)).fetchone()[0]:  # type: ignore[index]
            raise PreconditionFailed(f"another outbox backfill of {t.table} is running on {where_db}: wait for it, "
                                     "or stop it and run again with --resume")
        # we hold the table's lock: runs still marked running were killed
        conn.execute(f"UPDATE {AUDIT_TABLE} SET result = 'killed', finished_at = coalesce(finished_at, clock_timestamp()) "
                     "WHERE to_regclass(table_name) = %s::oid AND result = 'running'", (t.oid,))
        total = _estimate(conn, t, s.where, exact=s.dry_run)
        resumed_from, last_key = _resume_point(conn, s, t) if s.resume else (None, None)
        if s.resume and resumed_from is None:
            out.write(f"backfill: no unfinished backfill of {t.table} with this --where and --source-id; "
                      "starting from the first row\n")
        run_id = conn.execute(
            f"INSERT INTO {AUDIT_TABLE} (table_name, where_clause, source_id, chunk_size, rate, os_user, client_host, "
            "result, resumed_from, last_key) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING id",
            (t.table, s.where, s.source_id, s.chunk_size, s.rate, _os_user(), socket.gethostname(),
             "dry-run" if s.dry_run else "running", resumed_from,
             json.dumps(last_key) if last_key is not None else None)).fetchone()[0]  # type: ignore[index]
        if s.dry_run:
            conn.execute(f"UPDATE {AUDIT_TABLE} SET rows = %s, finished_at = clock_timestamp() WHERE id = %s",
                         (total, run_id))
            chunks = -(-total // s.chunk_size)
            out.write(f"backfill (dry run): would emit {total:,} {snapshot_type(t.aggregate)} events for {t.table} "
                      f"in {chunks:,} chunks of {s.chunk_size:,}; nothing written (audit run {run_id})\n")
            return Outcome(run_id, total, chunks, 0.0, "dry-run", resumed_from)
        where_from = f" after key {last_key}" if last_key else ""
        out.write(f"backfill run {run_id}: {t.table} as {snapshot_type(t.aggregate)} events, ~{total:,} rows{where_from}, "
                  f"chunks of {s.chunk_size:,}" + (f", at most {s.rate:,} rows/s" if s.rate else "") + "\n")
        progress = Progress(total, out, tty)
        # every change committed from here on has a commit LSN at or above this: the snapshot's, the live ones
        start_lsn = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()[0]  # type: ignore[index]
        with _stop_on_signals() if stop is None else nullcontext(stop) as should_stop:
            try:
                outcome = _chunks(conn, s, t, run_id, last_key, progress, should_stop)
            except BaseException as exc:
                error = exc.message if isinstance(exc, OutboxError) else f"{type(exc).__name__}: {first_line(exc)}"
                with _quietly():
                    conn.execute(f"UPDATE {AUDIT_TABLE} SET result = 'failed', error = %s, finished_at = clock_timestamp() "
                                 "WHERE id = %s", (error, run_id))
                raise
        progress.finish()
        with conn.transaction():
            if s.reconcile and outcome.result == "done":
                conn.execute(MARKER_SQL, (t.aggregate, t.table, contract.SNAPSHOT_COMPLETE_TYPE,
                                          json.dumps({"aggregate_type": t.aggregate, "table": t.table, "start_lsn": start_lsn,
                                                      "run": run_id, "source_id": s.source_id})))
                out.write(f"backfill run {run_id}: {contract.SNAPSHOT_COMPLETE_TYPE} written: sinks drop the "
                          f"{t.aggregate} aggregates of this store below {start_lsn} that the snapshot did not contain\n")
            conn.execute(f"UPDATE {AUDIT_TABLE} SET result = %s, finished_at = clock_timestamp() WHERE id = %s",
                         (outcome.result, run_id))
        outcome.resumed_from = resumed_from
        return outcome


@contextmanager
def _quietly() -> Iterator[None]:
    try:
        yield
    except psycopg.Error:
        pass


def _os_user() -> str | None:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return None


def _chunks(conn: psycopg.Connection[Any], s: BackfillSettings, t: Target, run_id: int, last_key: list[str] | None,
            progress: Progress, stop: Callable[[], bool]) -> Outcome:
    first, more = chunk_sql(t, s.where, False, emit=True), chunk_sql(t, s.where, True, emit=True)
    audit = (f"UPDATE {AUDIT_TABLE} SET rows = rows + %s, chunks = chunks + 1, last_key = %s "
             "WHERE id = %s")
    started = time.monotonic()
    rows = chunks = 0
    while True:
        if stop():
            return Outcome(run_id, rows, chunks, time.monotonic() - started, "interrupted")
        params: dict[str, Any] = {"n": s.chunk_size}
        if last_key is not None:
            params.update({f"k{i}": v for i, v in enumerate(last_key)})
        for attempt in range(1, CHUNK_RETRIES + 1):
            try:
                with conn.transaction():
                    conn.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
                    conn.execute(f"SET LOCAL statement_timeout = '{CHUNK_STATEMENT_TIMEOUT}'")
                    count, held, *key = conn.execute(more if last_key is not None else first, params).fetchone()  # type: ignore[misc]
                    if held:
                        conn.execute(audit, (count, json.dumps(key), run_id))
                break
            except (psycopg.errors.LockNotAvailable, psycopg.errors.DeadlockDetected,
                    psycopg.errors.SerializationFailure) as exc:
                if attempt == CHUNK_RETRIES:
                    raise BackfillError(f"chunk after key {last_key} of {t.table} failed {attempt} times: "
                                        f"{first_line(exc)}; run again with --resume") from None
                log.warning("chunk after key %s: %s; retrying", last_key, first_line(exc))
                time.sleep(min(0.1 * attempt, 2.0))
            except psycopg.errors.QueryCanceled:
                raise BackfillError(f"a chunk of {t.table} after key {last_key} took longer than {CHUNK_STATEMENT_TIMEOUT} "
                                    "(its rows stay locked for writers meanwhile) and was cancelled: run again with a "
                                    "smaller --chunk-size and --resume") from None
            except psycopg.Error as exc:
                where = f" (--where {s.where!r})" if s.where else ""
                raise BackfillError(f"backfill of {t.table} failed after {rows:,} rows{where}: {first_line(exc)}; "
                                    "fix the cause and run again with --resume") from None
        if not held:
            return Outcome(run_id, rows, chunks, time.monotonic() - started, "done")
        rows += count
        chunks += 1
        last_key = key
        progress.add(count)
        if s.rate:
            ahead = rows / s.rate - (time.monotonic() - started)
            if ahead > 0:
                time.sleep(ahead)


# --------------------------------------------------------------------------- the command
@click.command()
@options_for(BackfillSettings)
def backfill(**params: Any) -> None:
    """Emit <aggregate>.snapshot events for the existing rows of a captured table.

    The relay and the application keep running: each chunk is read in primary-key order, locked
    FOR SHARE and written to outbox.events in one short transaction, so a row changed meanwhile
    is never overwritten in a sink by its older snapshot image. Progress goes to stderr (a bar on
    a terminal); every run is recorded in outbox.backfills. SIGINT/SIGTERM stop after the current
    chunk; --resume goes on from there. See docs/backfill.md.
    """
    settings = settings_from(BackfillSettings, params)
    outcome = run_backfill(settings)
    if outcome.result == "interrupted":
        raise BackfillError(f"backfill run {outcome.run_id} interrupted after {outcome.rows:,} rows: "
                            "run the same command with --resume to go on")
    if outcome.result == "done":
        rate = outcome.rows / outcome.seconds if outcome.seconds else 0.0
        click.echo(f"backfill run {outcome.run_id} done: {outcome.rows:,} snapshot events in {outcome.chunks:,} chunks, "
                   f"{outcome.seconds:.1f} s ({rate:,.0f} rows/s)", err=True)
