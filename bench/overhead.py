"""``python -m bench overhead``: what the capture triggers cost the legacy application.

pgbench runs a POS-like custom transaction on the demo's legacy schema (pos.customers,
pos.orders, pos.order_lines): insert an order, 1-5 order lines, set the order's total, update
the customer's loyalty points and balance. With capture triggers on, that transaction also
writes 4-8 rows into outbox.events (one jsonb image each). Runs alternate without (A) and with
(B) the triggers on the same database (``ALTER TABLE ... DISABLE/ENABLE TRIGGER outbox_capture``),
A B A B ..., each after a CHECKPOINT, so table growth and background noise fall on both alike.
The relay is not running: this is the cost inside the application's transactions; decoding
the WAL is the relay's own CPU (see the relay benchmark). synchronous_commit is the server's
(on), 4 clients, 2 threads.
"""
from __future__ import annotations

import asyncio
import re
import subprocess
from typing import Any

import psycopg

from bench.common import Result, Scratch, figure, install_outbox, median, pg_binary, say, spread
from outbox.dev.pos import POS_CAPTURES, POS_SCHEMA

NAME = "overhead"
CUSTOMERS = 10_000

SCRIPT = f"""\\set cid random(1, {CUSTOMERS})
\\set nlines random(1, 5)
BEGIN;
INSERT INTO pos.orders (customer_id, note) VALUES (:cid, NULL) RETURNING id AS oid \\gset
INSERT INTO pos.order_lines (order_id, line_no, sku, qty, unit_price)
  SELECT :oid, g, 'SKU-' || lpad((1 + (random() * 398)::int)::text, 5, '0'), 1 + (random() * 4)::int,
         round((0.99 + random() * 99)::numeric, 2)
    FROM generate_series(1, :nlines) AS g;
UPDATE pos.orders SET total = (SELECT sum(qty * unit_price) FROM pos.order_lines WHERE order_id = :oid),
       status = 'paid' WHERE id = :oid;
UPDATE pos.customers SET loyalty_pts = loyalty_pts + 1, balance = balance + 1.50 WHERE id = :cid;
END;
"""


def _set_triggers(dbname: str, on: bool) -> None:
    with psycopg.connect(dbname=dbname, autocommit=True) as conn:
        for table in POS_CAPTURES:
            conn.execute(f"ALTER TABLE {table} {'ENABLE' if on else 'DISABLE'} TRIGGER outbox_capture")
        conn.execute("CHECKPOINT")


def _pgbench(dbname: str, script: str, seconds: int, clients: int) -> float:
    proc = subprocess.run([pg_binary("pgbench"), "-n", "-c", str(clients), "-j", "2", "-T", str(seconds),
                           "-f", script, dbname], capture_output=True, text=True, timeout=seconds + 120)
    if proc.returncode != 0:
        raise RuntimeError(f"pgbench failed: {proc.stderr.strip()[-1000:]}")
    match = re.search(r"tps = ([\d.]+) \(without initial connection time\)", proc.stdout)
    if not match:
        raise RuntimeError(f"no tps in pgbench output: {proc.stdout[-500:]}")
    return float(match.group(1))


async def run(quick: bool, pairs: int | None = None, seconds: int | None = None, clients: int = 4) -> Result:
    pairs = pairs or (2 if quick else 5)
    seconds = seconds or (3 if quick else 10)
    result = Result(NAME, quick, params={"pairs": pairs, "seconds": seconds, "clients": clients, "threads": 2,
                                          "customers": CUSTOMERS, "script": SCRIPT})
    with Scratch() as scratch:
        db = scratch.database("bench_ovh")
        with psycopg.connect(dbname=db) as conn:
            conn.execute(POS_SCHEMA)
            conn.execute("INSERT INTO pos.customers (name, email) SELECT 'customer ' || g, 'c' || g || '@example.com'"
                         " FROM generate_series(1, %s) g", (CUSTOMERS,))
        install_outbox(db, [f"{table}={agg}" for table, (agg, _) in POS_CAPTURES.items()])
        with psycopg.connect(dbname=db, autocommit=True) as conn:
            conn.execute("VACUUM ANALYZE")
        script = scratch.file(".pgbench.sql")
        script.write_text(SCRIPT)
        # an untimed warm-up: the first run on a fresh database (cold caches, tables growing from empty)
        # measured less than half the TPS of the next ones and made its pair's overhead meaningless
        warmup = min(seconds, 5)
        result.params["warmup_seconds"] = warmup
        say(f"warm-up: {warmup} s of pgbench, not counted")
        await asyncio.to_thread(_set_triggers, db, False)
        await asyncio.to_thread(_pgbench, db, str(script), warmup, clients)
        for i in range(pairs):
            pair: dict[str, Any] = {"pair": i + 1}
            for label, on in (("without", False), ("with", True)):
                await asyncio.to_thread(_set_triggers, db, on)
                pair[f"tps_{label}"] = await asyncio.to_thread(_pgbench, db, str(script), seconds, clients)
            pair["overhead_pct"] = (1 - pair["tps_with"] / pair["tps_without"]) * 100
            result.runs.append(pair)
            say(f"pair {i + 1}/{pairs}: {pair['tps_without']:,.0f} TPS without, {pair['tps_with']:,.0f} with "
                f"({pair['overhead_pct']:.1f}% overhead)")
        with psycopg.connect(dbname=db) as conn:
            per_txn = conn.execute("SELECT count(*) FROM outbox.events").fetchone()[0]  # type: ignore[index]
        result.params["events_written_with_triggers"] = per_txn

    f = result.figures
    f["tps_without"] = median([r["tps_without"] for r in result.runs])
    f["tps_with"] = median([r["tps_with"] for r in result.runs])
    f["overhead_pct"] = median([r["overhead_pct"] for r in result.runs])
    f["overhead_pct_min"] = min(r["overhead_pct"] for r in result.runs)
    f["overhead_pct_max"] = max(r["overhead_pct"] for r in result.runs)
    print(f"overhead: pgbench POS transaction, {clients} clients, {pairs} pairs of {seconds} s runs (A B A B ...)")
    figure(NAME, "TPS without capture triggers", f["tps_without"], "TPS", spread([r["tps_without"] for r in result.runs]))
    figure(NAME, "TPS with capture triggers", f["tps_with"], "TPS", spread([r["tps_with"] for r in result.runs]))
    figure(NAME, "capture overhead (1 - with/without)", f["overhead_pct"], "%",
           f"min {f['overhead_pct_min']:.1f}, max {f['overhead_pct_max']:.1f} over pairs")
    result.save()
    return result
