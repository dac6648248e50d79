"""``outbox replay``: rewind a consumer group, or re-drive its dead letters.

Rewind (``--group G --topic T --from earliest|TIMESTAMP|OFFSET``): the plan (per partition: the
group's committed offset, the new one, how many records that re-delivers) is computed first and
shown; nothing changes until it is confirmed. Kafka only lets an outside client move the offsets
of a group with no active members, so the command refuses while the group has members, unless
``--force``: then it waits (up to ``FORCE_WAIT`` s) for them to leave (a killed consumer stays a
member until its session times out) and rewinds as soon as Kafka allows.

Sinks that keep their own offsets (the read store) would seek back to them and never see the
rewind; so the offsets are committed with the metadata ``outbox-replay ...`` (a *rewind
marker*), and the consumer loop, on assignment, prefers a marked Kafka offset over the sink's
(consumers/kafka.py). Its next commit clears the marker. Replayed records are the same records:
same key, value and headers, so the same ``ce_id``.

Re-drive (``--dlq TOPIC``): consumers/dlq.py. Pure part: :func:`plan_rewind`, :func:`parse_from`.
"""
from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import CommitFailedError, KafkaError

from outbox.config import KafkaSettings
from outbox.consumers.dlq import topic_partitions
from outbox.consumers.kafka import REPLAY_MARK
from outbox.errors import ConfigError, KafkaUnavailable, OutboxError, PreconditionFailed

log = logging.getLogger(__name__)

# Seconds --force waits for members to leave: a killed member of ours leaves after its session timeout
# (consumers/kafka.py SESSION_TIMEOUT_MS, 10 s) plus a rebalance; 90 s also covers a Java client's 45 s default.
FORCE_WAIT = 90.0


class ReplayError(OutboxError):
    """A replay cannot be done as asked (unknown group or topic, no confirmation)."""


# --------------------------------------------------------------------------- pure
@dataclass(frozen=True)
class From:
    """Where to rewind to: ``earliest``, a point in time, or an absolute offset."""

    earliest: bool = False
    time: datetime | None = None
    offset: int | None = None

    def __str__(self) -> str:
        if self.earliest:
            return "earliest"
        if self.time is not None:
            return self.time.isoformat()
        return f"offset {self.offset}"


def parse_from(text: str) -> From:
    value = text.strip()
    if value.lower() == "earliest":
        return From(earliest=True)
    if value.isdigit():
        return From(offset=int(value))
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(f"invalid --from {text!r}: use earliest, an offset (123) or a time "
                          "(2026-01-31T12:00:00Z; without a zone it is UTC)") from None
    return From(time=when if when.tzinfo else when.replace(tzinfo=timezone.utc))


@dataclass(frozen=True)
class PartitionPlan:
    topic: str
    partition: int
    current: int | None  # the group's committed offset; None: never committed (starts at earliest)
    target: int
    begin: int
    end: int

    @property
    def redelivered(self) -> int:
        """Records delivered again (negative: records skipped by a rewind forwards)."""
        now = self.current if self.current is not None else self.begin
        return min(now, self.end) - self.target


def plan_rewind(begin: Mapping[TopicPartition, int], end: Mapping[TopicPartition, int],
                committed: Mapping[TopicPartition, int | None], wanted: From,
                at_time: Mapping[TopicPartition, int | None] | None = None) -> list[PartitionPlan]:
    """Per partition, the new offset (clamped to what the log holds) and what it re-delivers."""
    plans = []
    for tp in sorted(end, key=lambda t: (t.topic, t.partition)):
        if wanted.earliest:
            target = begin[tp]
        elif wanted.offset is not None:
            target = wanted.offset
        else:
            found = (at_time or {}).get(tp)
            target = end[tp] if found is None else found  # nothing at or after that time: the end
        target = max(begin[tp], min(target, end[tp]))
        plans.append(PartitionPlan(tp.topic, tp.partition, committed.get(tp), target, begin[tp], end[tp]))
    return plans


def format_plan(group: str, wanted: From, plans: Sequence[PartitionPlan]) -> str:
    lines = [f"rewind consumer group {group} to {wanted}:",
             f"  {'topic':<40} {'part':>4} {'current':>10} {'new':>10} {'re-delivered':>12}"]
    for p in plans:
        current = "-" if p.current is None else str(p.current)
        lines.append(f"  {p.topic:<40} {p.partition:>4} {current:>10} {p.target:>10} {p.redelivered:>12}")
    total = sum(p.redelivered for p in plans)
    lines.append(f"  {total} records re-delivered in all" if total >= 0 else f"  {-total} records skipped in all")
    return "\n".join(lines)


# --------------------------------------------------------------------------- I/O
@dataclass
class Group:
    state: str
    members: list[str]
    committed: dict[TopicPartition, int]


