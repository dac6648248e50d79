"""``python -m bench replay``: how long a full replay of the demo's topics takes.

What ``outbox demo`` builds, at its default size: 3 store databases with the POS schema and the
outbox, a relay each, the read-store consumer, and the demo workload (1,500 transactions per
store; 200 with --quick). Once the read store matches every store, the consumer stops, and the
clock starts: ``outbox replay --group ... --topic <each topic> --from earliest --yes`` (the CLI,
a process), then the consumer starts again and re-applies everything; the clock stops when it
has rewritten its stored offset of every partition up to the topics' end. The read store must
be unchanged afterwards (checksum of every row, event ids included).
"""
from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import psycopg

from bench.common import OUTBOX, Result, Scratch, bootstrap, create_topics, figure, install_outbox, say, wait_slot_active
from outbox.dev.oracles import readstore_checksum, source_checksum
from outbox.dev.pos import POS_CAPTURES, POS_SCHEMA, run_workload

NAME = "replay"
TIMEOUT = 600.0
CHECKSUM = ("SELECT count(*), md5(string_agg(format('%s|%s|%s|%s|%s|%s', source_id, aggregate_type, aggregate_id, "
            "payload, event_id, deleted), ',' ORDER BY source_id, aggregate_type, aggregate_id)) FROM readstore.entities")


async def end_offsets(topics: list[str]) -> dict[Any, int]:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap())
    await consumer.start()
    try:
        tps = [TopicPartition(t, p) for t in topics for p in range(3)]
        return dict(await consumer.end_offsets(tps))
    finally:
        await consumer.stop()


def wait(check: Any, what: str, procs: list[Any]) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not check():
        if any(p.poll() is not None for p in procs):
            raise RuntimeError(f"a process exited while waiting for {what}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not after {TIMEOUT:.0f} s")
        time.sleep(0.2)


async def run(quick: bool) -> Result:
    stores, transactions = 3, (200 if quick else 1500)
    result = Result(NAME, quick, params={"stores": stores, "transactions_per_store": transactions, "partitions": 3})
    with Scratch() as scratch:
        prefix = scratch.topic_prefix("bench-replay")
        topics = [f"{prefix}.{agg}" for agg, _ in POS_CAPTURES.values()]
        await create_topics(topics)
        dbs = {f"store{i}": scratch.database("bench_replay_store") for i in range(1, stores + 1)}
        readstore = scratch.database("bench_replay_rs")
        for db in dbs.values():
            with psycopg.connect(dbname=db) as conn:
                conn.execute(POS_SCHEMA)
            install_outbox(db, [f"{t}={agg}" for t, (agg, _) in POS_CAPTURES.items()])
        group = f"{prefix}-readstore"
        consume = OUTBOX + ["consume", "readstore", "--dsn", f"dbname={readstore}", "--kafka-bootstrap", bootstrap(),
                            "--topic-prefix", prefix, "--group", group]
        procs = []
        for source, db in dbs.items():
            log = scratch.file(".log")
            proc = scratch.spawn(OUTBOX + ["relay", "--dsn", f"dbname={db}", "--source-id", source, "--kafka-bootstrap",
                                           bootstrap(), "--topic-prefix", prefix], log)
            wait_slot_active(db, proc, log)
            procs.append(proc)
        consumer = scratch.spawn(consume)
        writers = [threading.Thread(target=run_workload, args=(f"dbname={db}", transactions, n))
                   for n, db in enumerate(dbs.values())]
        for w in writers:
            w.start()
        for w in writers:
            w.join()
        expected = {}
        for source, db in dbs.items():
            with psycopg.connect(dbname=db) as conn:
                expected[source] = source_checksum(conn)

        def converged() -> bool:
            try:
                with psycopg.connect(dbname=readstore) as conn:
                    return all(readstore_checksum(conn, s) == expected[s] for s in dbs)
            except psycopg.errors.UndefinedTable:
                return False

        wait(converged, "the read store to match the stores", procs + [consumer])
        scratch.processes.remove(consumer)
        from bench.common import stop_process

        stop_process(consumer)
        ends = await end_offsets(topics)
        events = sum(ends.values())
        with psycopg.connect(dbname=readstore) as conn:
            before = conn.execute(CHECKSUM).fetchone()
            since = conn.execute("SELECT clock_timestamp()").fetchone()[0]  # type: ignore[index]
        say(f"{events} events on {len(topics)} topics; read store converged; replaying from earliest")

        started = time.perf_counter()
        await asyncio.to_thread(_replay_cli, group, topics)
        cli_done = time.perf_counter()
        consumer = scratch.spawn(consume)

        def replayed() -> bool:
            with psycopg.connect(dbname=readstore) as conn:
                rows = conn.execute("SELECT topic, partition, next_offset FROM readstore.consumer_offsets "
                                    "WHERE group_id = %s AND updated_at > %s", (group, since)).fetchall()
            again = {(t, p): o for t, p, o in rows}
            return all(again.get((tp.topic, tp.partition), -1) >= end for tp, end in ends.items() if end)

        wait(replayed, "the replay to be re-applied", procs + [consumer])
        seconds = time.perf_counter() - started
        with psycopg.connect(dbname=readstore) as conn:
            after = conn.execute(CHECKSUM).fetchone()
        if after != before:
            raise RuntimeError(f"the replay changed the read store: {before} -> {after}")
    result.runs.append({"events": events, "seconds": seconds, "cli_seconds": cli_done - started})
    f = result.figures
    f.update(events=events, seconds=seconds, events_per_s=events / seconds, cli_seconds=cli_done - started)
    print(f"replay: {events} events of {stores} demo stores ({transactions} transactions each), from earliest")
    figure(NAME, "full replay into the read store", seconds, "s", f"{events} events, read store unchanged")
    figure(NAME, "full replay rate", events / seconds, "events/s")
    figure(NAME, "outbox replay command (plan + rewind)", cli_done - started, "s")
    result.save()
    return result


def _replay_cli(group: str, topics: list[str]) -> None:
    import subprocess

    args = OUTBOX + ["replay", "--group", group, "--from", "earliest", "--yes", "--kafka-bootstrap", bootstrap()]
    for t in topics:
        args += ["--topic", t]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"outbox replay failed: {proc.stderr.strip()[-500:]}")
