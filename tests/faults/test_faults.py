"""The fault suite: a concurrent writer commits and rolls back POS transactions while something
breaks; afterwards an independent read_committed consumer (kcat) must find every committed event,
nothing of a rolled-back transaction, every key in order, and (exactly-once) no duplicate.

Each scenario appends its line to the fault table (tests/faults/report.py; docs/faults.md).
Relays are real ``outbox relay`` processes; servers are the test sandbox's. For server restarts
and SIGSTOP the relay must recover by itself: the test never restarts it there.
"""
from __future__ import annotations

import contextlib
import random
import signal
import time
from collections.abc import Callable, Iterator

import psycopg
import pytest

from outbox.consumers.kafka import FAULT_KILL_AFTER_SINK_COMMIT
from outbox.dev.sandbox import Sandbox
from tests.faults.checker import CheckResult
from tests.faults.harness import SOURCE_ID, Pipeline, record_outcome, restart, run_with_writer
from tests.faults.writer import Writer
from tests.support.processes import ConsumerProcess, wait_converged
from tests.support.wait import wait_until

pytestmark = pytest.mark.integration

KILLS = 20
EXACTLY_ONCE = ("--delivery", "exactly-once")


def writer_for(p: Pipeline, seed: int) -> Callable[[], Writer]:
    return lambda: Writer(p.dsn, connections=3, seed=seed, pause=0.05)


def assert_kept_promises(result: CheckResult, *, duplicates_allowed: bool) -> None:
    problems = result.problems(duplicates_allowed=duplicates_allowed)
    assert not problems, f"{result.summary()}: " + "; ".join(problems)
    assert result.expected > 100, f"too few events to prove anything: {result.summary()}"


def supervise(p: Pipeline) -> int:
    """Start the relay again if it exited by itself (a supervisor's job); 1 when it had to."""
    proc = p.relay.proc
    if proc is not None and proc.poll() is not None:
        p.start_relay(wait=False)
        return 1
    return 0


@pytest.mark.parametrize("delivery", ["at-least-once", "exactly-once"])
def test_relay_sigkill_at_random_moments(pipeline: Callable[..., Pipeline], topic_prefix: str, delivery: str) -> None:
    # exactly-once: an offsets topic of the test's own (removed with its topics)
    p = pipeline(*(EXACTLY_ONCE + ("--offsets-topic", f"__{topic_prefix}_offsets") if delivery == "exactly-once" else ()))
    p.start_relay()
    rng = random.Random(20)
    exits = 0

    def kill_and_restart() -> float:
        nonlocal exits
        for _ in range(KILLS):
            time.sleep(rng.uniform(0.2, 2.5))  # sometimes while starting, mostly while streaming
            exits += supervise(p)
            p.relay.kill()
            p.start_relay(wait=False)  # as a supervisor would
        restarted = time.monotonic()
        p.relay.wait_streaming(60)
        return p.wait_caught_up(restarted)

    record, recover = run_with_writer(p, writer_for(p, 1), kill_and_restart)
    result = p.settle(record)
    record_outcome(f"relay SIGKILL x{KILLS} ({delivery})", result, record, recover,
                   f"{exits} restarts after the relay exited on its own" if exits else "")
    assert_kept_promises(result, duplicates_allowed=delivery == "at-least-once")
    p.assert_relay_alive()


@contextlib.contextmanager
def wal_sender_timeout(dsn: str, value: str) -> Iterator[None]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"ALTER SYSTEM SET wal_sender_timeout = '{value}'")
        conn.execute("SELECT pg_reload_conf()")
    try:
        yield
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("ALTER SYSTEM RESET wal_sender_timeout")
            conn.execute("SELECT pg_reload_conf()")


def slot_active(dsn: str) -> bool:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return bool(conn.execute("SELECT bool_or(active) FROM pg_replication_slots WHERE database = current_database()")
                    .fetchone()[0])  # type: ignore[index]


