"""What every fault scenario shares: a store with the POS schema and its relay, the servers to
break, the wait for the pipeline to settle, the check and a line in the fault table."""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from outbox.dev.pos import POS_CAPTURES
from outbox.dev.sandbox import Sandbox
from outbox.errors import SandboxError
from tests.faults import report
from tests.faults.checker import CheckResult, WriterRecord, check, topics_of
from tests.support import kafka
from tests.support.db import wait_slot_confirmed, wal_lsn
from tests.support.processes import RelayProcess
from tests.support.wait import WaitTimeout, wait_until

PARTITIONS = 3  # several partitions per topic: per-key order must hold across them
SOURCE_ID = "s1"


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

    def wait_caught_up(self, since: float, timeout: float = 120) -> float:
        """Seconds from ``since`` (a time.monotonic()) until the slot confirmed everything
        written before now: the time the relay took to recover from a fault that ended at ``since``."""
        wait_slot_confirmed(self.dsn, wal_lsn(self.dsn), timeout=timeout, relay=self.relay)
        return time.monotonic() - since

    def settle(self, record: WriterRecord, timeout: float = 120) -> CheckResult:
        """Check until nothing committed is missing from Kafka (or ``timeout``); the last check."""
        try:
            return wait_until(lambda: check(self.dsn, self.bootstrap, self.topics, record), timeout=timeout,
                              interval=1.0, until=lambda result: not result.lost)
        except WaitTimeout:  # still something lost: the caller records the check and fails with its details
            return check(self.dsn, self.bootstrap, self.topics, record)


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


def create_topics(bootstrap: str, topics: list[str]) -> None:
    asyncio.run(kafka.create_topics(bootstrap, topics, partitions=PARTITIONS))


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
