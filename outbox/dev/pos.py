"""The demo's point-of-sale stores: the legacy schema, its captures, and a workload that writes it.

Shared by ``outbox demo``, the tests (the fault suite's writer, the pipeline tests) and the
benchmarks, so none of them imports the demo itself.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass
from decimal import Decimal

import psycopg

POS_SCHEMA = """
CREATE SCHEMA pos;
CREATE TABLE pos.customers (
    id          serial PRIMARY KEY,
    name        text NOT NULL,
    email       text,
    phone       text,
    loyalty_pts integer NOT NULL DEFAULT 0,
    balance     numeric(12,2) NOT NULL DEFAULT 0,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE pos.orders (
    id          bigserial PRIMARY KEY,
    customer_id integer REFERENCES pos.customers(id) ON DELETE SET NULL,
    status      text NOT NULL DEFAULT 'open',
    total       numeric(14,4) NOT NULL DEFAULT 0,
    placed_at   timestamptz NOT NULL DEFAULT now(),
    note        text
);
CREATE TABLE pos.order_lines (
    order_id    bigint NOT NULL REFERENCES pos.orders(id) ON DELETE CASCADE,
    line_no     integer NOT NULL,
    sku         text NOT NULL,
    qty         integer NOT NULL,
    unit_price  numeric(10,2) NOT NULL,
    PRIMARY KEY (order_id, line_no)
);
"""

#: table -> (aggregate type, SQL expression giving the aggregate id exactly as the capture trigger does)
POS_CAPTURES: dict[str, tuple[str, str]] = {
    "pos.customers": ("customer", "id::text"),
    "pos.orders": ("order", "id::text"),
    "pos.order_lines": ("order_line", "order_id::text || ':' || line_no::text"),
}

NAMES = ["Zoë Müller", "José Álvarez", "Łukasz Kowalski", "Søren Østergaard", "Ana Lúcia", "Ólafur Þór",
         "李雷", "Chloé Dubois", "Mårten Ek", "Γιώργος Παπαδόπουλος", "O'Brien", "Ærøskøbing Shop"]
SKUS = [f"SKU-{i:05d}" for i in range(1, 400)]


# --------------------------------------------------------------------------- the workload
@dataclass
class WorkloadResult:
    committed: int = 0
    rolled_back: int = 0


def run_workload(dsn: str, transactions: int, seed: int, rollback_share: float = 0.05) -> WorkloadResult:
    """POS-like transactions of mixed sizes: new customers, orders with lines, updates, deletes, rollbacks."""
    rng = random.Random(seed)
    result = WorkloadResult()
    with psycopg.connect(dsn) as conn:
        customers: list[int] = [r[0] for r in conn.execute("SELECT id FROM pos.customers").fetchall()]
        orders: list[int] = [r[0] for r in conn.execute("SELECT id FROM pos.orders").fetchall()]
        conn.commit()
        for _ in range(transactions):
            kind = rng.random()
            pending_customers: list[int] = []
            pending_orders: list[int] = []
            rolled_back = rng.random() < rollback_share
            with conn.transaction(force_rollback=rolled_back):
                if kind < 0.25 or not customers:
                    cid = conn.execute(
                        "INSERT INTO pos.customers (name, email, phone, balance) VALUES (%s, %s, %s, %s) RETURNING id",
                        (rng.choice(NAMES), f"c{rng.randrange(10**6)}@example.com" if rng.random() < 0.8 else None,
                         None if rng.random() < 0.5 else f"+49 30 {rng.randrange(10**7):07d}",
                         Decimal(rng.randrange(0, 100000)) / 100),
                    ).fetchone()[0]  # type: ignore[index]
                    pending_customers.append(cid)
                elif kind < 0.70:
                    oid = conn.execute(
                        "INSERT INTO pos.orders (customer_id, note) VALUES (%s, %s) RETURNING id",
                        (rng.choice(customers), None if rng.random() < 0.7 else "livraison à domicile"),
                    ).fetchone()[0]  # type: ignore[index]
                    lines = rng.randint(1, 6)
                    with conn.cursor() as cur:
                        cur.executemany(
                            "INSERT INTO pos.order_lines (order_id, line_no, sku, qty, unit_price) VALUES (%s, %s, %s, %s, %s)",
                            [(oid, n, rng.choice(SKUS), rng.randint(1, 5), Decimal(rng.randrange(99, 99999)) / 100)
                             for n in range(1, lines + 1)],
                        )
                    conn.execute(
                        "UPDATE pos.orders SET total = (SELECT sum(qty * unit_price) FROM pos.order_lines WHERE order_id = %s),"
                        " status = 'paid' WHERE id = %s", (oid, oid))
                    pending_orders.append(oid)
                elif kind < 0.85:
                    conn.execute("UPDATE pos.customers SET loyalty_pts = loyalty_pts + %s, balance = balance + %s WHERE id = %s",
                                 (rng.randint(1, 50), Decimal(rng.randrange(-500, 500)) / 100, rng.choice(customers)))
                elif kind < 0.95 and orders:
                    oid = rng.choice(orders)
                    conn.execute("UPDATE pos.orders SET status = 'returned', note = %s WHERE id = %s", ("retour – défaut", oid))
                    conn.execute("DELETE FROM pos.order_lines WHERE order_id = %s AND line_no = 1", (oid,))
                elif orders:
                    oid = orders.pop(rng.randrange(len(orders)))
                    conn.execute("DELETE FROM pos.orders WHERE id = %s", (oid,))
                    # a bulk UPDATE in the same transaction, touching many rows
                    conn.execute("UPDATE pos.customers SET loyalty_pts = loyalty_pts + 1 WHERE id %% 17 = %s", (rng.randrange(17),))
            if rolled_back:
                result.rolled_back += 1
            else:
                customers.extend(pending_customers)
                orders.extend(pending_orders)
                result.committed += 1
    return result


# --------------------------------------------------------------------------- databases
def drop_database(name: str) -> None:
    """Drop a database and every replication slot in it (a slot left behind pins WAL forever).

    A slot still held by a relay is freed first by ending that backend.
    """
    with psycopg.connect(dbname="postgres", autocommit=True) as conn:
        for slot, pid in conn.execute(
            "SELECT slot_name, active_pid FROM pg_replication_slots WHERE database = %s", (name,)
        ).fetchall():
            if pid:
                conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
            for _ in range(100):
                try:
                    conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
                    break
                except psycopg.errors.ObjectInUse:  # the backend is still on its way out
                    time.sleep(0.1)
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def recreate_database(name: str) -> None:
    drop_database(name)
    with psycopg.connect(dbname="postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
