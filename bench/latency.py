"""``python -m bench latency``: commit-to-Kafka and commit-to-read-store latency at fixed rates.

The whole pipeline runs as the real commands (``outbox relay``, ``outbox consume readstore``)
while a paced writer process (``bench.writer``: a batch every 10 ms tick, transactions of up to
20 events inserted straight into outbox.events, synchronous_commit on) commits at 1k, 5k and
10k events/s in turn. Latencies are measured per event, all on this machine's one clock:

- commit → Kafka: the Kafka record timestamp minus ``ce_time`` (the source transaction's commit
  time, from the WAL). The topic is created with ``message.timestamp.type=LogAppendTime``, so
  the record timestamp is the broker's append time (not the producer's CreateTime at send);
  it has millisecond resolution, ``ce_time`` microseconds.
- commit → consumer: the time an aiokafka consumer in the benchmark process received the
  record, minus ``ce_time`` (includes the fetch wait; informative).
- commit → read store: ``readstore.entities.applied_at - source_committed_at`` (every event
  has its own aggregate id, so every event leaves its own row).

The first second of each rate (half a second with --quick) is left out as warm-up; a
two-second warm-up at 500 events/s runs before the first rate.
"""
from __future__ import annotations

import asyncio
import json
import sys
import time
from datetime import datetime
from typing import Any

import psycopg

from bench.common import (
    OUTBOX,
    Result,
    Scratch,
    bootstrap,
    create_topics,
    delivery_args,
    figure,
    install_outbox,
    median,
    percentile,
    relay_args,
    say,
    spread,
    wait_slot_active,
)
from outbox import contract

NAME = "latency"


class Collector:
    """Reads every record of the topics from their current end: (ce_time, Kafka timestamp, received)."""

    def __init__(self, topic: str) -> None:
        self.topic = topic  # read as the read store does (read_committed): what a consumer can see
        self.samples: list[tuple[float, float, float]] = []
        self.timestamp_types: set[int] = set()
        self._task: asyncio.Task[None] | None = None
        self._consumer: Any = None

    async def start(self) -> None:
        from aiokafka import AIOKafkaConsumer, TopicPartition

        self._consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap(), enable_auto_commit=False, fetch_max_wait_ms=50,
                                          isolation_level="read_committed")
        await self._consumer.start()
        partitions = [TopicPartition(self.topic, p) for p in range(3)]
        self._consumer.assign(partitions)
        await self._consumer.seek_to_end(*partitions)
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            batches = await self._consumer.getmany(timeout_ms=200)
            received = time.time()
            for records in batches.values():
                for r in records:
                    ce_time = next(v for k, v in r.headers if k == contract.H_TIME)
                    committed = datetime.fromisoformat(ce_time.decode().replace("Z", "+00:00")).timestamp()
                    self.samples.append((committed, r.timestamp / 1000.0, received))
                    self.timestamp_types.add(r.timestamp_type)

    def window(self, start: float, end: float) -> list[tuple[float, float, float]]:
        return [s for s in self.samples if start <= s[0] < end]

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._consumer is not None:
            await self._consumer.stop()


async def _write(dbname: str, rate: float, seconds: float) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "bench.writer", dbname, str(rate), str(seconds),
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"writer failed: {err.decode().strip()[-1000:]}")
    return dict(json.loads(out.decode().strip().splitlines()[-1]))


def _readstore_latencies(rs_db: str, start: float, end: float) -> list[float]:
    with psycopg.connect(dbname=rs_db) as conn:
        rows = conn.execute(
            "SELECT extract(epoch FROM applied_at - source_committed_at) * 1000 FROM readstore.entities"
            " WHERE source_committed_at >= to_timestamp(%s) AND source_committed_at < to_timestamp(%s)",
            (start, end)).fetchall()
    return [float(r[0]) for r in rows]


def _readstore_count(rs_db: str, start: float, end: float) -> int:
    with psycopg.connect(dbname=rs_db) as conn:
        try:
            return int(conn.execute(  # type: ignore[index]
                "SELECT count(*) FROM readstore.entities WHERE source_committed_at >= to_timestamp(%s)"
                " AND source_committed_at < to_timestamp(%s)", (start, end)).fetchone()[0])
        except psycopg.errors.UndefinedTable:
            return 0


def _stats(values: list[float]) -> dict[str, float]:
    return {"p50": percentile(values, 0.50), "p95": percentile(values, 0.95), "p99": percentile(values, 0.99),
            "max": max(values) if values else float("nan"), "count": len(values)}


