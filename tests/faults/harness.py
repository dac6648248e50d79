"""What every fault scenario shares: a store with the POS schema and its relay, the servers to
break, the wait for the pipeline to settle, the check and a line in the fault table."""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg

from outbox import contract
from outbox.dev.demo import POS_CAPTURES
from outbox.errors import SandboxError
from outbox.dev.sandbox import Sandbox
from tests.faults import report
from tests.faults.checker import CheckResult, WriterRecord, check, topics_of
from tests.integration.support import RelayProcess

PARTITIONS = 3  # several partitions per topic: per-key order must hold across them
SOURCE_ID = "s1"


def wal_now(dsn: str, timeout: float = 60) -> int:
    """pg_current_wal_lsn(), waiting for the server if it is coming back."""
    return int(_query(dsn, "SELECT pg_current_wal_lsn() - '0/0'::pg_lsn", timeout))


def _query(dsn: str, sql: str, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with psycopg.connect(dsn, autocommit=True, connect_timeout=3) as conn:
                return conn.execute(sql).fetchone()[0]  # type: ignore[index]
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@dataclass
class Pipeline:
    """One store database streaming through one relay (a real process) into its own topics."""

    dsn: str
    prefix: str
    bootstrap: str
    relay_args: tuple[str, ...] = ()
    relays: list[RelayProcess] = field(default_factory=list)

    @property
    def topics(self) -> list[str]:
        return topics_of(self.prefix, [agg for agg, _ in POS_CAPTURES.values()])

    @property
    def relay(self) -> RelayProcess:
        return self.relays[-1]

    def start_relay(self, wait: bool = True) -> RelayProcess:
        relay = RelayProcess(self.dsn, SOURCE_ID, self.prefix, self.bootstrap, *self.relay_args)
        self.relays.append(relay)
        return relay.start(wait=wait)

    def close(self) -> None:
        for relay in self.relays:
            relay.close()

    def assert_relay_alive(self) -> None:
        proc = self.relay.proc
        assert proc is not None and proc.poll() is None, \
            f"the relay exited ({proc.returncode if proc else '-'}) instead of recovering by itself: {self.relay.output()}"

    def confirmed(self) -> int:
        value = _query(self.dsn, "SELECT coalesce(max(confirmed_flush_lsn - '0/0'::pg_lsn), 0) FROM pg_replication_slots"
                                 " WHERE database = current_database()", 60)
        return int(value)

    def wait_caught_up(self, since: float, timeout: float = 120) -> float:
        """Seconds from ``since`` (a time.monotonic()) until the slot confirmed everything
        written before now: the time the relay took to recover from a fault that ended at ``since``."""
        target = wal_now(self.dsn)
        deadline = time.monotonic() + timeout
        while self.confirmed() < target:
            proc = self.relay.proc
            if proc is not None and proc.poll() is not None:
                raise AssertionError(f"the relay exited ({proc.returncode}) instead of recovering: {self.relay.output()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"the relay did not catch up with {contract.format_lsn(target)} within "
                                     f"{timeout:.0f} s: {self.relay.output()}")
            time.sleep(0.1)
        return time.monotonic() - since

    def settle(self, record: WriterRecord, timeout: float = 120) -> CheckResult:
        """Check until nothing committed is missing from Kafka (or ``timeout``); the last check."""
        deadline = time.monotonic() + timeout
        while True:
            result = check(self.dsn, self.bootstrap, self.topics, record)
            if not result.lost or time.monotonic() > deadline:
                return result
            time.sleep(1.0)


def restart(sandbox: Sandbox, server: str, down_for: float) -> float:
    """Stop one server of the sandbox, wait, start it again; returns time.monotonic() when it is back."""
    if server == "kafka":
        sandbox.stop_kafka()
    else:
        sandbox.stop_postgres()
    time.sleep(down_for)
    try:
        sandbox.up()  # starts only what is not running
    except SandboxError:  # seen once: Kafka's controller listener could not bind yet ("Unable to start acceptor")
        time.sleep(5)
        sandbox.up()
    return time.monotonic()


async def create_topics(bootstrap: str, topics: list[str]) -> None:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(t, num_partitions=PARTITIONS, replication_factor=1) for t in topics])
    finally:
        await admin.close()


def record_outcome(scenario: str, result: CheckResult, record: WriterRecord, recover_s: float | None,
                   notes: str = "") -> None:
    """One line of the fault table."""
    report.append({
        "scenario": scenario,
        "committed": len(record.committed),
        "rolled_back_txns": len(record.rolled_back),
        "ambiguous_resolved": record.ambiguous_resolved,
        "events": result.expected,
        "records": result.records,
        "lost": len(result.lost),
        "rolled_back": len(result.rolled_back) + len(result.phantoms),
        "duplicated": result.duplicates,
        "order_violations": len(result.order_violations),
        "recover_s": None if recover_s is None else round(recover_s, 2),
        "notes": notes,
    })


def run_with_writer(pipeline: Pipeline, writer_factory: Callable[[], Any], fault: Callable[[], float | None],
                    *, warmup: float = 3.0, after: float = 3.0) -> tuple[WriterRecord, float | None]:
    """Start the writer, let it run, inflict ``fault`` (returns the recovery time), let it run, stop it."""
    writer = writer_factory().start()
    try:
        time.sleep(warmup)
        recover = fault()
        time.sleep(after)
    finally:
        record = writer.stop()
    assert len(record.committed) > 20 and record.rolled_back, \
        f"the writer did too little to prove anything: {len(record.committed)} commits, {len(record.rolled_back)} rollbacks"
    return record, recover
