"""PostgreSQL helpers: throw-away databases, the POS store, and where a store's slot stands."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import psycopg

from outbox import contract
from outbox.dev.pos import POS_CAPTURES, POS_SCHEMA
from tests.support.wait import wait_until

if TYPE_CHECKING:
    from tests.support.processes import OutboxProcess


def admin_conn() -> psycopg.Connection[Any]:
    return psycopg.connect(dbname="postgres", autocommit=True)


def drop_database(name: str) -> None:
    """Drop a database and every replication slot in it (a slot left behind pins WAL forever).

    A slot still held by a relay is freed first by ending that backend.
    """
    with admin_conn() as conn:
        for slot, pid in conn.execute(
            "SELECT slot_name, active_pid FROM pg_replication_slots WHERE database = %s", (name,)
        ).fetchall():
            if pid:
                conn.execute("SELECT pg_terminate_backend(%s)", (pid,))

            def dropped(slot: str = slot) -> bool:
                conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
                return True

            wait_until(dropped, timeout=10, interval=0.1, message=f"slot {slot} to be freed by its backend ({pid})",
                       ignore=(psycopg.errors.ObjectInUse,))  # the backend is still on its way out
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def install_pos(dsn: str) -> None:
    """The legacy POS schema (the demo's) plus the outbox capturing its three tables."""
    from tests.support.processes import outbox

    with psycopg.connect(dsn) as conn:
        conn.execute(POS_SCHEMA)
    captures = [a for table, (agg, _) in POS_CAPTURES.items() for a in ("--capture", f"{table}={agg}")]
    outbox("install", "--dsn", dsn, *captures)


def committed_ids(dsn: str) -> set[str]:
    """Ids of every event committed to the store's outbox, heartbeats left out."""
    with psycopg.connect(dsn) as conn:
        return {r[0] for r in conn.execute("SELECT id::text FROM outbox.events WHERE type <> %s",
                                           (contract.HEARTBEAT_TYPE,))}


def query_one(dsn: str, sql: str, params: tuple[Any, ...] = (), timeout: float = 60) -> Any:
    """The first column of the first row, waiting up to ``timeout`` for a server coming back."""
    def run() -> tuple[Any]:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=3) as conn:
            row = conn.execute(sql, params).fetchone()
        assert row is not None, f"no row from {sql}"
        return (row[0],)  # truthy even when the value is not

    return wait_until(run, timeout=timeout, message=f"the server of {dsn!r} to answer",
                      ignore=(psycopg.OperationalError,))[0]


def wal_lsn(dsn: str, timeout: float = 60) -> int:
    """pg_current_wal_lsn() as a number: a position after every write committed before the call."""
    return int(query_one(dsn, "SELECT pg_current_wal_lsn() - '0/0'::pg_lsn", timeout=timeout))


def slot_confirmed(dsn: str, timeout: float = 60) -> int:
    """confirmed_flush_lsn of the database's slot (the furthest, if it has several), 0 without one."""
    return int(query_one(dsn, "SELECT coalesce(max(confirmed_flush_lsn - '0/0'::pg_lsn), 0) FROM pg_replication_slots"
                              " WHERE database = current_database()", timeout=timeout))


def slot_state(dsn: str) -> tuple[int | None, str]:
    """(active_pid, confirmed_flush_lsn) of the store's slot."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT active_pid, confirmed_flush_lsn::text FROM pg_replication_slots"
                           " WHERE database = current_database()").fetchone()
    assert row is not None
    return row[0], row[1]


def _watch(relay: OutboxProcess | None) -> None:
    if relay is not None:
        relay.assert_running()


def wait_slot_confirmed(dsn: str, lsn: int, timeout: float = 60, relay: OutboxProcess | None = None) -> int:
    """Wait until the store's slot confirmed ``lsn`` (from :func:`wal_lsn`) or later; returns the position.

    A relay confirms a position only once Kafka acknowledged everything committed before it, and
    reads the stream in commit order: past this point, whatever it was going to publish of the
    transactions committed before ``lsn`` (a resend, say) is in Kafka. ``relay``: fail at once
    if it exits.
    """
    def confirmed() -> int:
        _watch(relay)
        return slot_confirmed(dsn)

    return wait_until(confirmed, timeout=timeout, interval=0.1, until=lambda at: at >= lsn,
                      message=lambda: f"the slot to confirm {contract.format_lsn(lsn)}"
                                      + (f"; relay: {relay.output()}" if relay is not None else ""))


def wait_relay_received(dsn: str, lsn: int, timeout: float = 60, relay: OutboxProcess | None = None) -> int:
    """Wait until the relay streaming the store's slot reported it received ``lsn`` or later
    (pg_stat_replication.write_lsn: what the relay read, acknowledged by Kafka or not)."""
    def received() -> int:
        _watch(relay)
        return int(query_one(dsn, "SELECT coalesce(max(r.write_lsn - '0/0'::pg_lsn), 0) FROM pg_stat_replication r"
                                  " JOIN pg_replication_slots s ON s.active_pid = r.pid"
                                  " WHERE s.database = current_database()"))

    return wait_until(received, timeout=timeout, interval=0.1, until=lambda at: at >= lsn,
                      message=lambda: f"the relay to report it received {contract.format_lsn(lsn)}"
                                      + (f"; relay: {relay.output()}" if relay is not None else ""))
