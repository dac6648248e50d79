"""``python -m bench relay``: backlog throughput of the real ``outbox relay`` against two baselines.

A pure relay measurement: events are inserted straight into outbox.events (no capture
triggers; the ``overhead`` benchmark measures those), in transactions of mixed sizes (half of
them single events, a few of several hundred), ~400-byte jsonb order payloads. Per run:

1. commit N events while nothing reads the slots (``synchronous_commit = off`` for the writer:
   it is not what is measured), note the WAL insert position after the last commit (the
   write position may lag behind it with asynchronous commit, and pg_recvlogical would stop early);
2. ``pg_recvlogical`` reads the same N events through a second, identical pgoutput slot
   (``proto_version=1``, ``publication_names=outbox_events``) to /dev/null up to that position
   (``--endpos``): PostgreSQL's own decoding and sending speed, the ceiling on the source side;
3. ``outbox relay`` starts on its pre-filled slot (backlog mode); timed from process start until
   the topic's end offsets have grown by N (every event acknowledged by Kafka), polled every 20 ms;
   the relay's RSS is sampled meanwhile;
4. ``kcat -P`` produces N messages of the same keys, values and CloudEvents headers
   (acks=all, idempotence on, librdkafka defaults otherwise): the Kafka-side ceiling for one
   producer on this machine.
"""
from __future__ import annotations

import asyncio
import subprocess
import time
from typing import Any

import psycopg

from bench.common import (
    Offsets,
    Result,
    Scratch,
    Sentinel,
    bootstrap,
    create_topics,
    delivery_args,
    figure,
    install_outbox,
    median,
    mixed_sizes,
    pg_binary,
    relay_args,
    rss_bytes,
    say,
    spread,
    stop_process,
    write_events,
)
from outbox import contract

NAME = "relay"


def kcat_input(dbname: str, path: Any, count: int) -> int:
    """The N newest events' keys and payloads, one 'key<TAB>value' line each; returns the mean value size."""
    total = 0
    with psycopg.connect(dbname=dbname) as conn, open(path, "w", encoding="utf-8") as out:
        cur = conn.cursor(name="events")
        cur.execute("SELECT aggregateid, payload::text FROM outbox.events ORDER BY created_at DESC LIMIT %s", (count,))
        for aggregate_id, payload in cur:
            out.write(f"bench:{aggregate_id}\t{payload}\n")
            total += len(payload.encode())
    return total // max(count, 1)


def kcat_headers() -> list[str]:
    """The relay's CloudEvents headers with representative values, as kcat -H arguments."""
    row = contract.OutboxRow(id="0b7c3b9e-8a55-4a3f-9f53-2b8f0f6f1f00", aggregatetype="order",
                             aggregateid="6f1c2d3e-4b5a-4c7d-8e9f-0a1b2c3d4e5f", type="order.created", payload="{}")
    from datetime import datetime, timezone

    record = contract.build_record(row, source_id="bench", prefix="x", position=contract.Position(0x16B3748, 12),
                                   commit_time=datetime.now(timezone.utc), xid=123456)
    return [a for name, value in record.headers for a in ("-H", f"{name}={value.decode()}")]


async def _pg_recvlogical(run_: dict[str, Any], n: int, db: str, slot: str, endpos: str) -> None:
    """PostgreSQL decoding the same backlog through an identical slot, to /dev/null."""
    started = time.perf_counter()
    proc = await asyncio.to_thread(subprocess.run, [
        pg_binary("pg_recvlogical"), "-d", f"dbname={db}", "--slot", slot, "--start", "--no-loop",
        "-o", "proto_version=1", "-o", "publication_names=outbox_events", "--endpos", endpos, "-f", "/dev/null"],
        capture_output=True, text=True, timeout=600)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"pg_recvlogical failed: {proc.stderr.strip()}")
    run_["pg_recvlogical_events_per_s"] = n / elapsed


