"""The relay, wired: replication stream → decode → envelope → Kafka → confirm.

One relay per store database. It confirms an LSN to PostgreSQL only after Kafka acknowledged
every event up to it; killed and restarted, it resumes from its slot (at-least-once: events
after the last confirmed commit may be published again, with the same ``ce_id``).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections import defaultdict
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Awaitable

from confluent_kafka import KafkaError


from outbox import contract, metrics
from outbox.config import RelaySettings
from outbox.dsn import describe
from outbox.errors import KafkaUnavailable, OutboxError
from outbox.relay import pgoutput
from outbox.backoff import Backoff
from outbox.relay.events import RowReader
from outbox.relay.positions import PositionTracker, Txn
from outbox.relay.publisher import DeliveryFailed, Publisher, RecordTooLarge, Report, topic_max_bytes
from outbox.relay.replication import (ParkedEvent, Parker, ReplicationStream, SlotInfo, SlotInUse, SlotMonitor, preflight,
                               purge_events)
from outbox.relay.transactional import ExactlyOnce, exactly_once

log = logging.getLogger(__name__)

RECONNECT_INITIAL = 0.5  # seconds before the first reconnect attempt; doubles up to RECONNECT_CAP
RECONNECT_CAP = 30.0
SLOT_BUSY_GRACE = 120.0  # after a reconnect, how long "slot in use" may be our own old walsender
STATUS_EVERY = 1.0  # seconds between status updates while the confirmed position moves
HEARTBEAT_TYPE = contract.HEARTBEAT_TYPE.encode()  # compared with rows as read from the WAL (bytes)
CAPTURE_PARKED_TYPE = contract.CAPTURE_PARKED_TYPE.encode()
PURGE_EVERY = 60.0  # seconds between purges of old rows from outbox.events
PROGRESS_EVERY = 30.0  # seconds between progress log lines
MONITOR_EVERY = 10.0  # seconds between samples of pg_replication_slots and checks of Kafka
KAFKA_PROBE_TIMEOUT = 5.0


class PublishFailed(OutboxError):
    """Kafka refused an event after the producer's own retries; nothing after it is confirmed."""


class KafkaOutage(OutboxError):
    """Events could not be delivered in time (Kafka away): restart from the slot with a new producer."""

    retriable = True


@dataclass
class RelayStats:
    events: int = 0
    transactions: int = 0
    parked: int = 0
    started: float = field(default_factory=time.monotonic)


