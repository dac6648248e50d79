"""The fault suite's writer: concurrent POS transactions that commit or roll back, recorded for sure.

Several threads, one connection each, run transactions of 1..50 captured rows (new customers,
orders with lines, updates, deletes with cascades) against the POS schema of outbox.dev.pos, and
roll back a share of them on purpose. Each transaction takes its id first
(``pg_current_xact_id()``), so its outcome is known even when the connection breaks during
COMMIT (PostgreSQL restarting): such ambiguous transactions are looked up afterwards with
``pg_xact_status``, which reads the commit log and survives restarts. Deadlocks and other
errors abort a transaction: it counts as rolled back. The writer never stops on a lost
connection; it reconnects and goes on.
"""
from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import psycopg

from outbox.dev.pos import NAMES, SKUS
from tests.faults.checker import XID_MASK, WriterRecord
from tests.support.wait import wait_until

SIZES = (1, 1, 1, 2, 3, 5, 8, 13, 21, 34, 50)  # captured rows per transaction, mostly small


class Writer:
    """``start()`` the threads, ``stop()`` them and get the record (ambiguous commits resolved)."""

    def __init__(self, dsn: str, *, connections: int = 3, seed: int = 0, pause: float = 0.02,
                 rollback_share: float = 0.15) -> None:
        self.dsn = dsn
        self.connections = connections
        self.seed = seed
        self.pause = pause
        self.rollback_share = rollback_share
        self.transactions = 0
        self.reconnects = 0
        self._committed: set[int] = set()
        self._rolled_back: set[int] = set()
        self._ambiguous: set[int] = set()  # full xid8 values
        self._customers: list[int] = []
        self._orders: list[int] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._errors: list[BaseException] = []

    def start(self) -> Writer:
        self._threads = [threading.Thread(target=self._run, args=(self.seed * 100 + i,), name=f"writer-{i}", daemon=True)
                         for i in range(self.connections)]
        for t in self._threads:
            t.start()
        return self

    def stop(self, resolve_timeout: float = 60) -> WriterRecord:
        self._stop.set()
        for t in self._threads:
            t.join(60)
        if self._errors:
            raise AssertionError(f"the writer failed: {self._errors[0]!r}") from self._errors[0]
        record = WriterRecord(committed={x & XID_MASK for x in self._committed},
                              rolled_back={x & XID_MASK for x in self._rolled_back})
        for xid, status in self._resolve(resolve_timeout).items():
            (record.committed if status == "committed" else record.rolled_back).add(xid & XID_MASK)
            record.ambiguous_resolved += 1
        return record

    @property
    def committed(self) -> int:
        return len(self._committed)

    # ------------------------------------------------------------------ threads
    def _run(self, seed: int) -> None:
        rng = random.Random(seed)
        conn: psycopg.Connection[Any] | None = None
        try:
            while not self._stop.is_set():
                if conn is None or conn.closed:
                    try:
                        conn = psycopg.connect(self.dsn, connect_timeout=3)
                    except psycopg.OperationalError:
                        time.sleep(0.3)  # the server is down or restarting: try again
                        continue
                    with self._lock:
                        self.reconnects += 1
                try:
                    self._transaction(conn, rng)
                except psycopg.OperationalError:
                    conn.close()
                    conn = None
                if self.pause:
                    time.sleep(rng.uniform(0, self.pause * 2))
        except BaseException as exc:  # noqa: BLE001 - reported by stop()
            self._errors.append(exc)
        finally:
            if conn is not None:
                conn.close()

    def _transaction(self, conn: psycopg.Connection[Any], rng: random.Random) -> None:
        xid = None
        try:
            xid = int(conn.execute("SELECT pg_current_xact_id()::text").fetchone()[0])  # type: ignore[index]
            new_customers, new_orders = self._changes(conn, rng, rng.choice(SIZES))
            if rng.random() < self.rollback_share:
                conn.rollback()
                outcome = self._rolled_back
            else:
                conn.commit()
                outcome = self._committed
            with self._lock:
                outcome.add(xid)
                self.transactions += 1
                if outcome is self._committed:
                    self._customers.extend(new_customers)
                    self._orders.extend(new_orders)
        except psycopg.OperationalError:
            if xid is not None:
                with self._lock:
                    self._ambiguous.add(xid)  # perhaps committed: ask the commit log later
            raise
        except psycopg.Error:  # a deadlock, a row gone meanwhile...: the transaction aborted
            conn.rollback()
            if xid is not None:
                with self._lock:
                    self._rolled_back.add(xid)

    def _pick(self, pool: list[int], rng: random.Random, n: int) -> list[int]:
        with self._lock:
            return sorted({rng.choice(pool) for _ in range(n)}) if pool else []

    def _changes(self, conn: psycopg.Connection[Any], rng: random.Random, size: int) -> tuple[list[int], list[int]]:
        """About ``size`` captured row changes in the open transaction; returns new customer and order ids."""
        kind = rng.random()
        execute: Callable[..., Any] = conn.execute
        if kind < 0.25 or len(self._customers) < 10:
            rows = execute(
                "INSERT INTO pos.customers (name, email, balance) SELECT %s || ' ' || g, 'c' || g || '@example.com', %s"
                " FROM generate_series(1, %s) g RETURNING id",
                (rng.choice(NAMES), Decimal(rng.randrange(0, 100000)) / 100, size)).fetchall()
            return [r[0] for r in rows], []
        if kind < 0.55:
            customer = self._pick(self._customers, rng, 1)[0]
            oid = execute("INSERT INTO pos.orders (customer_id, note) VALUES (%s, %s) RETURNING id",
                          (customer, rng.choice([None, "livraison à domicile", "🧾 reçu"]))).fetchone()[0]
            lines = max(1, size - 2)
            execute("INSERT INTO pos.order_lines (order_id, line_no, sku, qty, unit_price)"
                    " SELECT %s, g, %s, 1 + g %% 5, %s FROM generate_series(1, %s) g",
                    (oid, rng.choice(SKUS), Decimal(rng.randrange(99, 99999)) / 100, lines))
            execute("UPDATE pos.orders SET total = (SELECT sum(qty * unit_price) FROM pos.order_lines WHERE order_id = %s),"
                    " status = 'paid' WHERE id = %s", (oid, oid))
            return [], [oid]
        if kind < 0.85:
            ids = self._pick(self._customers, rng, size)
            execute("UPDATE pos.customers SET loyalty_pts = loyalty_pts + 1, balance = balance + %s WHERE id = ANY(%s)",
                    (Decimal(rng.randrange(-500, 500)) / 100, ids))
            return [], []
        orders = self._pick(self._orders, rng, max(1, size // 5))
        if rng.random() < 0.5:
            execute("DELETE FROM pos.orders WHERE id = ANY(%s)", (orders,))  # cascades to the lines
        else:
            execute("UPDATE pos.orders SET status = 'returned', note = 'retour – défaut' WHERE id = ANY(%s)", (orders,))
            execute("DELETE FROM pos.order_lines WHERE order_id = ANY(%s) AND line_no = 1", (orders,))
        return [], []

    # ------------------------------------------------------------------ after the run
    def _resolve(self, timeout: float) -> dict[int, str]:
        """Outcome of every ambiguous transaction, from the commit log (waits for the server)."""
        if not self._ambiguous:
            return {}

        def statuses() -> dict[int, str]:
            with psycopg.connect(self.dsn, connect_timeout=3, autocommit=True) as conn:
                rows = conn.execute("SELECT x::text, pg_xact_status(x::xid8) FROM unnest(%s::text[]) x",
                                    ([str(x) for x in sorted(self._ambiguous)],)).fetchall()
            return {int(x): status for x, status in rows}

        return wait_until(statuses, timeout=timeout, interval=0.5, until=lambda got: "in progress" not in got.values(),
                          message=f"the outcome of {len(self._ambiguous)} ambiguous commits",
                          ignore=(psycopg.OperationalError,))
