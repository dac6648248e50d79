"""The fault suite's checker: what the writer committed against what Kafka holds.

Pure part (no I/O): :func:`compare` takes the source's events (``outbox.events`` rows with the
inserting transaction id), the writer's record (which transaction ids committed, which rolled
back) and the records a read_committed consumer saw, and names every problem:

- ``lost``: an event of a committed transaction that no record carries;
- ``rolled_back``: a record of a transaction the writer rolled back (or that aborted);
- ``phantoms``: a record whose ``ce_id`` the source never committed and the writer never wrote;
- ``duplicates``: a ``ce_id`` seen more than once (counted: allowed at-least-once, not exactly-once);
- ``order_violations``: per key, first copies out of source order (position ``(commit LSN,
  txseq)`` going back, or the row's ``created_at`` going back), or one key on two partitions;
- ``unrecorded``: source events of transactions the writer has no record of (its bookkeeping
  is broken: the other counts cannot be trusted).

I/O edge: :func:`read_source` and :func:`read_kafka` (kcat, an independent client, with
``isolation.level=read_committed``) gather the inputs; :func:`check` runs both and compares.
"""
from __future__ import annotations

import json
import subprocess
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

import psycopg

from outbox import contract

XID_MASK = 0xFFFFFFFF  # ce_xid and xmin are the 32-bit transaction id; pg_current_xact_id() has the epoch on top


@dataclass(frozen=True, slots=True)
class SourceEvent:
    """One committed row of outbox.events."""

    id: str
    xid: int
    aggregate_type: str
    aggregate_id: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class SeenEvent:
    """One Kafka record, as the independent consumer read it."""

    topic: str
    partition: int
    offset: int
    key: str
    id: str
    xid: int
    commit_lsn: int
    txseq: int


@dataclass
class WriterRecord:
    """What the writer knows for sure: transaction ids (32-bit) that committed and that did not."""

    committed: set[int] = field(default_factory=set)
    rolled_back: set[int] = field(default_factory=set)
    ambiguous_resolved: int = 0  # commits whose outcome was looked up after the connection broke


@dataclass
class CheckResult:
    expected: int = 0  # events of committed transactions, per the source
    records: int = 0  # records read from Kafka
    lost: list[str] = field(default_factory=list)
    rolled_back: list[str] = field(default_factory=list)
    phantoms: list[str] = field(default_factory=list)
    duplicates: int = 0
    order_violations: list[str] = field(default_factory=list)
    unrecorded: list[str] = field(default_factory=list)

    def problems(self, *, duplicates_allowed: bool) -> list[str]:
        """Each failed promise as one line; empty when the run kept every promise."""
        out = []
        for name in ("lost", "rolled_back", "phantoms", "order_violations", "unrecorded"):
            items = getattr(self, name)
            if items:
                out.append(f"{len(items)} {name.replace('_', ' ')}: {', '.join(items[:5])}{' ...' if len(items) > 5 else ''}")
        if self.duplicates and not duplicates_allowed:
            out.append(f"{self.duplicates} duplicates")
        return out

    def summary(self) -> str:
        return (f"{self.expected} events committed, {self.records} records read: {len(self.lost)} lost, "
                f"{len(self.rolled_back)} of rolled-back transactions, {len(self.phantoms)} phantoms, "
                f"{self.duplicates} duplicates, {len(self.order_violations)} order violations, "
                f"{len(self.unrecorded)} unrecorded")


def compare(source: Sequence[SourceEvent], seen: Sequence[SeenEvent], writer: WriterRecord) -> CheckResult:
    """Compare the source's committed events and the writer's record with what Kafka holds."""
    result = CheckResult(records=len(seen))
    by_id = {e.id: e for e in source}
    expected = {e.id for e in source if e.xid in writer.committed}
    result.expected = len(expected)
    result.unrecorded = sorted(f"{e.id} (xid {e.xid})" for e in source if e.xid not in writer.committed)

    copies = Counter(r.id for r in seen)
    first = {}
    for r in seen:
        first.setdefault(r.id, r)
    result.duplicates = sum(n - 1 for n in copies.values())
    result.lost = sorted(expected - copies.keys())
    for event_id, record in sorted(first.items()):
        xid = by_id[event_id].xid if event_id in by_id else record.xid
        if xid in writer.rolled_back:  # the writer knows this transaction did not commit
            result.rolled_back.append(f"{event_id} (xid {xid})")
        elif event_id not in by_id:  # published, yet the source never committed it
            result.phantoms.append(event_id)
    result.order_violations = order_violations(seen, by_id)
    return result