class Relay:
    def __init__(self, settings: RelaySettings) -> None:
        self.settings = settings
        self.tracker = PositionTracker()
        self.stats = RelayStats()
        self._readers: dict[int, RowReader] = {}  # relation id -> reader of its rows
        self._txn: Txn | None = None
        self._txn_context: contract.TxnContext | None = None  # built at the transaction's first event
        self._txn_report: Report | None = None  # the delivery report callback of the current transaction's events
        self._publisher: Publisher | None = None  # one per session
        self._stream: ReplicationStream | None = None
        self._streamed = False  # a session reached the stream at least once
        self._parker = Parker(settings.dsn)
        self._size_limits: dict[str, int] = {}  # topic -> max.message.bytes, learned when the broker refused a size
        self._oversized_topics: set[str] = set()  # refused by the broker for size: learn their limit, then replay
        self._kafka_up: bool | None = None
        self._progress = asyncio.Event()  # set whenever an acknowledgement frees room
        self._error: OutboxError | None = None
        self._last_status = 0.0
        self._reported = -1
        self._last_progress = (time.monotonic(), 0)
        # metrics: bound once; counters are added per read loop, not per event
        self.metrics = metrics.RelayMetrics(settings.source_id)
        # exactly-once: Kafka transactions with the source position (relay/transactional.py)
        self._eos: ExactlyOnce | None = exactly_once(settings, self.metrics) if settings.exactly_once else None
        self._skipping = False  # exactly-once: the current source transaction is already in Kafka
        self._acked: defaultdict[str, int] = defaultdict(int)  # events acknowledged per topic, not yet counted
        self._caught_up_to = 0  # commit time (µs since 2000) up to which everything is acknowledged, as far as known
        self._server_wal_end = 0  # pg_current_wal_lsn() at the last slot sample
        self._wal_status: str | None = None
        self._monitor_failing = False
        self._heartbeat_seen = time.time()  # Unix time: the relay's start, then each heartbeat's commit
        self._last_heartbeat_sent = 0.0
        self._heartbeat_failing = False
        self.metrics.heartbeat_age.set_function(self._heartbeat_age)
        self.metrics.seconds_behind.set_function(self._seconds_behind)
        self.metrics.lag_bytes.set_function(self._lag_bytes)

    async def run(self, stop: asyncio.Event) -> RelayStats:
        s = self.settings
        slot = await asyncio.to_thread(preflight, s.dsn, s.slot)  # at start, every problem stops the relay
        self.metrics.started(slot.name, slot.database)
        purger = asyncio.create_task(self._purge_periodically(stop)) if s.retention > 0 else None
        halt = asyncio.Event()
        monitor = asyncio.create_task(self._monitor_periodically(halt, slot.name))
        try:
            await self._supervise(slot, stop)
        finally:
            if purger is not None:
                purger.cancel()
            halt.set()  # let the monitor finish its sample and close its connection
            await asyncio.wait([monitor], timeout=KAFKA_PROBE_TIMEOUT + 5)
            monitor.cancel()
            self._count_acked()
        return self.stats

    async def _supervise(self, slot: SlotInfo, stop: asyncio.Event) -> None:
        """Stream sessions from the slot; after a transient failure (PostgreSQL restarted, Kafka away
        longer than --kafka-message-timeout), reconnect with backoff and resume from the slot."""
        s = self.settings
        retry = Backoff(RECONNECT_INITIAL, RECONNECT_CAP)
        busy_since: float | None = None
        while True:
            try:
                await self._session(slot, stop, retry)
                return
            except OutboxError as exc:
                # a problem before the first stream is a setup problem: one line, exit
                if not exc.retriable or not self._streamed:
                    if stop.is_set() and exc.retriable:
                        return
                    raise
                failure: OutboxError = exc
                if isinstance(failure, KafkaUnavailable):
                    self._kafka_reachable(False)
            while True:
                if stop.is_set():
                    return
                delay = retry.next()
                log.warning("%s; reconnecting to %s and Kafka %s in %.1f s (attempt %d)", failure.message,
                            describe(s.dsn), s.kafka.bootstrap, delay, retry.attempt)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                if stop.is_set():
                    return
                try:
                    slot = await asyncio.to_thread(preflight, s.dsn, s.slot)  # slot gone or lost: exit
                    busy_since = None
                    break
                except SlotInUse as exc:
                    # our old walsender lingers until PostgreSQL sees its connection is gone
                    busy_since = busy_since or time.monotonic()
                    if time.monotonic() - busy_since > SLOT_BUSY_GRACE:
                        raise
                    failure = exc
                except OutboxError as exc:
                    if not exc.retriable:
                        raise
                    failure = exc
                if isinstance(failure, KafkaUnavailable):
                    self._kafka_reachable(False)

    async def _session(self, slot: SlotInfo, stop: asyncio.Event, retry: Backoff) -> None:
        """One replication stream and one producer, from the slot's confirmed position."""
        s = self.settings
        self.tracker = PositionTracker(confirmed=slot.confirmed_flush, received=slot.confirmed_flush)
        self._txn = None
        self._txn_context = None
        self._error = None
        self._reported = -1
        if self._oversized_topics:
            self._size_limits.update(await topic_max_bytes(s.kafka, sorted(self._oversized_topics)))
            self._oversized_topics.clear()
        # Kafka limits a whole batch to the topic's max.message.bytes: keep batches under the smallest known
        batch_bytes = min([1_000_000, *(limit - contract.RECORD_OVERHEAD for limit in self._size_limits.values())])
        options = {"message_timeout_ms": int(s.kafka_message_timeout * 1000), "batch_bytes": batch_bytes}
        publisher = self._eos.new_publisher(**options) if self._eos else Publisher(s.kafka, **options)
        stream: ReplicationStream | None = None
        try:
            await publisher.start()
            self._publisher = publisher
            if self._eos is not None:
                await self._eos_start()
            self._kafka_reachable(True)
            stream = self._stream = ReplicationStream(s.dsn, slot.name)
            await stream.start()
            self.metrics.replication_connected.set(1)
            self.metrics.up.set(1)
            log.info("relay %s streaming slot %s of %s from %s to Kafka %s", s.source_id, slot.name, slot.database,
                     contract.format_lsn(slot.confirmed_flush), s.kafka.bootstrap)
            self._streamed = True
            retry.reset()
            await self._loop(stop)
            await self._drain()
        finally:
            self.metrics.up.set(0)
            if stream is not None:
                stream.close()
                self.metrics.replication_connected.set(0)
            self._publisher = None
            if self._eos is not None:
                await self._eos.close()
            await publisher.stop()  # drops what is still queued: it was never confirmed

    async def _loop(self, stop: asyncio.Event) -> None:
        assert self._stream is not None
        stopping = asyncio.ensure_future(stop.wait())
        try:
            while not stop.is_set():
                self._raise_if_failed()
                if self._eos is not None:
                    self._eos_progress()
                if self.tracker.in_flight >= self.settings.max_in_flight:
                    # Kafka away or slow: the replication connection stays open (status updates with the
                    # confirmed position every status_interval keep wal_sender_timeout away)
                    # back-pressure: stop reading the WAL until Kafka catches up
                    self._progress.clear()
                    await asyncio.wait([stopping, asyncio.ensure_future(self._progress.wait())],
                                       timeout=self.settings.status_interval, return_when=asyncio.FIRST_COMPLETED)
                    self._status()
                    continue
                messages = await self._stream.read(timeout=self._read_timeout())
                if messages:
                    before = self.stats.events
                    handle = self._handle
                    for message in messages:
                        waiting = handle(message)
                        if waiting is not None:  # Kafka's queue is full, or an event must be parked
                            await waiting
                    if self.stats.events > before:
                        self.metrics.read_batch.observe(self.stats.events - before)
                self._status()
        finally:
            stopping.cancel()

    def _handle(self, message: pgoutput.XLogData | pgoutput.Keepalive) -> Awaitable[None] | None:
        """Handle one message without waiting (the hot path: no coroutine per event); returns what must
        be awaited before the next message when it cannot (Kafka's queue full, an event to park)."""
        if isinstance(message, pgoutput.Keepalive):
            self.tracker.keepalive(message.wal_end)
            if message.reply_requested:
                self._status(force=True)
            return None
        self.tracker.saw(message.data_start)
        payload = message.payload
        if payload[0] == 0x49:  # 'I': an outbox row, the hot path (its values stay bytes)
            return self._publish(*pgoutput.decode_insert(payload))
        decoded = pgoutput.decode(payload)
        if isinstance(decoded, pgoutput.Begin):
            if not self.tracker.open_transactions:  # everything before this transaction is acknowledged
                self._caught_up_to = max(self._caught_up_to, decoded.commit_time)
            txn = self._txn = self.tracker.begin(decoded.xid, decoded.final_lsn, decoded.commit_time)
            self._txn_context = None
            self._txn_report = partial(self._on_report, self.tracker, txn)  # one callback for all its events
            self._skipping = self._eos is not None and self._eos.begin(txn)
        elif isinstance(decoded, pgoutput.Commit):
            txn = self._txn
            assert txn is not None, "Commit without Begin"
            self.tracker.commit(txn, decoded.end_lsn)
            self.stats.transactions += 1
            self._txn = None
            if self._eos is not None:
                self._eos.source_committed(txn, self._skipping)
                if self._eos.due():
                    self._eos.start_commit()
            elif not txn.pending and not txn.failed:  # acknowledged before its Commit arrived (or no events)
                self._txn_acked(txn)
        elif isinstance(decoded, pgoutput.Relation):
            self._readers[decoded.relation_id] = RowReader(decoded)
        # Type, Origin, Update, Delete, Truncate: the publication carries inserts only.
        return None

    def _publish(self, relation_id: int, values: list[pgoutput.RawValue]) -> Awaitable[None] | None:
        txn = self._txn
        assert txn is not None, "Insert outside a transaction"
        if self._skipping:  # exactly-once: a committed Kafka transaction already holds it
            return None
        reader = self._readers.get(relation_id)
        if reader is None:
            raise pgoutput.ProtocolError(f"Insert for relation {relation_id} before its Relation message")
        row = reader(values)
        if row.type == HEARTBEAT_TYPE:  # came back through the WAL: the path is alive; not published
            self._heartbeat_seen = metrics.pg_time_to_unix(txn.commit_time)
            return None
        if row.type == CAPTURE_PARKED_TYPE:  # the capture trigger parked a change in outbox.parked: counted, not published
            self.metrics.capture_parked(row.aggregatetype.decode(errors="replace"))
            return None
        context = self._txn_context
        if context is None:
            context = self._txn_context = contract.TxnContext.of(
                source_id=self.settings.source_id, prefix=self.settings.topic_prefix, commit_lsn=txn.commit_lsn,
                commit_time=txn.commit_time, xid=txn.xid)
        seq = self.tracker.sent(txn)  # counted as sent: never confirmed if what follows fails
        try:
            record = context.record_raw(row, seq)
        except contract.ContractError as exc:
            raise PublishFailed(f"event {row.id.decode()} of transaction {txn.xid} cannot be published: {exc}; "
                                "nothing after it is confirmed (fix or delete the row's cause, then restart)") from None
        publisher = self._publisher
        assert publisher is not None
        limit = self._size_limits.get(record.topic)
        if limit is not None and contract.record_size(record) > limit:
            return self._park(row, record, txn, seq, f"larger than max.message.bytes {limit} of topic {record.topic}")
        report = self._txn_report
        assert report is not None, "Insert before the transaction's Begin"
        try:
            if not publisher.try_send(record, report):
                return self._send_when_room(row, record, txn, seq, report)
        except RecordTooLarge:
            return self._park_too_large(row, record, txn, seq)
        self.stats.events += 1
        return None

    async def _send_when_room(self, row: contract.RawRow, record: contract.Record, txn: Txn, seq: int,
                              report: Report) -> None:
        assert self._publisher is not None
        try:
            await self._publisher.send(record, report)
        except RecordTooLarge:  # librdkafka checks the size before the queue, but be sure
            await self._park_too_large(row, record, txn, seq)
            return
        self.stats.events += 1

    def _park_too_large(self, row: contract.RawRow, record: contract.Record, txn: Txn, seq: int) -> Awaitable[None]:
        assert self._publisher is not None
        return self._park(row, record, txn, seq,
                          f"larger than the producer's message.max.bytes {self._publisher.max_message_bytes}")

    async def _park(self, row: contract.RawRow, record: contract.Record, txn: Txn, seq: int, error: str) -> None:
        """Kafka will never take this event: keep the whole row in outbox.parked (before anything past it
        is confirmed) and send a small marker to ``<topic>.dlq`` in its place; its acknowledgement
        stands for the event's."""
        size = contract.record_size(record)
        await asyncio.to_thread(self._parker.park, ParkedEvent(row.decoded(), record.topic, txn.commit_lsn, txn.xid,
                                                               seq, size, error))
        marker = contract.parked_marker(record, error, txn.commit_lsn)
        assert self._publisher is not None
        await self._publisher.send(marker, partial(self._on_report, self.tracker, txn))
        self.metrics.parked(record.topic)
        self.stats.parked += 1
        log.warning("event %s (%d bytes) of transaction %s is %s: parked in %s.%s, a marker sent to %s",
                    row.id.decode(), size, txn.xid, error, contract.SCHEMA, contract.PARKED_TABLE, marker.topic)

    def _on_report(self, tracker: PositionTracker, txn: Txn, err: KafkaError | None, msg: Any) -> None:
        """librdkafka's delivery report for one event of ``txn`` (on the loop, from ``poll``)."""
        if tracker is not self.tracker:
            return  # a report from an earlier session: that session's positions are gone
        if err is None:
            tracker.acked(txn)
            self._acked[msg.topic()] += 1
            if not txn.pending and txn.end_lsn is not None and not txn.failed:
                self._txn_acked(txn)
            self._progress.set()
            return
        exc = DeliveryFailed(err)
        if exc.purged:
            return  # the relay dropped it on purpose (stop, or a new session that replays it)
        event_id = next((v.decode(errors="replace") for k, v in msg.headers() or () if k == contract.H_ID), "?")
        topic = msg.topic()
        tracker.failed(txn)
        self.metrics.publish_errors.inc()
        fatal = self._eos.fatal(exc) if self._eos is not None else None
        if self._error is None and fatal is not None:  # fenced: stop, in one line
            self._error = fatal
        elif self._error is None:
            if exc.too_large:  # the topic's limit is below the producer's
                self._oversized_topics.add(topic)
                self._error = KafkaOutage(f"Kafka refused event {event_id} of transaction {txn.xid} as too large "
                                          f"for {topic}: reading its max.message.bytes, then replaying to park it")
            elif exc.outage:
                self._kafka_reachable(False)
                self._error = KafkaOutage(f"Kafka did not take event {event_id} of transaction {txn.xid} in time "
                                          f"({exc}); nothing after it was confirmed")
            else:
                self._error = PublishFailed(f"Kafka refused event {event_id} of transaction {txn.xid}: {exc}")
        self._progress.set()

    def _txn_acked(self, txn: Txn) -> None:
        """Every event of ``txn`` is in Kafka (called once per transaction)."""
        if txn.commit_time > self._caught_up_to:
            self._caught_up_to = txn.commit_time
        if txn.events:
            self.metrics.commit_to_ack.observe(max(0.0, time.time() - metrics.pg_time_to_unix(txn.commit_time)))

    def _count_acked(self) -> None:
        if self._acked:
            self.metrics.published(self._acked)
            self._acked.clear()

    # scrape-time gauges: they run in the metrics HTTP thread and only read
    def _seconds_behind(self) -> float:
        if not self.tracker.open_transactions or not self._caught_up_to:
            return 0.0
        return max(0.0, time.time() - metrics.pg_time_to_unix(self._caught_up_to))

    def _heartbeat_age(self) -> float:
        if self.settings.heartbeat_interval <= 0:
            return float("nan")
        return max(0.0, time.time() - self._heartbeat_seen)

    def _lag_bytes(self) -> float:
        return float(max(0, max(self._server_wal_end, self.tracker.received) - self.tracker.confirmed))

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def _status(self, force: bool = False) -> None:
        """Tell PostgreSQL what is safe to discard; often while it moves, at least every status_interval."""
        assert self._stream is not None
        self._count_acked()
        now = time.monotonic()
        moved = self.tracker.confirmed != self._reported
        due = now - self._last_status >= (STATUS_EVERY if moved else self.settings.status_interval)
        if force or due:
            self._stream.send_status(self.tracker.received, self.tracker.confirmed)
            self._reported = self.tracker.confirmed
            self._last_status = now
        since, events = self._last_progress
        if now - since >= PROGRESS_EVERY:
            log.info("published %d events (%.0f/s), %d in flight, confirmed %s", self.stats.events,
                     (self.stats.events - events) / (now - since), self.tracker.in_flight,
                     contract.format_lsn(self.tracker.confirmed))
            self._last_progress = (now, self.stats.events)

    async def _purge_periodically(self, stop: asyncio.Event) -> None:
        """Keep outbox.events from growing forever: rows older than --retention go."""
        while not stop.is_set():
            try:
                deleted = await asyncio.to_thread(purge_events, self.settings.dsn, self.settings.retention)
                if deleted:
                    log.info("purged %d events older than %.0f s from outbox.events", deleted, self.settings.retention)
            except OutboxError as exc:  # not fatal: streaming does not depend on it
                log.warning("could not purge outbox.events: %s", exc.message)
            await asyncio.sleep(PURGE_EVERY)

    async def _monitor_periodically(self, halt: asyncio.Event, slot: str) -> None:
        """Off the hot path: sample the slot (retained WAL, wal_status, safe_wal_size) and check Kafka."""
        monitor = SlotMonitor(self.settings.dsn, slot)
        interval = self.settings.heartbeat_interval
        tick = min(MONITOR_EVERY, interval) if interval > 0 else MONITOR_EVERY
        last_sample = 0.0
        while not halt.is_set():
            now = time.monotonic()
            if interval > 0 and now - self._last_heartbeat_sent >= interval:
                await self._send_heartbeat(monitor)
            if now - last_sample >= MONITOR_EVERY:
                await self._sample_slot(monitor, slot)
                await self._probe_kafka()
                last_sample = now
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(halt.wait(), tick)
        # Not on cancellation: a sample may still be running in its thread, and the connection with it.
        monitor.close()
        self._parker.close()

    async def _send_heartbeat(self, monitor: SlotMonitor) -> None:
        self._last_heartbeat_sent = time.monotonic()
        try:
            await asyncio.to_thread(monitor.heartbeat, self.settings.source_id)
        except OutboxError as exc:  # not fatal: the heartbeat age metric grows and its alert says so
            if not self._heartbeat_failing:
                log.warning("%s", exc.message)
            self._heartbeat_failing = True
            return
        if self._heartbeat_failing:
            log.info("heartbeats written again")
        self._heartbeat_failing = False

    async def _sample_slot(self, monitor: SlotMonitor, slot: str) -> None:
        try:
            sample = await asyncio.to_thread(monitor.sample)
        except OutboxError as exc:  # not fatal: streaming does not depend on it
            if not self._monitor_failing:
                log.warning("%s; slot metrics are stale until it succeeds", exc.message)
            self._monitor_failing = True
            return
        if self._monitor_failing:
            log.info("slot %s sampled again", slot)
        self._monitor_failing = False
        self._server_wal_end = sample.wal_end
        if sample.wal_status != self._wal_status:
            if sample.wal_status in ("unreserved", "lost"):
                log.warning("slot %s: wal_status is %s: max_slot_wal_keep_size is %s; see docs/operations.md, Alerts",
                            slot, sample.wal_status, "exceeded" if sample.wal_status == "unreserved" else
                            "exceeded and WAL the slot needs was removed (events lost: re-snapshot)")
            self._wal_status = sample.wal_status
        self.metrics.slot(slot, sample.wal_status, sample.retained_bytes, sample.safe_wal_size)

    async def _probe_kafka(self) -> None:
        """1 when the producer has (or can open) a connection to some broker."""
        publisher = self._publisher
        if publisher is not None:
            self._kafka_reachable(await publisher.reachable(KAFKA_PROBE_TIMEOUT))

    def _kafka_reachable(self, reachable: bool) -> None:
        """The gauge, and one log line when it changes."""
        self.metrics.kafka_connected.set(1 if reachable else 0)
        if reachable == self._kafka_up:
            return
        if not reachable:
            log.warning("Kafka %s is unreachable: reading from PostgreSQL pauses when %d events are in flight, "
                        "nothing unacknowledged is confirmed", self.settings.kafka.bootstrap, self.settings.max_in_flight)
        elif self._kafka_up is not None:
            log.info("Kafka %s is reachable again", self.settings.kafka.bootstrap)
        self._kafka_up = reachable

    async def _drain(self) -> None:
        """On stop: wait (bounded by --drain-timeout) for in-flight events, confirm what was acknowledged."""
        assert self._publisher is not None
        timeout = self.settings.drain_timeout
        if self._eos is not None:
            await self._eos_drain()
        elif not await self._publisher.flush(timeout):
            log.warning("stopping with %d events unacknowledged after %.0f s; they will be sent again on restart",
                        self.tracker.in_flight, timeout)
        await asyncio.sleep(0)  # let the acknowledgement callbacks run
        self._status(force=True)
        if self._error is not None and not self._error.retriable:
            raise self._error


    # ------------------------------------------------------------------ exactly-once (relay/transactional.py)
    async def _eos_start(self) -> None:
        """After the producer fenced older ones: read the committed position and confirm it (the slot
        may be behind it: a crash between a Kafka commit and the confirm)."""
        assert self._eos is not None
        position = await self._eos.load(self.tracker)
        if position is not None and position.end_lsn > self.tracker.confirmed:
            self.tracker.confirmed = self.tracker.received = position.end_lsn

    def _eos_progress(self) -> None:
        """Count what a finished Kafka commit confirmed; start the next commit when one is due."""
        assert self._eos is not None
        for txn in self._eos.finished():
            self._txn_acked(txn)
        if self._txn is None and self._eos.due():  # only whole source transactions go into a Kafka transaction
            self._eos.start_commit()

    def _read_timeout(self) -> float:
        timeout = min(self.settings.status_interval, 1.0)
        left = self._eos.time_left() if self._eos is not None else None
        return timeout if left is None else min(timeout, left)

    async def _eos_drain(self) -> None:
        """On stop: commit what holds only whole source transactions, abort a partial one."""
        assert self._eos is not None
        for txn in await self._eos.settle():
            self._txn_acked(txn)
        if self._txn is None and self._eos.due(force=True):
            self._eos.start_commit()
            for txn in await self._eos.settle():
                self._txn_acked(txn)
        else:
            await self._eos.abort()


async def run_relay(settings: RelaySettings, stop: asyncio.Event | None = None) -> RelayStats:
    """Run until ``stop`` is set (or SIGTERM/SIGINT when ``stop`` is None)."""
    own_stop = stop is None
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    if own_stop:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    try:
        return await Relay(settings).run(stop)
    finally:
        if own_stop:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