async def describe_group(admin: AIOKafkaAdminClient, group: str) -> Group:
    response = await admin.describe_consumer_groups([group])
    info = response[0].to_object()["groups"][0]
    offsets = await admin.list_consumer_group_offsets(group)
    committed = {tp: om.offset for tp, om in offsets.items() if om.offset >= 0}
    members = [f"{m['client_id']}@{m['client_host'].lstrip('/')}" for m in info["members"]]
    return Group(info["state"], members, committed)


async def _clients(kafka: KafkaSettings, group: str | None) -> tuple[AIOKafkaAdminClient, AIOKafkaConsumer]:
    admin = AIOKafkaAdminClient(**kafka.client_kwargs())
    consumer = AIOKafkaConsumer(**kafka.client_kwargs(), group_id=group, enable_auto_commit=False,
                                client_id="outbox-replay")
    try:
        await admin.start()
        await consumer.start()
    except KafkaError as exc:
        await consumer.stop()
        await admin.close()
        raise KafkaUnavailable(f"cannot reach Kafka at {kafka.bootstrap}: {exc} (check --kafka-bootstrap)") from None
    return admin, consumer


async def plan(kafka: KafkaSettings, group: str, topics: Sequence[str], wanted: From) -> tuple[Group, list[PartitionPlan]]:
    admin, consumer = await _clients(kafka, None)
    try:
        state = await describe_group(admin, group)
        if state.state == "Dead" and not state.committed:
            raise ReplayError(f"consumer group {group} does not exist on Kafka at {kafka.bootstrap} "
                              "(check --group; kafka-consumer-groups.sh --list shows them)")
        tps = await topic_partitions(kafka, topics, strict=True)
        begin = await consumer.beginning_offsets(tps)
        end = await consumer.end_offsets(tps)
        at_time = None
        if wanted.time is not None:
            ms = int(wanted.time.timestamp() * 1000)
            found = await consumer.offsets_for_times({tp: ms for tp in tps})
            at_time = {tp: (o.offset if o is not None else None) for tp, o in found.items()}
        return state, plan_rewind(begin, end, {tp: state.committed.get(tp) for tp in tps}, wanted, at_time)
    finally:
        await consumer.stop()
        await admin.close()


async def rewind(kafka: KafkaSettings, group: str, plans: Sequence[PartitionPlan], *, force: bool,
                 wait: float = FORCE_WAIT) -> None:
    """Commit the new offsets with the rewind marker; with ``force``, wait for members to leave."""
    marker = f"{REPLAY_MARK} {datetime.now(timezone.utc).isoformat(timespec='seconds')}"
    offsets = {TopicPartition(p.topic, p.partition): (p.target, marker) for p in plans}
    admin, consumer = await _clients(kafka, group)
    deadline = time.monotonic() + (wait if force else 0)
    try:
        consumer.assign(list(offsets))
        while True:
            try:
                await consumer.commit(offsets)
                return
            except (CommitFailedError, KafkaError) as exc:
                if time.monotonic() >= deadline:
                    members = (await describe_group(admin, group)).members
                    raise PreconditionFailed(
                        f"Kafka refused to move the offsets of group {group} ({type(exc).__name__}): it has "
                        f"{len(members)} active member(s) ({', '.join(members[:3])}); stop its consumers and run "
                        "again") from None
                await asyncio.sleep(2.0)
    finally:
        await consumer.stop()
        await admin.close()


def confirm(prompt: str, yes: bool) -> None:
    """Ask on a terminal unless --yes; without a terminal and without --yes, refuse."""
    import click

    if yes:
        return
    if not sys.stdin.isatty():
        raise ReplayError("not confirmed: no terminal to ask on; run again with --yes")
    if not click.confirm(prompt, default=False, err=True):
        raise ReplayError("not confirmed: nothing changed")


def run_rewind(kafka: KafkaSettings, group: str, topics: Sequence[str], wanted: From, *, yes: bool, force: bool,
               echo: Any = print) -> list[PartitionPlan]:
    state, plans = asyncio.run(plan(kafka, group, topics, wanted))
    echo(format_plan(group, wanted, plans))
    if state.members and not force:
        raise PreconditionFailed(f"consumer group {group} has {len(state.members)} active member(s) "
                                 f"({', '.join(state.members[:3])}): stop its consumers first, or --force to wait "
                                 "for them to leave")
    confirm(f"rewind {group}?", yes)
    if state.members:
        echo(f"--force: waiting up to {FORCE_WAIT:.0f} s for {len(state.members)} member(s) to leave the group")
    asyncio.run(rewind(kafka, group, plans, force=force))
    echo(f"rewound {group}: its consumers re-read from the new offsets when they start "
         "(read-store offsets included: the rewind marker takes precedence)")
    return plans
