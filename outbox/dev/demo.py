"""``outbox demo``: a few POS store databases streaming into a central read store, end to end.

It starts the sandbox, creates store databases with a small legacy POS schema, installs the
outbox, runs one relay per store and the read-store consumer (as the real commands, in
subprocesses), drives a workload, and ends by checking that the read store matches the stores
and reporting how fast events flowed.
"""
from __future__ import annotations

import asyncio
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import click
import psycopg

from outbox import contract
from outbox.dev import oracles
from outbox.dev.pos import NAMES, POS_CAPTURES, POS_SCHEMA, SKUS, WorkloadResult, drop_database, recreate_database, run_workload
from outbox.errors import OutboxError

# the POS data and workload live in outbox/dev/pos.py (the tests and benchmarks use them too)
__all__ = ["NAMES", "POS_CAPTURES", "POS_SCHEMA", "SKUS", "WorkloadResult", "demo", "drop_database", "recreate_database",
           "run_workload"]

# --------------------------------------------------------------------------- comparing: outbox/dev/oracles.py
# --------------------------------------------------------------------------- processes
def outbox_command() -> list[str]:
    return [sys.executable, "-m", "outbox.cli"]


def run_checked(args: list[str], what: str) -> str:
    proc = subprocess.run(outbox_command() + args, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        raise OutboxError(f"{what} failed: {lines[-1] if lines else 'exit ' + str(proc.returncode)}")
    return proc.stdout


async def _prepare_topics(bootstrap: str, prefix: str) -> None:
    """Drop the topics of earlier demo runs and create this run's, so consumers see them at once."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        old = [t for t in await admin.list_topics() if t.startswith("demo-")]
        if old:
            await admin.delete_topics(old)
        await admin.create_topics([NewTopic(f"{prefix}.{agg}", num_partitions=3, replication_factor=1)
                                   for agg, _ in POS_CAPTURES.values()])
    finally:
        await admin.close()


def _wait_ready(store_names: list[str], consumer_log: Path, procs: list[subprocess.Popen[bytes]], timeout: float = 60) -> None:
    """Until every relay streams its slot and the consumer has its partitions."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for p in procs:
            if p.poll() is not None:
                raise OutboxError(f"a pipeline process exited with {p.returncode} at start: see the logs in {consumer_log.parent}")
        streaming = 0
        with psycopg.connect(dbname="postgres", autocommit=True) as conn:
            streaming = conn.execute("SELECT count(*) FROM pg_replication_slots WHERE active AND database = ANY(%s)",
                                     (store_names,)).fetchone()[0]  # type: ignore[index]
        if streaming == len(store_names) and b"assigned" in consumer_log.read_bytes():
            return
        time.sleep(0.2)
    raise OutboxError(f"the pipeline did not start within {timeout:.0f} s: see the logs in {consumer_log.parent}")


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


@click.command()
@click.option("--stores", default=3, show_default=True, type=click.IntRange(1, 20), help="Store databases to create.")
@click.option("--transactions", default=1500, show_default=True, type=click.IntRange(1),
              help="Transactions per store.")
@click.option("--timeout", default=180.0, show_default=True, help="Seconds to wait for the read store to converge.")
@click.option("--seed", default=1, show_default=True, help="Workload random seed.")
@click.option("--crm", "with_crm", is_flag=True,
              help="Also keep the reference CRM current (database demo_crm) and send an agent's edit back to a "
                   "store (docs/crm.md).")
def demo(stores: int, transactions: int, timeout: float, seed: int, with_crm: bool) -> None:
    """Run the whole pipeline on the local sandbox and check the result.

    Starts the sandbox (outbox dev up), creates the store databases demo_store1..N with a small
    legacy POS schema (customers, orders, order lines), installs the outbox into each, starts a
    relay per store and the read-store consumer, runs a workload (with rollbacks), waits until
    the read store (database demo_readstore) matches every store, and reports events/s and
    commit-to-read-store latency. The databases and topics are left for you to explore.
    """
    from outbox.dev.sandbox import Sandbox

    def say(msg: str) -> None:
        click.echo(msg, err=True)

    sandbox = Sandbox()
    sandbox.up()
    os.environ.update(sandbox.env())
    bootstrap = os.environ["KAFKA_BOOTSTRAP_SERVERS"]
    prefix = time.strftime("demo-%Y%m%d%H%M%S")
    asyncio.run(_prepare_topics(bootstrap, prefix))

    store_names = [f"demo_store{i}" for i in range(1, stores + 1)]
    with psycopg.connect(dbname="postgres", autocommit=True) as conn:
        earlier = [r[0] for r in conn.execute("SELECT datname FROM pg_database WHERE datname ~ '^demo_store[0-9]+$'")]
    for name in sorted(set(earlier) - set(store_names)):
        drop_database(name)  # a store of an earlier, larger run: its idle slot would pin WAL
    for name in store_names + ["demo_readstore"]:
        recreate_database(name)
    for name in store_names:
        with psycopg.connect(dbname=name) as conn:
            conn.execute(POS_SCHEMA)
        captures = [arg for table, (agg, _) in POS_CAPTURES.items() for arg in ("--capture", f"{table}={agg}")]
        run_checked(["install", "--dsn", f"dbname={name}", *captures], f"outbox install into {name}")
    say(f"created {stores} store databases with the POS schema and installed the outbox; topics {prefix}.*")

    procs: list[subprocess.Popen[bytes]] = []
    logdir = sandbox.directory / "demo-logs"
    logdir.mkdir(parents=True, exist_ok=True)

    def spawn(args: list[str], log_name: str) -> None:
        log = open(logdir / log_name, "wb")
        procs.append(subprocess.Popen(outbox_command() + args, stdout=log, stderr=subprocess.STDOUT))
        log.close()

    try:
        for i, name in enumerate(store_names, 1):
            spawn(["relay", "--dsn", f"dbname={name}", "--source-id", f"store{i}", "--kafka-bootstrap", bootstrap,
                   "--topic-prefix", prefix], f"relay-store{i}.log")
        spawn(["consume", "readstore", "--dsn", "dbname=demo_readstore", "--kafka-bootstrap", bootstrap,
               "--topic-prefix", prefix, "--group", f"{prefix}-readstore"], "readstore.log")
        crm = None
        if with_crm:
            from outbox.dev.demo_crm import CrmDemo

            crm = CrmDemo(spawn, procs, logdir, bootstrap, prefix, {f"store{i}": n for i, n in enumerate(store_names, 1)})
            crm.start()
        _wait_ready(store_names, logdir / "readstore.log", procs)
        say(f"started {stores} relays and the read-store consumer{' and the CRM sync' if crm else ''} (logs in {logdir})")

        say(f"running the workload: {transactions} transactions in each store, concurrently...")
        results: list[WorkloadResult] = [WorkloadResult() for _ in store_names]
        started = time.time()
        threads = [threading.Thread(target=lambda i=i, n=n: results.__setitem__(i, run_workload(f"dbname={n}", transactions, seed + i)))
                   for i, n in enumerate(store_names)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        written = time.time() - started
        committed = sum(r.committed for r in results)
        say(f"workload done in {written:.1f} s: {committed} transactions committed, "
            f"{sum(r.rolled_back for r in results)} rolled back; waiting for the read store to converge...")

        expected = {}
        events = 0
        for i, name in enumerate(store_names, 1):
            with psycopg.connect(dbname=name) as conn:
                expected[f"store{i}"] = oracles.source_checksum(conn)
                events += conn.execute("SELECT count(*) FROM outbox.events WHERE type <> %s",
                                       (contract.HEARTBEAT_TYPE,)).fetchone()[0]  # type: ignore[index]
        deadline = time.time() + timeout
        with psycopg.connect(dbname="demo_readstore", autocommit=True) as rs:
            while True:
                for p in procs:
                    if p.poll() is not None:
                        raise OutboxError(f"a pipeline process exited with {p.returncode}: see the logs in {logdir}")
                actual = {}
                try:
                    actual = {s: oracles.readstore_checksum(rs, s) for s in expected}
                except psycopg.errors.UndefinedTable:
                    pass
                if actual == expected:
                    break
                if time.time() > deadline:
                    raise OutboxError(f"the read store did not converge within {timeout:.0f} s: see the logs in {logdir}")
                time.sleep(0.25)
            converged = time.time()
            latencies = [r[0] for r in rs.execute(
                "SELECT extract(epoch FROM applied_at - source_committed_at) * 1000 FROM readstore.entities").fetchall()]
            last_applied, first_commit = rs.execute(
                "SELECT extract(epoch FROM max(applied_at)), extract(epoch FROM min(source_committed_at)) FROM readstore.entities"
            ).fetchone()  # type: ignore[misc]
        span = float(last_applied) - max(float(first_commit), started)
        lat = [float(v) for v in latencies]
        click.echo("")
        click.echo(f"{'store':<10}{'aggregate':<12}{'rows':>8}  match")
        for source, sums in expected.items():
            for aggregate, (count, _) in sums.items():
                click.echo(f"{source:<10}{aggregate:<12}{count:>8}  yes")
        click.echo("")
        click.echo(f"read store matches all {stores} stores: {events} events from {committed} transactions "
                   f"in {converged - started:.1f} s")
        click.echo(f"throughput: {events / span:,.0f} events/s (first commit to last event applied)")
        click.echo(f"commit-to-read-store latency over the {len(lat)} current rows: p50 {statistics.median(lat):.0f} ms, "
                   f"p99 {percentile(lat, 0.99):.0f} ms, max {max(lat):.0f} ms")
        if crm is not None:
            records = crm.wait_converged(timeout)
            click.echo(f"CRM matches all {stores} stores: {records} contacts and orders, {time.time() - started:.1f} s "
                       "after the first commit")
            external, took = crm.agent_edit()
            click.echo(f"an agent's edit of contact {external} in the CRM reached its store in {took * 1000:.0f} ms "
                       "(and was not sent back: origin crm)")
        me = sys.argv[0] if os.path.basename(sys.argv[0]) == "outbox" else "outbox"
        click.echo(f"explore: eval \"$({me} dev env)\"; psql -d demo_readstore -c 'SELECT * FROM readstore.current_entities LIMIT 5'")
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=40)
            except subprocess.TimeoutExpired:
                p.kill()