def order_violations(seen: Iterable[SeenEvent], source: dict[str, SourceEvent]) -> list[str]:
    """Per key, in partition offset order, the first copy of each event must follow source order.

    Later copies (re-deliveries) are duplicates, not order violations: a sink ignores what is at
    or below the position it holds.
    """
    ordered = sorted(seen, key=lambda r: (r.topic, r.partition, r.offset))
    partitions: dict[tuple[str, str], int] = {}
    last: dict[tuple[str, str], SeenEvent] = {}
    done: set[str] = set()
    out = []
    for r in ordered:
        k = (r.topic, r.key)
        if partitions.setdefault(k, r.partition) != r.partition:
            out.append(f"key {r.key} of {r.topic} on partitions {partitions[k]} and {r.partition}")
            continue
        if r.id in done:
            continue
        done.add(r.id)
        prev = last.get(k)
        last[k] = r
        if prev is None:
            continue
        if (r.commit_lsn, r.txseq) < (prev.commit_lsn, prev.txseq):
            out.append(f"key {r.key}: {r.id} at {contract.Position(r.commit_lsn, r.txseq)} after "
                       f"{prev.id} at {contract.Position(prev.commit_lsn, prev.txseq)}")
        elif prev.id in source and r.id in source and source[r.id].created_at < source[prev.id].created_at:
            out.append(f"key {r.key}: {r.id} written at {source[r.id].created_at.isoformat()} published after "
                       f"{prev.id} written at {source[prev.id].created_at.isoformat()}")
    return out


# --------------------------------------------------------------------------- I/O: the inputs
def read_source(dsn: str) -> list[SourceEvent]:
    """Every committed event row (heartbeats aside) with the id of the transaction that inserted it."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT id::text, xmin::text::bigint, aggregatetype, aggregateid, created_at"
            f" FROM {contract.SCHEMA}.{contract.EVENTS_TABLE} WHERE type <> %s",
            (contract.HEARTBEAT_TYPE,)).fetchall()
    return [SourceEvent(*row) for row in rows]


def read_kafka(bootstrap: str, topics: Sequence[str], timeout: float = 120) -> list[SeenEvent]:
    """Every record of ``topics`` from the beginning, read_committed, with kcat."""
    out = []
    for topic in topics:
        proc = subprocess.run(
            ["kcat", "-b", bootstrap, "-C", "-t", topic, "-J", "-e", "-q", "-o", "beginning",
             "-X", "isolation.level=read_committed"],
            capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            if "Unknown topic" in proc.stderr or "UNKNOWN_TOPIC" in proc.stderr:
                continue
            raise AssertionError(f"kcat failed on {topic}: {proc.stderr.strip()}")
        for line in proc.stdout.splitlines():
            out.append(seen_event(json.loads(line)))
    return out


def seen_event(rec: dict[str, object]) -> SeenEvent:
    """One kcat -J line as a SeenEvent."""
    h = rec.get("headers") or []
    assert isinstance(h, list)
    headers = dict(zip(h[::2], h[1::2]))
    return SeenEvent(topic=str(rec["topic"]), partition=int(rec["partition"]), offset=int(rec["offset"]),  # type: ignore[call-overload]
                     key=str(rec["key"]), id=headers[contract.H_ID], xid=int(headers[contract.H_XID]),
                     commit_lsn=contract.parse_lsn(headers[contract.H_COMMIT_LSN]), txseq=int(headers[contract.H_TXSEQ]))


def check(dsn: str, bootstrap: str, topics: Sequence[str], writer: WriterRecord) -> CheckResult:
    return compare(read_source(dsn), read_kafka(bootstrap, topics), writer)


def topics_of(prefix: str, aggregate_types: Iterable[str]) -> list[str]:
    return [contract.topic_for(prefix, a) for a in aggregate_types]