async def run(quick: bool, rates: list[int] | None = None, seconds: float | None = None, runs: int | None = None,
              delivery: str = "at-least-once", report: bool = True) -> Result:
    """``report=False``: measure only (``bench delivery`` prints and saves the interleaved runs itself)."""
    rates = rates or ([1000, 5000] if quick else [1000, 5000, 10000])
    seconds = seconds or (3.0 if quick else 15.0)
    runs = runs or (1 if quick else 3)
    warmup = 0.5 if quick else 1.0
    result = Result(NAME, quick, params={"rates": rates, "seconds": seconds, "runs": runs, "warmup_s": warmup,
                                          "txn_size": 20, "tick_ms": 10, "delivery": delivery})
    for i in range(runs):
        with Scratch() as scratch:
            db = scratch.database("bench_lat")
            rs_db = scratch.database("bench_lat_rs")
            install_outbox(db)
            prefix = scratch.topic_prefix("bench-lat")
            topic = f"{prefix}.order"
            await create_topics([topic], configs={"message.timestamp.type": "LogAppendTime"})
            relay_log, rs_log = scratch.file(".relay.log"), scratch.file(".readstore.log")
            relay = scratch.spawn(relay_args(db, prefix, *delivery_args(delivery, prefix)), relay_log)
            consumer = scratch.spawn(OUTBOX + ["consume", "readstore", "--dsn", f"dbname={rs_db}", "--kafka-bootstrap",
                                               bootstrap(), "--topic-prefix", prefix, "--group", f"{prefix}-rs"], rs_log)
            await asyncio.to_thread(wait_slot_active, db, relay, relay_log)
            deadline = time.monotonic() + 60
            while b"assigned" not in rs_log.read_bytes():
                if consumer.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"read-store consumer not ready: {rs_log.read_text(errors='replace')[-1500:]}")
                await asyncio.sleep(0.1)
            collector = Collector(topic)
            await collector.start()
            try:
                await _write(db, 500, 2.0)  # warm-up, not measured
                for rate in rates:
                    started = time.time()
                    written = await _write(db, rate, seconds)
                    ended = time.time()
                    # wait until every event of this phase reached Kafka and the read store
                    deadline = time.monotonic() + 120
                    while True:
                        in_kafka = len(collector.window(started, ended))
                        in_store = await asyncio.to_thread(_readstore_count, rs_db, started, ended)
                        if in_kafka >= written["events"] and in_store >= written["events"]:
                            break
                        for proc, log in ((relay, relay_log), (consumer, rs_log)):
                            if proc.poll() is not None:
                                raise RuntimeError(f"a pipeline process exited: {log.read_text(errors='replace')[-1500:]}")
                        if time.monotonic() > deadline:
                            raise RuntimeError(f"at {rate}/s: {in_kafka} in Kafka, {in_store} in the read store, "
                                               f"of {written['events']} written, after 120 s")
                        await asyncio.sleep(0.2)
                    measured_from = started + warmup
                    samples = collector.window(measured_from, ended)
                    to_kafka = [(ts - c) * 1000 for c, ts, _ in samples]
                    to_consumer = [(rx - c) * 1000 for c, _, rx in samples]
                    to_store = await asyncio.to_thread(_readstore_latencies, rs_db, measured_from, ended)
                    result.runs.append({"run": i + 1, "rate": rate, "achieved_rate": written["rate"],
                                        "late_ticks": written["late_ticks"], "events": written["events"],
                                        "kafka_ms": _stats(to_kafka), "consumer_ms": _stats(to_consumer),
                                        "readstore_ms": _stats(to_store)})
                    say(f"run {i + 1}/{runs} at {rate}/s (achieved {written['rate']:,.0f}/s): commit→Kafka p99 "
                        f"{percentile(to_kafka, 0.99):.1f} ms, commit→read store p99 {percentile(to_store, 0.99):.1f} ms")
            finally:
                await collector.stop()
            result.params["kafka_timestamp_type"] = ("LogAppendTime" if collector.timestamp_types == {1} else
                                                     f"types seen {sorted(collector.timestamp_types)}")
    if not report:
        return result

    print(f"latency: pipeline at fixed rates for {seconds:.0f} s each (first {warmup:g} s left out), "
          f"{delivery}, median of {runs} run(s) per figure")
    for rate in rates:
        rows = [r for r in result.runs if r["rate"] == rate]
        fig: dict[str, Any] = {"achieved_rate": median([r["achieved_rate"] for r in rows])}
        for hop, label in (("kafka_ms", "commit→Kafka"), ("readstore_ms", "commit→read store"),
                           ("consumer_ms", "commit→consumer receive")):
            fig[hop] = {q: median([r[hop][q] for r in rows]) for q in ("p50", "p95", "p99", "max")}
            for q in ("p50", "p95", "p99", "max"):
                if hop == "consumer_ms" and q in ("p50", "p95"):
                    continue
                figure(NAME, f"{rate // 1000}k/s {label} {q}", fig[hop][q], "ms", spread([r[hop][q] for r in rows]))
        figure(NAME, f"{rate // 1000}k/s achieved write rate", fig["achieved_rate"], "events/s",
               spread([r["achieved_rate"] for r in rows]))
        result.figures[str(rate)] = fig
    result.save()
    return result
