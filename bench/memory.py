"""``python -m bench memory``: the relay's resident memory, idle and under load.

``outbox relay`` runs as a process on a freshly installed store database; its VmRSS (from
/proc/<pid>/status) is read:

- idle: streaming, nothing to send, a few seconds after start (the peak of a few samples);
- under load: while N events are committed as fast as one writer can (transactions of mixed
  sizes, ~400-byte payloads, synchronous_commit off for the writer) and the relay streams them,
  sampled every 20 ms until all N are in Kafka: the peak;
- after: a few seconds after the load, to see what it keeps.

The ``relay`` benchmark reports the peak in backlog mode too (the relay starting on a full slot,
up to --max-in-flight events unacknowledged at once), usually the larger figure.
"""
from __future__ import annotations

import asyncio
import time

from bench.common import (
    Offsets,
    Result,
    Scratch,
    create_topics,
    figure,
    install_outbox,
    median,
    mixed_sizes,
    relay_args,
    rss_bytes,
    say,
    spread,
    wait_slot_active,
    write_events,
)

NAME = "memory"
MB = 2**20


async def _settle(pid: int, seconds: float) -> int:
    peak = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        peak = max(peak, rss_bytes(pid))
        await asyncio.sleep(0.1)
    return peak


async def run(quick: bool, events: int | None = None, runs: int | None = None) -> Result:
    n = events or (10_000 if quick else 200_000)
    runs = runs or (1 if quick else 3)
    idle_s = 1.0 if quick else 5.0
    result = Result(NAME, quick, params={"events": n, "runs": runs, "idle_seconds": idle_s})
    for i in range(runs):
        with Scratch() as scratch:
            db = scratch.database("bench_mem")
            install_outbox(db)
            prefix = scratch.topic_prefix("bench-mem")
            topic = f"{prefix}.order"
            await create_topics([topic])
            log = scratch.file(".relay.log")
            relay = scratch.spawn(relay_args(db, prefix), log)
            await asyncio.to_thread(wait_slot_active, db, relay, log)
            idle = await _settle(relay.pid, idle_s)
            async with Offsets([topic]) as offsets:
                writer = asyncio.create_task(asyncio.to_thread(write_events, db, mixed_sizes(n, seed=i + 1)))
                peak, started = 0, time.monotonic()
                while await offsets.total() < n:
                    peak = max(peak, rss_bytes(relay.pid))
                    if relay.poll() is not None:
                        raise RuntimeError(f"relay exited {relay.returncode}: {log.read_text(errors='replace')[-1500:]}")
                    if time.monotonic() - started > 600:
                        raise RuntimeError("relay did not publish the load within 600 s")
                    await asyncio.sleep(0.02)
                elapsed = time.monotonic() - started
                await writer
            after = await _settle(relay.pid, idle_s)
            run_ = {"run": i + 1, "idle_mb": idle / MB, "load_peak_mb": peak / MB, "after_mb": after / MB,
                    "load_events_per_s": n / elapsed}
            result.runs.append(run_)
            say(f"run {i + 1}/{runs}: idle {run_['idle_mb']:.1f} MB, peak under load {run_['load_peak_mb']:.1f} MB "
                f"({run_['load_events_per_s']:,.0f} events/s end to end), after {run_['after_mb']:.1f} MB")
    f = result.figures
    for k in ("idle_mb", "load_peak_mb", "after_mb", "load_events_per_s"):
        f[k] = median([r[k] for r in result.runs])
    print(f"memory: relay VmRSS, {n} events under load, median of {runs} run(s)")
    figure(NAME, "relay RSS idle", f["idle_mb"], "MB", spread([r["idle_mb"] for r in result.runs]))
    figure(NAME, "relay RSS peak under load", f["load_peak_mb"], "MB", spread([r["load_peak_mb"] for r in result.runs]))
    figure(NAME, "relay RSS after load", f["after_mb"], "MB", spread([r["after_mb"] for r in result.runs]))
    result.save()
    return result
