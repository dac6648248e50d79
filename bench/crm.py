"""``python -m bench crm``: CRM sink throughput against the reference CRM, at 0% and 30% failures.

N order events (the consumer benchmark's ~400-byte payloads, one aggregate id each, one topic of 3
partitions) are produced beforehand. Each run starts a fresh reference CRM (``outbox dev crm``, a
real process with its own database) and a fresh ledger database, then ``run_crm`` in this process
(batches of 50, 4 calls in flight, no client-side rate limit: --rate 10000) is timed until its
ledger's offsets cover all N events. At 30% failures the CRM answers 15% of calls 500 (half of
them after committing the write) and 15% 429 with Retry-After: 1 (seconds or HTTP-date); the sink
holds all calls for that second, as a CRM asks; a third set of runs has the same failures with
Retry-After: 0, to show what the retries cost without those waits. Figures: events/s from the sink's start (group
join included), the share of calls that failed and were retried, and a check that the CRM holds
exactly N records, each written once.
"""
from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.request
from typing import Any

import psycopg
from prometheus_client import REGISTRY

from bench.common import OUTBOX, Result, Scratch, bootstrap, create_topics, figure, median, say, spread
from bench.consumer import produce

NAME = "crm"
FAULTS_30 = {"error_rate": 0.15, "rate_limit_rate": 0.15, "retry_after": 1, "retry_after_form": "mixed",
             "after_write_share": 0.5}
# label -> (key in the saved figures, faults)
FAULTS: dict[str, tuple[str, dict[str, Any]]] = {
    "0%": ("0", {}),
    "30%": ("30", FAULTS_30),
    # the same failures with Retry-After: 0: what the retries themselves cost, without the waits the CRM asks for
    "30% (Retry-After 0)": ("30_ra0", {**FAULTS_30, "retry_after": 0}),
}


def _start_crm(scratch: Scratch, seed: int) -> tuple[str, str]:
    db = scratch.database("bench_crm_ref")
    log = scratch.file(".log")
    proc = scratch.spawn(OUTBOX + ["dev", "crm", "--port", "0", "--dsn", f"dbname={db}", "--seed", str(seed)], log)
    deadline = time.time() + 30
    while time.time() < deadline:
        if found := re.search(r"listening on (http://127\.0\.0\.1:\d+)", log.read_text(errors="replace")):
            return found.group(1), db
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    raise RuntimeError(f"reference CRM did not start: {log.read_text(errors='replace')[-500:]}")


def _set_faults(url: str, faults: dict[str, Any]) -> None:
    request = urllib.request.Request(f"{url}/admin/faults", data=json.dumps(faults).encode(), method="PUT")
    urllib.request.urlopen(request, timeout=10).close()


def _calls(group: str) -> tuple[float, float, float]:
    """(all calls, calls answered 2xx, seconds held back by Retry-After) of a sink group, from this process's metrics."""
    total = ok = 0.0
    for family in REGISTRY.collect():
        if family.name == "outbox_crm_calls":
            for s in family.samples:
                if s.name.endswith("_total") and s.labels.get("group") == group:
                    total += s.value
                    ok += s.value if s.labels.get("outcome") == "2xx" else 0
    held = REGISTRY.get_sample_value("outbox_crm_throttled_seconds_total", {"group": group}) or 0.0
    return total, ok, held


async def _done(conn: psycopg.AsyncConnection[Any], group: str) -> int:
    cur = await conn.execute("SELECT coalesce(sum(next_offset), 0) FROM crm_sink.consumer_offsets WHERE group_id = %s",
                             (group,))
    row = await cur.fetchone()
    return int(row[0]) if row else 0