async def run(quick: bool, events: int | None = None, runs: int | None = None, delivery: str = "at-least-once",
              baselines: bool = True) -> Result:
    """``baselines=False``: the relay only (the interleaved A/B runs of ``bench delivery``)."""
    n = events or (10_000 if quick else 200_000)
    runs = runs or (1 if quick else 3)
    result = Result(NAME, quick, params={"events": n, "runs": runs, "payload": "~400 B jsonb order, direct inserts into outbox.events",
                                          "transactions": "mixed sizes: 50% 1 event, 30% 2-10, 15% 11-50, 5% 51-500",
                                          "delivery": delivery,
                                          "done_when": "end offsets grew by N and a last sentinel event is visible to "
                                                       "a read_committed consumer"})
    with Scratch() as scratch:
        db = scratch.database("bench_relay")
        install_outbox(db)
        recv_slot = f"bench_recv_{db[-8:]}"
        with psycopg.connect(dbname=db, autocommit=True) as conn:
            conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (recv_slot,))
        prefix = scratch.topic_prefix("bench-relay")
        topic, kcat_topic = f"{prefix}.order", f"{prefix}-kcat.order"
        await create_topics([topic, kcat_topic])
        kcat_file = scratch.file(".kcat")
        value_size = 0
        for i in range(runs):
            run_: dict[str, Any] = {}
            sizes = mixed_sizes(n, seed=i + 1)
            seconds = await asyncio.to_thread(write_events, db, sizes)
            await asyncio.to_thread(Sentinel.write, db)
            with psycopg.connect(dbname=db, autocommit=True) as conn:
                endpos = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()[0]  # type: ignore[index]
            run_["transactions"] = len(sizes)
            run_["write_events_per_s"] = n / seconds
            say(f"run {i + 1}/{runs}: committed {n} events in {len(sizes)} transactions ({n / seconds:,.0f}/s)")
            if i == 0 and baselines:
                value_size = await asyncio.to_thread(kcat_input, db, kcat_file, n)
            if baselines:
                await _pg_recvlogical(run_, n, db, recv_slot, endpos)

            # outbox relay, backlog mode
            async with Offsets([topic]) as offsets, Sentinel(prefix) as sentinel:
                base = await offsets.total()
                log = scratch.file(".relay.log")
                started = time.perf_counter()
                relay = scratch.spawn(relay_args(db, prefix, *delivery_args(delivery, prefix)), log)
                peak_rss, first_at, first_count = 0, None, 0
                while True:
                    done = await offsets.total() - base
                    now = time.perf_counter()
                    peak_rss = max(peak_rss, rss_bytes(relay.pid))
                    if done and first_at is None:
                        first_at, first_count = now, done
                    if done >= n and await sentinel.poll():
                        break
                    if relay.poll() is not None:
                        raise RuntimeError(f"relay exited {relay.returncode}: {log.read_text(errors='replace')[-1500:]}")
                    if now - started > 600:
                        raise RuntimeError(f"relay published {done} of {n} events in 600 s")
                    await asyncio.sleep(0.02)
                elapsed = now - started
            stopped = await asyncio.to_thread(stop_process, relay)
            if stopped != 0:
                raise RuntimeError(f"relay exited {stopped} on SIGTERM: {log.read_text(errors='replace')[-1500:]}")
            run_["relay_events_per_s"] = n / elapsed
            run_["relay_seconds"] = elapsed
            run_["relay_streaming_events_per_s"] = ((n - first_count) / (now - first_at)
                                                    if first_at is not None and now > first_at else float("nan"))
            run_["relay_startup_s"] = (first_at - started) if first_at is not None else float("nan")
            run_["relay_peak_rss_mb"] = peak_rss / 2**20
            if not baselines:
                result.runs.append(run_)
                say(f"run {i + 1}/{runs}: relay ({delivery}) {run_['relay_events_per_s']:,.0f}/s")
                continue
            # kcat: one librdkafka producer, same messages
            async with Offsets([kcat_topic]) as offsets:
                base = await offsets.total()
                started = time.perf_counter()
                proc = await asyncio.to_thread(subprocess.run, [
                    "kcat", "-P", "-b", bootstrap(), "-t", kcat_topic, "-K", "\t", *kcat_headers(),
                    "-X", "acks=all", "-X", "enable.idempotence=true", "-l", str(kcat_file)],
                    capture_output=True, text=True, timeout=600)
                elapsed = time.perf_counter() - started
                if proc.returncode != 0:
                    raise RuntimeError(f"kcat failed: {proc.stderr.strip()}")
                got = await offsets.total() - base
                if got != n:
                    raise RuntimeError(f"kcat produced {got} of {n} messages")
            run_["kcat_events_per_s"] = n / elapsed
            slower = min(run_["pg_recvlogical_events_per_s"], run_["kcat_events_per_s"])
            run_["ratio_to_slower_baseline"] = run_["relay_events_per_s"] / slower
            result.runs.append(run_)
            say(f"run {i + 1}/{runs}: relay {run_['relay_events_per_s']:,.0f}/s, pg_recvlogical "
                f"{run_['pg_recvlogical_events_per_s']:,.0f}/s, kcat {run_['kcat_events_per_s']:,.0f}/s")
        with psycopg.connect(dbname=db, autocommit=True) as conn:
            conn.execute("SELECT pg_drop_replication_slot(%s)", (recv_slot,))

    if not baselines:
        for k in ("relay_events_per_s", "relay_streaming_events_per_s", "relay_startup_s", "relay_peak_rss_mb"):
            result.figures[k] = median([r[k] for r in result.runs])
        return result  # the caller prints and saves
    result.params["value_bytes"] = value_size
    keys = ["relay_events_per_s", "relay_streaming_events_per_s", "relay_startup_s", "pg_recvlogical_events_per_s",
            "kcat_events_per_s", "ratio_to_slower_baseline", "relay_peak_rss_mb", "write_events_per_s"]
    for k in keys:
        result.figures[k] = median([r[k] for r in result.runs])
    f = result.figures
    f["slower_baseline"] = "pg_recvlogical" if f["pg_recvlogical_events_per_s"] < f["kcat_events_per_s"] else "kcat"
    runs_of = lambda k: spread([r[k] for r in result.runs])  # noqa: E731
    print(f"relay: {n} events (~{value_size} B values, mixed transactions, {delivery}), median of {runs} run(s)")
    figure(NAME, "outbox relay (backlog, from process start)", f["relay_events_per_s"], "events/s", runs_of("relay_events_per_s"))
    figure(NAME, "outbox relay (after first event)", f["relay_streaming_events_per_s"], "events/s",
           runs_of("relay_streaming_events_per_s"))
    figure(NAME, "pg_recvlogical (same slot type, /dev/null)", f["pg_recvlogical_events_per_s"], "events/s",
           runs_of("pg_recvlogical_events_per_s"))
    figure(NAME, "kcat -P (acks=all, idempotent)", f["kcat_events_per_s"], "events/s", runs_of("kcat_events_per_s"))
    figure(NAME, f"ratio to slower baseline ({f['slower_baseline']})", f["ratio_to_slower_baseline"], "x",
           runs_of("ratio_to_slower_baseline"))
    figure(NAME, "relay peak RSS (backlog)", f["relay_peak_rss_mb"], "MB", runs_of("relay_peak_rss_mb"))
    result.save()
    return result
