"""``python -m bench bigtxn [--rows N] [--quick]``: one huge transaction through the relay.

N outbox rows (default 1,000,000; 50,000 with --quick; ~250-byte payloads) are inserted into
``outbox.events`` in ONE transaction, which stays open for a few seconds while the topic's end
offsets are watched: with pgoutput protocol version 1 PostgreSQL sends a transaction only after
its commit (spilling it to its own disk meanwhile), so nothing may reach Kafka before it. Then it
commits, and the relay's VmRSS is sampled every 50 ms until all N events are in Kafka: the peak
RSS and the time from commit to the last acknowledgement are printed. The relay's memory stays
bounded by --max-in-flight and the producer queue, not by the transaction's size.
"""
from __future__ import annotations

import asyncio
import time

import psycopg

from bench.common import Offsets, Result, Scratch, create_topics, figure, install_outbox, relay_args, rss_bytes, say, wait_slot_active

NAME = "bigtxn"
MB = 2**20
HOLD_OPEN_S = 3.0

INSERT = ("INSERT INTO outbox.events (aggregatetype, aggregateid, type, payload)"
          " SELECT 'big', g::text, 'big.created', jsonb_build_object('n', g, 'pad', repeat('x', 200))"
          " FROM generate_series(%s, %s) g")


async def run(quick: bool, rows: int | None = None) -> Result:
    n = rows or (50_000 if quick else 1_000_000)
    result = Result(NAME, quick, params={"rows": n})
    with Scratch() as scratch:
        db = scratch.database("bench_bigtxn")
        install_outbox(db)
        prefix = scratch.topic_prefix("bench-bigtxn")
        topic = f"{prefix}.big"
        await create_topics([topic])
        log = scratch.file(".relay.log")
        relay = scratch.spawn(relay_args(db, prefix), log)
        await asyncio.to_thread(wait_slot_active, db, relay, log)
        async with Offsets([topic]) as offsets:
            conn = await psycopg.AsyncConnection.connect(f"dbname={db}")
            try:
                started = time.monotonic()
                for lo in range(1, n + 1, 100_000):
                    await conn.execute(INSERT, (lo, min(n, lo + 99_999)))
                    say(f"inserted {min(n, lo + 99_999):,} of {n:,} rows (one open transaction)")
                insert_s = time.monotonic() - started
                before_commit = 0
                deadline = time.monotonic() + HOLD_OPEN_S
                peak = 0
                while time.monotonic() < deadline:  # the transaction is open: nothing may be published
                    before_commit = max(before_commit, await offsets.total())
                    peak = max(peak, rss_bytes(relay.pid))
                    await asyncio.sleep(0.2)
                await conn.commit()
            finally:
                await conn.close()
            committed = time.monotonic()
            last_say = committed
            while (done := await offsets.total()) < n:
                peak = max(peak, rss_bytes(relay.pid))
                if relay.poll() is not None:
                    raise RuntimeError(f"relay exited {relay.returncode}: {log.read_text(errors='replace')[-1500:]}")
                if time.monotonic() - committed > 1800:
                    raise RuntimeError("relay did not publish the transaction within 1800 s")
                if time.monotonic() - last_say > 10:
                    say(f"{done:,} of {n:,} events in Kafka, relay RSS peak so far {peak / MB:.1f} MB")
                    last_say = time.monotonic()
                await asyncio.sleep(0.05)
            elapsed = time.monotonic() - committed
    f = result.figures
    f.update({"rows": n, "published_before_commit": before_commit, "insert_s": insert_s,
              "commit_to_all_acked_s": elapsed, "events_per_s": n / elapsed, "relay_rss_peak_mb": peak / MB})
    result.runs.append(dict(f))
    print(f"bigtxn: one transaction of {n:,} outbox rows")
    figure(NAME, "events in Kafka before the commit", before_commit, "")
    figure(NAME, "commit to last acknowledgement", elapsed, "s")
    figure(NAME, "throughput", n / elapsed, "events/s")
    figure(NAME, "relay RSS peak", peak / MB, "MB")
    result.save()
    if before_commit:
        raise RuntimeError(f"{before_commit} events reached Kafka before their transaction committed")
    return result