async def _one_run(scratch: Scratch, prefix: str, n: int, label: str, i: int) -> dict[str, Any]:
    from outbox.config import KafkaSettings
    from outbox.consumers.crm import CrmSinkSettings, run_crm

    url, crm_db = await asyncio.to_thread(_start_crm, scratch, i)
    await asyncio.to_thread(_set_faults, url, FAULTS[label][1])
    ledger = scratch.database("bench_crm_ledger")
    group = f"{prefix}-{FAULTS[label][0]}-{i}"
    settings = CrmSinkSettings(crm_url=url, dsn=f"dbname={ledger}", kafka=KafkaSettings(bootstrap=bootstrap()),
                               topic_prefix=prefix, group=group, rate=10000, batch_size=50, concurrency=4,
                               retry_base=0.05, retry_max=2, max_attempts=50)
    stop = asyncio.Event()
    started = time.perf_counter()
    task = asyncio.create_task(run_crm(settings, stop))
    done = 0
    async with await psycopg.AsyncConnection.connect(dbname=ledger, autocommit=True) as conn:
        while True:
            await asyncio.sleep(0.05)
            if task.done():
                task.result()
                raise RuntimeError("run_crm stopped early")
            try:
                done = await _done(conn, group)
            except psycopg.errors.UndefinedTable:  # the sink has not created its schema yet
                continue
            if done >= n:
                break
            if time.perf_counter() - started > 900:
                raise RuntimeError(f"the CRM sink finished {done} of {n} events in 900 s")
    elapsed = time.perf_counter() - started
    stop.set()
    await task
    total, ok, held = _calls(group)
    with psycopg.connect(dbname=crm_db) as conn:
        records, writes, keys = conn.execute(
            "SELECT (SELECT count(*) FROM crm.records), count(*), count(DISTINCT idempotency_key) FROM crm.writes"
        ).fetchone()  # type: ignore[misc]
    if not records == writes == keys == n:
        raise RuntimeError(f"the CRM holds {records} records from {writes} writes of {keys} events, not {n}")
    return {"run": i + 1, "failures": label, "events_per_s": n / elapsed, "seconds": elapsed, "calls": total,
            "retried_share": (total - ok) / total if total else 0.0, "held_share": held / elapsed}


async def run(quick: bool, events: int | None = None, runs: int | None = None) -> Result:
    n = events or (2000 if quick else 20_000)
    runs = runs or (1 if quick else 3)
    result = Result(NAME, quick, params={"events": n, "runs": runs, "partitions": 3, "batch_size": 50, "concurrency": 4,
                                          "rate": "unlimited (10000/s)", "faults_30": FAULTS_30})
    with Scratch() as scratch:
        prefix = scratch.topic_prefix("bench-crm")
        await create_topics([f"{prefix}.order"])
        say(f"produced {n} events ({await produce(prefix, n):,.0f}/s with aiokafka)")
        for label in FAULTS:
            for i in range(runs):
                run_ = await _one_run(scratch, prefix, n, label, i)
                result.runs.append(run_)
                say(f"{label} failures, run {i + 1}/{runs}: {run_['events_per_s']:,.0f} events/s, "
                    f"{run_['calls']:.0f} calls, {run_['retried_share']:.1%} retried, "
                    f"{run_['held_share']:.0%} of the time held back by Retry-After")
    print(f"crm: CRM sink applying {n} pre-produced events to the reference CRM, median of {runs} run(s)")
    for label in FAULTS:
        mine = [r for r in result.runs if r["failures"] == label]
        key = FAULTS[label][0]
        result.figures[f"events_per_s_{key}"] = median([r["events_per_s"] for r in mine])
        result.figures[f"retried_share_{key}"] = median([r["retried_share"] for r in mine])
        figure(NAME, f"CRM sink at {label} failures", result.figures[f"events_per_s_{key}"], "events/s",
               spread([r["events_per_s"] for r in mine]))
        figure(NAME, f"calls retried at {label} failures", 100 * result.figures[f"retried_share_{key}"], "%")
        result.figures[f"held_share_{key}"] = median([r["held_share"] for r in mine])
        figure(NAME, f"time held by Retry-After at {label} failures", 100 * result.figures[f"held_share_{key}"], "%")
    result.save()
    return result