def test_relay_sigstop_longer_than_wal_sender_timeout(pipeline: Callable[..., Pipeline]) -> None:
    p = pipeline()
    timeout_s, stopped_s = 2, 8
    with wal_sender_timeout(p.dsn, f"{timeout_s}s"):
        p.start_relay()
        dropped = False

        def stop_and_continue() -> float:
            nonlocal dropped
            proc = p.relay.proc
            assert proc is not None
            proc.send_signal(signal.SIGSTOP)
            stopped = time.monotonic()
            try:
                wait_until(lambda: not slot_active(p.dsn), timeout=stopped_s,
                           message=f"PostgreSQL to drop the stopped relay's connection (wal_sender_timeout {timeout_s} s)")
                dropped = True
                time.sleep(max(0.0, stopped_s - (time.monotonic() - stopped)))  # stopped for the scenario's length
            finally:
                proc.send_signal(signal.SIGCONT)
            resumed = time.monotonic()
            return p.wait_caught_up(resumed)

        record, recover = run_with_writer(p, writer_for(p, 2), stop_and_continue)
    assert dropped, f"PostgreSQL did not drop the stopped relay's connection within {stopped_s} s"
    result = p.settle(record)
    record_outcome(f"relay SIGSTOP {stopped_s} s > wal_sender_timeout {timeout_s} s", result, record, recover)
    assert_kept_promises(result, duplicates_allowed=True)
    p.assert_relay_alive()


@pytest.mark.parametrize("server", ["kafka", "postgres"])
def test_server_restart_during_the_workload(pipeline: Callable[..., Pipeline], server: str, sandbox: Sandbox) -> None:
    p = pipeline()
    p.start_relay()

    def restart_server() -> float:
        back = restart(sandbox, server, down_for=3.0)
        return p.wait_caught_up(back)

    record, recover = run_with_writer(p, writer_for(p, 3), restart_server, after=4.0)
    result = p.settle(record)
    name = "Kafka broker" if server == "kafka" else "PostgreSQL"
    record_outcome(f"{name} restart (down 3 s)", result, record, recover,
                   f"{record.ambiguous_resolved} commits resolved after the connection broke" if record.ambiguous_resolved else "")
    assert_kept_promises(result, duplicates_allowed=True)
    p.assert_relay_alive()


def test_readstore_consumer_killed_between_sink_commit_and_offset_commit(
        pipeline: Callable[..., Pipeline], new_database: Callable[..., str]) -> None:
    p = pipeline()
    p.start_relay()
    readstore = new_database("readstore")
    group = f"{p.prefix}-rs"
    consumers: list[ConsumerProcess] = []
    kills = (1, 2, 3, 1, 2)  # die after the Nth applied batch of each run

    def kill_consumers() -> float:
        for n in kills:
            c = ConsumerProcess(readstore, p.prefix, p.bootstrap, group, env={FAULT_KILL_AFTER_SINK_COMMIT: str(n)})
            consumers.append(c.start())
            assert c.proc is not None
            rc = c.proc.wait(90)
            assert rc == -signal.SIGKILL, f"the consumer was to kill itself after batch {n}, exited {rc}: {c.output()}"
        consumers.append(ConsumerProcess(readstore, p.prefix, p.bootstrap, group).start())
        return time.monotonic()

    try:
        record, restarted = run_with_writer(p, writer_for(p, 4), kill_consumers, after=4.0)
        assert restarted is not None
        wait_converged(readstore, {SOURCE_ID: p.dsn}, [p.relay, consumers[-1]], timeout=180)
        recover = time.monotonic() - restarted
        result = p.settle(record)
        record_outcome(f"read-store consumer SIGKILL x{len(kills)} after sink commit", result, record, recover,
                       "recovery: restart to read store = source tables")
        assert_kept_promises(result, duplicates_allowed=True)
    finally:
        for c in consumers:
            c.close()
