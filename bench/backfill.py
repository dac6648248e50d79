"""``python -m bench backfill``: rows/s of ``outbox backfill``, alone and with a concurrent writer.

A store database with the POS schema and the outbox gets N customers (200,000; 20,000 with
--quick) written with the capture triggers off (rows that existed before capture). Each run
backfills all of them (chunks of 2000, no --rate) into outbox.events: once with nothing else
running, once while a writer updates random customers (5 rows per transaction, as fast as it
goes, plus a delete now and then) in one connection. The writer's own rate during the backfill is
reported too, and its rate with no backfill (3 s): chunks lock their rows FOR SHARE, so writers
touching them wait for a chunk.
No relay runs: this is the store side's cost; the relay then publishes the events like any
others (``python -m bench relay``). outbox.events is emptied between runs.

``python -m bench replay``: the time a full replay of demo-like topics takes (bench/replay.py).
"""
from __future__ import annotations

import io
import random
import threading
import time
from typing import Any

import psycopg

from bench.common import Result, Scratch, figure, install_outbox, median, say, spread
from outbox.dev.pos import POS_SCHEMA

NAME = "backfill"


class Writer(threading.Thread):
    """Updates (and now and then deletes) random customers until stopped; counts transactions."""

    def __init__(self, dsn: str, rows: int, seed: int) -> None:
        super().__init__(daemon=True)
        self.dsn, self.rows, self.rng = dsn, rows, random.Random(seed)
        self.halt = threading.Event()
        self.transactions = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                while not self.halt.is_set():
                    with conn.transaction():
                        for _ in range(5):
                            cid = self.rng.randint(1, self.rows)
                            if self.rng.random() < 0.05:
                                conn.execute("DELETE FROM pos.customers WHERE id = %s", (cid,))
                            else:
                                conn.execute("UPDATE pos.customers SET loyalty_pts = loyalty_pts + 1 WHERE id = %s",
                                             (cid,))
                    self.transactions += 1
        except BaseException as exc:  # noqa: BLE001 - reported by the caller
            self.error = exc


def seed(dsn: str, rows: int) -> None:
    with psycopg.connect(dsn) as conn:
        conn.execute("SET session_replication_role = replica")  # no capture: rows that predate it
        conn.execute("INSERT INTO pos.customers (name, email, phone, loyalty_pts, balance) "
                     "SELECT 'Customer ' || g, 'c' || g || '@example.com', '+49 30 ' || g, g %% 500, g / 100.0 "
                     "FROM generate_series(1, %s) g", (rows,))
        conn.execute("ANALYZE pos.customers")


def writer_alone(dsn: str, rows: int, seconds: float, seed: int) -> float:
    """The writer's rate with no backfill running: the baseline for its rate during one."""
    writer = Writer(dsn, rows, seed)
    writer.start()
    time.sleep(seconds)
    writer.halt.set()
    writer.join(30)
    if writer.error:
        raise writer.error
    return writer.transactions / seconds


def backfill_once(dsn: str, writer: Writer | None) -> dict[str, Any]:
    from outbox.backfill import run_backfill
    from outbox.config import BackfillSettings

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("TRUNCATE outbox.events")
    if writer is not None:
        writer.start()
        time.sleep(0.5)
    before = writer.transactions if writer else 0
    started = time.perf_counter()
    outcome = run_backfill(BackfillSettings(dsn=dsn, source_id="bench", table="pos.customers", chunk_size=2000),
                           out=io.StringIO(), tty=False)
    seconds = time.perf_counter() - started
    run: dict[str, Any] = {"rows": outcome.rows, "seconds": seconds, "rows_per_s": outcome.rows / seconds}
    if writer is not None:
        run["writer_tx_per_s"] = (writer.transactions - before) / seconds
        writer.halt.set()
        writer.join(30)
        if writer.error:
            raise writer.error
    return run


async def run(quick: bool) -> Result:
    rows = 20_000 if quick else 200_000
    runs = 1 if quick else 3
    result = Result(NAME, quick, params={"rows": rows, "runs": runs, "chunk_size": 2000, "table": "pos.customers"})
    with Scratch() as scratch:
        db = scratch.database("bench_bf")
        dsn = f"dbname={db}"
        with psycopg.connect(dsn) as conn:
            conn.execute(POS_SCHEMA)
        install_outbox(db, ["pos.customers=customer"])
        seed(dsn, rows)
        for i in range(runs):
            alone = backfill_once(dsn, None)
            busy = backfill_once(dsn, Writer(dsn, rows, seed=i))
            baseline = writer_alone(dsn, rows, 1.0 if quick else 3.0, seed=100 + i)
            result.runs.append({"run": i + 1, "alone": alone, "with_writer": busy, "writer_alone_tx_per_s": baseline})
            say(f"run {i + 1}/{runs}: {alone['rows_per_s']:,.0f} rows/s alone, {busy['rows_per_s']:,.0f} rows/s with "
                f"a writer ({busy['writer_tx_per_s']:,.0f} writer tx/s meanwhile, {baseline:,.0f} without backfill)")
    f = result.figures
    f["rows_per_s"] = median([r["alone"]["rows_per_s"] for r in result.runs])
    f["rows_per_s_with_writer"] = median([r["with_writer"]["rows_per_s"] for r in result.runs])
    f["writer_tx_per_s"] = median([r["with_writer"]["writer_tx_per_s"] for r in result.runs])
    f["writer_alone_tx_per_s"] = median([r["writer_alone_tx_per_s"] for r in result.runs])
    print(f"backfill: {rows} rows of pos.customers, chunks of 2000, median of {runs} run(s)")
    figure(NAME, "backfill alone", f["rows_per_s"], "rows/s", spread([r["alone"]["rows_per_s"] for r in result.runs]))
    figure(NAME, "backfill with a concurrent writer", f["rows_per_s_with_writer"], "rows/s",
           spread([r["with_writer"]["rows_per_s"] for r in result.runs]))
    figure(NAME, "writer during the backfill", f["writer_tx_per_s"], "tx/s",
           spread([r["with_writer"]["writer_tx_per_s"] for r in result.runs]))
    figure(NAME, "writer without a backfill", f["writer_alone_tx_per_s"], "tx/s",
           spread([r["writer_alone_tx_per_s"] for r in result.runs]))
    result.save()
    return result
