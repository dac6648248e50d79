"""The Kafka side every sink shares: subscribe by pattern, fetch batches, hand them to a sink,
commit to Kafka only after the sink has committed, stop cleanly on SIGTERM/SIGINT.

A sink is anything with ``stored_offsets`` and ``apply`` (see :class:`Sink`); ``apply`` gets a
:class:`consumers.dlq.Batch` (records, offsets, and the shared dead-letter queue: see consumers/dlq.py
for that API). The loop never commits a Kafka offset before ``apply`` has returned, so Kafka's committed offsets are never
ahead of what the sink holds. Sinks that keep their own offsets (the read store) return them
from ``stored_offsets`` and the loop seeks there on every assignment: the sink is the truth.

When ``apply`` raises an error whose ``retriable`` attribute is true, the loop rewinds the
batch's partitions, waits (exponential backoff up to 30 s) and fetches the batch again; polling
goes on meanwhile, so the consumer keeps its place in the group. Other errors end the loop.
Records a sink cannot apply for good are parked in ``<topic>.dlq`` by the sink itself, through
``batch.dead_letters`` (consumers/dlq.py), before it commits.

Sinks whose writes are slow remote calls (the CRM's HTTP API) use :func:`run_pipelined` instead:
the sink takes records as they are fetched and works on them beside the loop (see :class:`PipelinedSink`).

Fault injection, for the fault suite only (tests/faults, docs/faults.md): with the environment
variable ``OUTBOX_FAULT_KILL_AFTER_SINK_COMMIT=N`` the process SIGKILLs itself right after the
Nth batch the sink has applied (committed), before the Kafka offset commit: the narrowest window
of a consumer crash. Unset (always, in production) it costs one comparison per batch.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, Protocol

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError

from outbox import metrics
from outbox.config import KafkaSettings
from outbox.consumers.dlq import Batch, DeadLetters, Filter, dlq_topic, for_group, redrive
from outbox.contract import DLQ_SUFFIX, H_TIME
from outbox.errors import ConfigError, KafkaUnavailable, OutboxError

log = logging.getLogger(__name__)

# How often the consumer refreshes topic metadata, so topics created after start (a new
# aggregate type) are subscribed within this many milliseconds.
METADATA_MAX_AGE_MS = 5000
POLL_TIMEOUT_MS = 500
PROGRESS_INTERVAL = 10.0
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 30.0
LAG_EVERY = 1.0  # seconds between updates of the lag gauges (positions and high watermarks)
POSITION_TIMEOUT = 0.2
# How long the group waits for a silent member (killed, frozen) before it hands its partitions to
# the others: aiokafka's default, stated here because ``outbox replay --force`` waits on it
# (consumers/replay.py FORCE_WAIT). The Java client's default is 45 s.
SESSION_TIMEOUT_MS = 10_000
# Metadata of Kafka offsets committed by ``outbox replay``: on assignment such an offset wins over
# the sink's own (a rewind the sink must follow); the loop's next commit clears it.
REPLAY_MARK = "outbox-replay"
FAULT_KILL_AFTER_SINK_COMMIT = "OUTBOX_FAULT_KILL_AFTER_SINK_COMMIT"  # see the module docstring


class SinkUnavailable(OutboxError):
    """A sink cannot take the batch right now (connection lost, failover): retry it."""

    retriable = True


class Sink(Protocol):
    async def stored_offsets(self, partitions: Sequence[TopicPartition]) -> Mapping[TopicPartition, int]:
        """Next offset to read for each partition the sink knows; others are left out."""
        ...

    async def apply(self, batch: Batch) -> Mapping[str, int]:
        """Apply ``batch.records`` (aiokafka ``ConsumerRecord``s) durably; return counters.

        Records it cannot apply for good go to ``await batch.dead_letters.park(...)`` before the
        sink commits (consumers/dlq.py). The loop turns the counter ``skipped`` (records that
        changed nothing: duplicates, older events) into a metric and counts parked records
        itself; other counters are summed for the progress lines and the totals. A sink may also
        set a ``name`` attribute: the ``sink`` label of its metrics.
        """
        ...


def topic_pattern(prefix: str) -> str:
    """Regex for the event topics ``<prefix>.<aggregate_type>``, dead-letter topics excluded.

    Aggregate types may contain dots, so everything after the prefix is accepted unless it
    ends with ``.dlq``.
    """
    dlq = re.escape(DLQ_SUFFIX)
    if not prefix:
        return rf"^(?!__)(?!.*{dlq}$).+$"
    return rf"^{re.escape(prefix)}\.(?!.*{dlq}$).+$"


class _SeekToStored(ConsumerRebalanceListener):  # type: ignore[misc]
    """On assignment, start each partition where the sink says; on revocation, let the batch in
    flight finish first (it commits its own offsets in the sink).

    The sink is the truth, never Kafka's committed offset: a partition the sink has no offset for
    starts at the log start (the sink's guard makes what it already holds a no-op: a read store
    restored from a backup catches up instead of skipping what it lacks), and a stored offset
    below the log start (retention deleted records the sink never got) is an error line naming
    the lost range plus ``outbox_consumer_records_lost_total``, never a silent reset.

    A freshly assigned partition stays paused until it is positioned: ``positioning`` holds those
    (the loops must not resume them, or Kafka fetches from its committed offset and the records
    come twice). When the sink's offsets cannot be read, they stay paused and :meth:`retry`
    (called by the loops) tries again with backoff.
    """

    def __init__(self, consumer: AIOKafkaConsumer, sink: Sink | PipelinedSink, busy: asyncio.Lock,
                 stats: metrics.ConsumerMetrics) -> None:
        self._consumer = consumer
        self._sink = sink
        self._busy = busy
        self._stats = stats
        self.positioning: set[TopicPartition] = set()
        self._retry_at = 0.0
        self._backoff = BACKOFF_FIRST

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        self.positioning -= revoked
        async with self._busy:
            pass
        release = getattr(self._sink, "release", None)
        if release is not None:  # a PipelinedSink: settle what is in flight for these partitions
            await release(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        if not assigned:
            return
        # Nothing may be returned from Kafka's committed position while the sink is asked: pause
        # first (before any await), seek, then resume.
        self._consumer.pause(*assigned)
        self.positioning |= assigned
        self._retry_at = 0.0
        await self._position(set(assigned))

    async def retry(self) -> None:
        """Position the partitions an earlier attempt left paused (the sink's database was unreachable)."""
        self.positioning &= self._consumer.assignment()
        if self.positioning and time.monotonic() >= self._retry_at:
            await self._position(set(self.positioning))

    async def _position(self, partitions: set[TopicPartition]) -> None:
        try:
            stored = await self._sink.stored_offsets(sorted(partitions))
            starts = await self._consumer.beginning_offsets(sorted(partitions))
        except Exception as exc:  # noqa: BLE001 - the partitions stay paused: nothing is read from a wrong offset
            self._retry_at = time.monotonic() + self._backoff
            log.warning("cannot read the sink's offsets (%s); %d partitions stay paused, retrying in %.1f s",
                        exc, len(partitions), self._backoff)
            self._backoff = min(self._backoff * 2, BACKOFF_MAX)
            return
        self._backoff = BACKOFF_FIRST
        rewound = await _rewind_markers(self._consumer, partitions)
        if rewound:
            log.info("rewound by outbox replay: %s",
                     ", ".join(f"{tp.topic}[{tp.partition}]@{o}" for tp, o in sorted(rewound.items())))
            stored = {**stored, **rewound}
        current = self._consumer.assignment()
        ready = sorted(tp for tp in partitions if tp in current and tp in self.positioning)
        for tp in ready:
            start = starts.get(tp, 0)
            offset = stored.get(tp, start)
            if offset < start:
                log.error("%s[%d]: offsets %d..%d were deleted from Kafka (retention) before this sink read them: "
                          "%d records lost to it; resuming at the log start %d (rebuild the sink from the sources, "
                          "docs/backfill.md)", tp.topic, tp.partition, offset, start - 1, start - offset, start)
                self._stats.lost(tp.topic).inc(start - offset)
                offset = start
            self._consumer.seek(tp, offset)
        self.positioning.difference_update(ready)
        self._consumer.resume(*ready)
        if ready:  # none: revoked (or the consumer stopped) while the sink was asked
            log.info("assigned %d partitions, %d positioned from the sink's offsets, %d from the log start",
                     len(ready), sum(1 for tp in ready if tp in stored), sum(1 for tp in ready if tp not in stored))


async def _rewind_markers(consumer: AIOKafkaConsumer, partitions: set[TopicPartition]) -> dict[TopicPartition, int]:
    """Kafka offsets that ``outbox replay`` committed and no consumer has committed over since."""
    try:
        committed = await consumer._coordinator.fetch_committed_offsets(partitions)  # with their metadata
    except (KafkaError, AttributeError) as exc:  # the sink's offsets stay the truth
        log.warning("cannot read Kafka's committed offsets (%s); a pending outbox replay waits for the next assignment", exc)
        return {}
    return {tp: om.offset for tp, om in committed.items()
            if om is not None and om.offset >= 0 and (om.metadata or "").startswith(REPLAY_MARK)}


class Progress:
    """Counts what the sink reports and logs a line every ``interval`` seconds."""

    def __init__(self, name: str, interval: float = PROGRESS_INTERVAL) -> None:
        self.name = name
        self.interval = interval
        self.totals: dict[str, int] = {}
        self._window: dict[str, int] = {}
        self._since = time.monotonic()

    def add(self, counters: Mapping[str, int]) -> None:
        for key, value in counters.items():
            self.totals[key] = self.totals.get(key, 0) + value
            self._window[key] = self._window.get(key, 0) + value
        self.maybe_log()

    def maybe_log(self, force: bool = False) -> None:
        now = time.monotonic()
        elapsed = now - self._since
        if not force and elapsed < self.interval:
            return
        if self._window or force:
            records = self._window.get("records", 0)
            rate = records / elapsed if elapsed > 0 else 0.0
            extra = ", ".join(f"{k} {v}" for k, v in sorted(self._window.items()) if k != "records")
            log.info("%s: %d records in %.1f s (%.0f/s)%s; total %d", self.name, records, elapsed, rate,
                     f", {extra}" if extra else "", self.totals.get("records", 0))
        self._window = {}
        self._since = now


async def run_consumer(
    kafka: KafkaSettings,
    *,
    group: str,
    pattern: str,
    sink: Sink,
    stop: asyncio.Event,
    batch_size: int = 2000,
    client_id: str = "outbox-consumer",
    progress: Progress | None = None,
    sink_name: str | None = None,
    redrive_every: float | None = None,
    redrive_max_attempts: int = 5,
    **consumer_options: Any,
) -> None:
    """Feed ``sink`` from the topics matching ``pattern`` until ``stop`` is set.

    With ``redrive_every`` (minutes), the records this group parked are sent back to their topic
    that often, until they have ``redrive_max_attempts`` attempts (consumers/dlq.py).
    """
    kill_after = fault_kill_after(os.environ)
    consumer = await _start_consumer(kafka, group, client_id, batch_size, consumer_options)
    busy = asyncio.Lock()
    applied_batches = 0
    progress = progress or Progress(group)
    stats = metrics.ConsumerMetrics(group, str(sink_name or getattr(sink, "name", None) or type(sink).__name__.lower()))
    lag_updated = 0.0
    dead_letters = DeadLetters(kafka, group)
    redriver: asyncio.Task[None] | None = None
    listener = _SeekToStored(consumer, sink, busy, stats)
    try:
        consumer.subscribe(pattern=pattern, listener=listener)
        log.info("consumer group %s subscribed to /%s/", group, pattern)
        if redrive_every:
            redriver = asyncio.create_task(_redrive_periodically(consumer, kafka, group, redrive_every * 60,
                                                                 redrive_max_attempts, stop, stats))
        backoff = BACKOFF_FIRST
        while not stop.is_set():
            await listener.retry()
            batches = await consumer.getmany(timeout_ms=POLL_TIMEOUT_MS, max_records=batch_size)
            records = [r for part in batches.values() for r in part]
            if not records:
                progress.maybe_log()
                lag_updated = await _update_lag(consumer, stats, lag_updated)
                continue
            # The lock lets a revocation wait for the batch in flight: its new owner then starts
            # from the offsets this batch writes in the sink. Kafka is told afterwards, outside it.
            failure: Exception | None = None
            counters: Mapping[str, int] = {}
            mine = for_group(records, group)
            batch = Batch(mine, {(tp.topic, tp.partition): part[-1].offset + 1 for tp, part in batches.items()},
                          dead_letters, skipped=len(records) - len(mine))
            dead_letters.take_count()  # count only what this attempt parks
            async with busy:
                try:
                    started = time.perf_counter()
                    counters = await sink.apply(batch)
                    stats.apply_seconds.observe(time.perf_counter() - started)
                except Exception as exc:
                    if not getattr(exc, "retriable", False):
                        raise
                    failure = exc
            if failure is not None:
                stats.retries.inc()
                log.warning("batch of %d records not applied (%s); retrying in %.1f s", len(records), failure, backoff)
                _rewind(consumer, batches)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
                lag_updated = await _update_lag(consumer, stats, lag_updated)  # lag grows while the sink is down
                continue
            backoff = BACKOFF_FIRST
            applied_batches += 1
            if applied_batches == kill_after:  # fault injection: crash between the sink's commit and Kafka's
                log.warning("%s=%d: killing myself after the sink's commit, before the offset commit",
                            FAULT_KILL_AFTER_SINK_COMMIT, kill_after)
                os.kill(os.getpid(), signal.SIGKILL)
            await _commit(consumer, {tp: part[-1].offset + 1 for tp, part in batches.items()})
            parked = dead_letters.take_count()
            if batch.skipped:  # re-driven for another group: nothing to do here
                counters = {**counters, "skipped": counters.get("skipped", 0) + batch.skipped}
            _count_applied(stats, batches, counters, parked)
            progress.add({"records": len(records), **counters})
            lag_updated = await _update_lag(consumer, stats, lag_updated)
        progress.maybe_log(force=True)
    finally:
        if redriver is not None:
            redriver.cancel()
            await asyncio.gather(redriver, return_exceptions=True)
        stats.close()
        await dead_letters.close()
        await consumer.stop()


async def _start_consumer(kafka: KafkaSettings, group: str, client_id: str, batch_size: int,
                          options: Mapping[str, Any]) -> AIOKafkaConsumer:
    consumer = AIOKafkaConsumer(
        **kafka.client_kwargs(),
        group_id=group,
        client_id=client_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
        metadata_max_age_ms=METADATA_MAX_AGE_MS,
        max_poll_records=batch_size,
        **{"session_timeout_ms": SESSION_TIMEOUT_MS, **options},
    )
    try:
        await consumer.start()
    except KafkaError as exc:
        await consumer.stop()
        raise KafkaUnavailable(f"cannot reach Kafka at {kafka.bootstrap}: {exc} (check --kafka-bootstrap)") from None
    return consumer


class PipelinedSink(Protocol):
    """A sink whose writes take long and may be retried one by one (an HTTP API): it takes records
    as they come and works on them in the background, so the poll loop never waits for it.

    ``submit`` accepts a fetched batch (quickly: no remote call per record) and the shared
    dead-letter queue (consumers/dlq.py), to park what it cannot apply before it saves its progress. ``buffered`` says how
    many records of a partition wait: the loop pauses a partition whose backlog is full and keeps
    polling the others. ``completed`` hands over the offsets that are safe to commit (everything
    before them is durably done) and the records finished since the last call. ``release`` runs on
    revocation: finish or forget what is in flight for those partitions. ``check`` raises the
    sink's fatal error, if it had one. ``close`` waits for calls in flight and saves what is done.
    """

    async def stored_offsets(self, partitions: Sequence[TopicPartition]) -> Mapping[TopicPartition, int]: ...
    async def submit(self, records: Sequence[Any], dead_letters: DeadLetters) -> None: ...
    def buffered(self, tp: TopicPartition) -> int: ...
    def completed(self) -> tuple[dict[TopicPartition, int], list[Any]]: ...
    async def release(self, partitions: set[TopicPartition]) -> None: ...
    def check(self) -> None: ...
    async def close(self) -> None: ...


async def run_pipelined(
    kafka: KafkaSettings,
    *,
    group: str,
    pattern: str,
    sink: PipelinedSink,
    stop: asyncio.Event,
    batch_size: int = 500,
    max_buffered: int = 5000,
    client_id: str = "outbox-consumer",
    progress: Progress | None = None,
    **consumer_options: Any,
) -> None:
    """Feed a :class:`PipelinedSink` until ``stop`` is set; never waits on the sink's remote calls.

    A partition whose backlog in the sink reaches ``max_buffered`` is paused (Kafka stops fetching
    it) and resumed below half of that; polling goes on for the others and for the group's sake.
    Kafka offsets are committed as the sink reports them done (the sink's own stored offsets stay
    the truth, see :class:`Sink`).
    """
    consumer = await _start_consumer(kafka, group, client_id, batch_size, consumer_options)
    progress = progress or Progress(group)
    stats = metrics.ConsumerMetrics(group, getattr(sink, "name", type(sink).__name__.lower()))
    lag_updated = 0.0
    dead_letters = DeadLetters(kafka, group)
    listener = _SeekToStored(consumer, sink, asyncio.Lock(), stats)
    try:
        consumer.subscribe(pattern=pattern, listener=listener)
        log.info("consumer group %s subscribed to /%s/", group, pattern)
        while not stop.is_set():
            sink.check()
            await listener.retry()
            batches = await consumer.getmany(timeout_ms=100, max_records=batch_size)
            records = [r for part in batches.values() for r in part]
            if records:
                await sink.submit(records, dead_letters)
            assigned = consumer.assignment()
            # a new assignment starts unpaused; partitions still being positioned are the listener's to resume
            paused = (consumer.paused() & assigned) - listener.positioning
            full = {tp for tp in assigned if sink.buffered(tp) >= max_buffered}
            drained = {tp for tp in paused if sink.buffered(tp) < max(1, max_buffered // 2)}  # --max-buffered 1: at 0
            if full - paused:
                consumer.pause(*(full - paused))
                log.info("paused %d partitions: the sink's backlog is full", len(full - paused))
            if drained:
                consumer.resume(*drained)
            offsets, done = sink.completed()
            if offsets:
                await _commit(consumer, offsets)
            if done:
                by_tp: dict[TopicPartition, list[Any]] = {}
                for r in done:
                    by_tp.setdefault(TopicPartition(r.topic, r.partition), []).append(r)
                _count_applied(stats, by_tp, {}, dead_letters.take_count())
                progress.add({"records": len(done)})
            else:
                progress.maybe_log()
            lag_updated = await _update_lag(consumer, stats, lag_updated)
        progress.maybe_log(force=True)
    finally:
        stats.close()
        try:
            await sink.close()
            offsets, _ = sink.completed()
            if offsets:
                await _commit(consumer, offsets)
        finally:
            await dead_letters.close()
            await consumer.stop()


async def _redrive_periodically(consumer: AIOKafkaConsumer, kafka: KafkaSettings, group: str, every: float,
                                max_attempts: int, stop: asyncio.Event, stats: metrics.ConsumerMetrics) -> None:
    """Every ``every`` seconds: this group's dead letters back to their topics, up to the attempt limit."""
    flt = Filter(group=group, max_attempts=max_attempts)
    while not stop.is_set():
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), every)
        if stop.is_set():
            return
        try:
            existing = await consumer.topics()
            topics = sorted(dlq_topic(t) for t in consumer.subscription() if dlq_topic(t) in existing)
            done = await redrive(kafka, topics, flt, cursor_group=f"{group}.redrive")
        except OutboxError as exc:  # not fatal: the next round tries again
            log.warning("periodic re-drive failed: %s", exc.message)
            continue
        stats.redriven.inc(done.redriven)
        stats.exhausted.inc(done.exhausted)
        if done.redriven or done.exhausted:
            log.info("re-drove %d dead letters of group %s; %d stay parked after %d attempts", done.redriven, group,
                     done.exhausted, max_attempts)


def fault_kill_after(environ: Mapping[str, str]) -> int | None:
    """The batch count after which to SIGKILL (fault injection), or None when unset."""
    value = environ.get(FAULT_KILL_AFTER_SINK_COMMIT, "").strip()
    if not value:
        return None
    try:
        count = int(value)
    except ValueError:
        count = 0
    if count < 1:
        raise ConfigError(f"{FAULT_KILL_AFTER_SINK_COMMIT}={value!r} is not a positive number of batches: unset it "
                          "(it is a fault-injection hook for tests)")
    return count


def _count_applied(stats: metrics.ConsumerMetrics, batches: Mapping[TopicPartition, Sequence[Any]],
                   counters: Mapping[str, int], parked: int = 0) -> None:
    """Once per applied batch: counters per topic; end-to-end latency once per source transaction
    (records of one transaction share their ce_time), so the cost per record is one header lookup."""
    now = time.time()
    times: dict[bytes, float | None] = {}
    last: list[tuple[TopicPartition, bytes]] = []
    for tp, part in batches.items():
        stats.applied(tp.topic).inc(len(part))
        raw = None
        for record in part:
            raw = _header(record.headers, H_TIME)
            if raw is not None and raw not in times:
                times[raw] = None
        if raw is not None:
            last.append((tp, raw))
    for raw in times:
        try:
            times[raw] = at = datetime.fromisoformat(raw.decode()).timestamp()
        except (ValueError, UnicodeDecodeError):  # a poison record; the sink has dealt with it
            continue
        stats.end_to_end.observe(max(0.0, now - at))
    for tp, raw in last:
        if (last_at := times[raw]) is not None:
            stats.partition(tp.topic, tp.partition).last_time = last_at
    if parked:
        stats.rejected.inc(parked)
    if counters.get("skipped"):
        stats.duplicates.inc(counters["skipped"])


def _header(headers: Sequence[tuple[str, bytes]], name: str) -> bytes | None:
    for key, value in headers:
        if key == name:
            return value
    return None


async def _update_lag(consumer: AIOKafkaConsumer, stats: metrics.ConsumerMetrics, updated: float) -> float:
    """At most every LAG_EVERY seconds: position and high watermark of each assigned partition."""
    now = time.monotonic()
    if now - updated < LAG_EVERY:
        return updated
    assigned = consumer.assignment()
    stats.retain((tp.topic, tp.partition) for tp in assigned)
    for tp in assigned:
        try:
            # returns at once when the position is known; waits (briefly) only while it is being reset
            position = await asyncio.wait_for(consumer.position(tp), POSITION_TIMEOUT)
            highwater = consumer.highwater(tp)
        except (TimeoutError, KafkaError, AssertionError):  # not positioned yet, or revoked meanwhile
            continue
        stats.position(tp.topic, tp.partition, position, highwater)
    return now


def _rewind(consumer: AIOKafkaConsumer, batches: Mapping[TopicPartition, Sequence[Any]]) -> None:
    for tp, part in batches.items():
        try:
            consumer.seek(tp, part[0].offset)
        except KafkaError:  # revoked meanwhile: its new owner starts from the sink's offsets
            pass


async def _commit(consumer: AIOKafkaConsumer, offsets: dict[TopicPartition, int]) -> None:
    """Tell Kafka (for lag monitoring); a failure here loses nothing, the sink holds the truth."""
    try:
        await consumer.commit(offsets)
    except KafkaError as exc:
        log.warning("Kafka offset commit failed (%s); the sink's offsets stay authoritative", exc)
