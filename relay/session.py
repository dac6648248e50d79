"""One replication session: stream → decode → publish → confirm, with one producer.

Thin I/O around ``relay.positions`` (what is safe to confirm) and ``relay.policy`` (when to send a
status, what a failed delivery means). A session starts from the slot's confirmed position and
ends on stop (after a drain) or with the error that ended it; the supervisor decides what next.
The hot path (``_handle``, ``_publish``, ``_on_report``) runs per event: no coroutine, no
function-call layer and no allocation per event beyond the record itself.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from functools import partial
from typing import Any

from confluent_kafka import KafkaError

from outbox import contract
from outbox.backoff import Backoff
from outbox.config import RelaySettings
from outbox.errors import OutboxError
from outbox.relay import pgoutput, policy
from outbox.relay.events import RowReader
from outbox.relay.policy import CAPTURE_PARKED_TYPE, HEARTBEAT_TYPE
from outbox.relay.positions import PositionTracker, Txn
from outbox.relay.publisher import DeliveryFailed, Publisher, RecordTooLarge, Report, delivery_failed, topic_max_bytes
from outbox.relay.replication import ParkedEvent, Parker, ReplicationStream, SlotInfo, pg_now_us
from outbox.relay.state import RelayState
from outbox.relay.transactional import ExactlyOnce

log = logging.getLogger("outbox.relay.runner")  # the relay's log lines keep their logger name


class Session:
    """One replication stream and one producer, from the slot's confirmed position."""

    def __init__(self, settings: RelaySettings, state: RelayState, slot: SlotInfo, *, parker: Parker,
                 eos: ExactlyOnce | None) -> None:
        self.settings = settings
        self.state = state
        self.slot = slot
        self.stats = state.stats
        self.metrics = state.metrics
        self.tracker = state.tracker = PositionTracker(confirmed=slot.confirmed_flush, received=slot.confirmed_flush)
        self._readers = state.readers
        self._size_limits = state.size_limits
        self._acked = state.acked
        self._parker = parker
        self._eos = eos
        self._txn: Txn | None = None
        self._txn_context: contract.TxnContext | None = None  # built at the transaction's first event
        self._history: bytes | None = None  # ce_history of this session's events (IDENTIFY_SYSTEM)
        self._txn_report: Report | None = None  # the delivery report callback of the current transaction's events
        self._skipping = False  # exactly-once: the current source transaction is already in Kafka
        self._publisher: Publisher | None = None
        self._stream: ReplicationStream | None = None
        self._progress = asyncio.Event()  # set whenever an acknowledgement frees room
        self._in_flight_bytes = 0  # value bytes sent and not yet reported on (policy.must_pause)
        self._stop = asyncio.Event()  # the run's stop event (set in _loop): waiting for room honours it
        self._error: OutboxError | None = None  # what a delivery report says ends the session
        self._reported = -1  # the confirmed position last sent in a status update
        self._over = False  # ended: a late report of its producer changes nothing

    async def run(self, stop: asyncio.Event, retry: Backoff) -> None:
        s, state = self.settings, self.state
        if state.oversized_topics:
            state.size_limits.update(await topic_max_bytes(s.kafka, sorted(state.oversized_topics)))
            state.oversized_topics.clear()
        queue_messages, queue_kbytes = policy.producer_queue(s.max_in_flight, s.max_in_flight_bytes)
        options: dict[str, Any] = {"message_timeout_ms": int(s.kafka_message_timeout * 1000),
                                   "batch_bytes": policy.batch_bytes(state.size_limits),
                                   "queue_messages": queue_messages, "queue_kbytes": queue_kbytes}
        publisher = self._eos.new_publisher(**options) if self._eos is not None else Publisher(s.kafka, **options)
        stream: ReplicationStream | None = None
        try:
            await publisher.start()
            self._publisher = state.publisher = publisher
            if self._eos is not None:
                await self._eos_start()
            state.kafka_reachable(True)
            stream = self._stream = ReplicationStream(s.dsn, self.slot.name)
            await stream.start()
            self._history = stream.history
            self.metrics.replication_connected.set(1)
            self.metrics.up.set(1)
            log.info("relay %s streaming slot %s of %s from %s to Kafka %s", s.source_id, self.slot.name,
                     self.slot.database, contract.format_lsn(self.slot.confirmed_flush), s.kafka.bootstrap)
            state.streamed = True
            retry.reset()
            await self._loop(stop)
            await self._drain()
        finally:
            self.metrics.up.set(0)
            if stream is not None:
                stream.close()
                self.metrics.replication_connected.set(0)
            self._publisher = state.publisher = None
            if self._eos is not None:
                await self._eos.close()
            await publisher.stop()  # drops what is still queued: it was never confirmed
            self._over = True

    async def _loop(self, stop: asyncio.Event) -> None:
        assert self._stream is not None
        self._stop = stop
        settings = self.settings
        stopping = asyncio.ensure_future(stop.wait())
        try:
            while not stop.is_set():
                if self._error is not None:
                    raise self._error
                if self._eos is not None:
                    self._eos_progress()
                if policy.must_pause(self.tracker.in_flight, settings.max_in_flight, self._in_flight_bytes,
                                     settings.max_in_flight_bytes):
                    # Kafka away or slow: back-pressure, stop reading the WAL until Kafka catches up; the
                    # replication connection stays open (status updates with the confirmed position every
                    # status_interval keep wal_sender_timeout away)
                    self._progress.clear()
                    progress = asyncio.ensure_future(self._progress.wait())
                    await asyncio.wait([stopping, progress], timeout=settings.status_interval,
                                       return_when=asyncio.FIRST_COMPLETED)
                    progress.cancel()
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
                            if stop.is_set() or self._error is not None:
                                break  # the rest of this read is never confirmed: a restart reads it again
                    if self.stats.events > before:
                        self.metrics.read_batch.observe(self.stats.events - before)
                self._status()
        finally:
            stopping.cancel()

    def _read_timeout(self) -> float:
        return policy.read_timeout(self.settings.status_interval, self._eos.time_left() if self._eos is not None else None)

    # ------------------------------------------------------------------ per message (the hot path)
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
            tracker = self.tracker
            self.state.caught_up_to = policy.caught_up_at_begin(self.state.caught_up_to, tracker.open_transactions,
                                                                decoded.commit_time)
            txn = self._txn = tracker.begin(decoded.xid, decoded.final_lsn, decoded.commit_time)
            self._txn_context = None
            self._txn_report = partial(self._on_report, txn)  # one callback for all its events
            self._skipping = self._eos is not None and self._eos.begin(txn)
        elif isinstance(decoded, pgoutput.Commit):
            open_txn = self._txn
            assert open_txn is not None, "Commit without Begin"
            txn = open_txn
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
            self.state.heartbeat_seen = contract.pg_time_to_unix(txn.commit_time)
            return None
        if row.type == CAPTURE_PARKED_TYPE:  # the capture trigger parked a change in outbox.parked: counted, not published
            self.metrics.capture_parked(row.aggregatetype.decode(errors="replace"))
            return None
        context = self._txn_context
        if context is None:
            context = self._txn_context = contract.TxnContext.of(
                source_id=self.settings.source_id, prefix=self.settings.topic_prefix, commit_lsn=txn.commit_lsn,
                commit_time=txn.commit_time, xid=txn.xid, history=self._history)
        seq = self.tracker.sent(txn)  # counted as sent: never confirmed if what follows fails
        try:
            record = context.record_raw(row, seq)
        except contract.ContractError as exc:  # its aggregate type cannot name a topic: park it, go on
            return self._park(row, context.unroutable_record(row, seq), txn, seq, f"not publishable: {exc}")
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
        self._in_flight_bytes += len(record.value)
        return None

    def _on_report(self, txn: Txn, err: KafkaError | None, msg: Any) -> None:
        """librdkafka's delivery report for one event of ``txn`` (on the loop, from ``poll``)."""
        if self._over:
            return  # a report from an ended session: its positions are gone
        self._in_flight_bytes -= len(msg)  # its value's length (a parked event's marker: 0, never counted)
        if err is None:
            self.tracker.acked(txn)
            self._acked[msg.topic()] += 1
            if not txn.pending and txn.end_lsn is not None and not txn.failed:
                self._txn_acked(txn)
            self._progress.set()
            return
        exc = delivery_failed(err)
        if exc.purged:
            return  # the relay dropped it on purpose (stop, or a new session that replays it)
        self._delivery_failed(txn, exc, msg)

    # ------------------------------------------------------------------ per transaction, per failure
    def _txn_acked(self, txn: Txn) -> None:
        """Every event of ``txn`` is in Kafka (called once per transaction)."""
        state = self.state
        if txn.commit_time > state.caught_up_to:
            state.caught_up_to = txn.commit_time
        if txn.events:
            self.metrics.commit_to_ack.observe(max(0.0, time.time() - contract.pg_time_to_unix(txn.commit_time)))

    def _delivery_failed(self, txn: Txn, exc: DeliveryFailed, msg: Any) -> None:
        """Kafka gave up on an event: nothing from ``txn`` on is confirmed; the first failure says how
        the session ends (policy.classify_delivery)."""
        topic = msg.topic()
        self.tracker.failed(txn)
        self.metrics.publish_errors.inc()
        if self._error is None:
            fatal = self._eos.fatal(exc) if self._eos is not None else None
            kind = policy.classify_delivery(exc, fatal)
            if kind is policy.Delivery.TOO_LARGE:  # the topic's limit is below the producer's
                self.state.oversized_topics.add(topic)
            elif kind is policy.Delivery.OUTAGE:
                self.state.kafka_reachable(False)
            self._error = policy.delivery_error(kind, exc, policy.event_id(msg.headers()), txn.xid, topic, fatal)
        self._progress.set()

    async def _send_when_room(self, row: contract.RawRow, record: contract.Record, txn: Txn, seq: int,
                              report: Report) -> None:
        """librdkafka's queue is full (one read of the stream brought more than the room above
        --max-in-flight(-bytes)): wait for room as the paused loop does, still sending standby status,
        and give up on stop or on a failed delivery: the record is then never sent, so its transaction
        is never confirmed (a restart reads it again)."""
        publisher = self._publisher
        assert publisher is not None
        stop = self._stop
        try:
            while not publisher.try_send(record, report):  # try_send serves delivery reports meanwhile
                if stop.is_set() or self._error is not None:
                    return
                self._status()
                await asyncio.sleep(policy.ROOM_POLL)
        except RecordTooLarge:  # librdkafka checks the size before the queue, but be sure
            await self._park_too_large(row, record, txn, seq)
            return
        self.stats.events += 1
        self._in_flight_bytes += len(record.value)

    def _park_too_large(self, row: contract.RawRow, record: contract.Record, txn: Txn, seq: int) -> Awaitable[None]:
        assert self._publisher is not None
        return self._park(row, record, txn, seq,
                          f"larger than the producer's message.max.bytes {self._publisher.max_message_bytes}")

    async def _park(self, row: contract.RawRow, record: contract.Record, txn: Txn, seq: int, error: str) -> None:
        """Kafka will never take this event (too large, or its aggregate type names no topic: then
        ``record.topic`` is ``<prefix>.__unroutable``): keep the whole row in outbox.parked (before
        anything past it is confirmed) and send a small marker to ``<topic>.dlq`` in its place; its
        acknowledgement stands for the event's."""
        size = contract.record_size(record)
        await asyncio.to_thread(self._parker.park, ParkedEvent(row.decoded(), record.topic, txn.commit_lsn, txn.xid,
                                                               seq, size, error))
        marker = contract.parked_marker(record, error, txn.commit_lsn)
        assert self._publisher is not None
        await self._publisher.send(marker, partial(self._on_report, txn))
        self.metrics.parked(record.topic)
        self.stats.parked += 1
        log.warning("event %s (%d bytes) of transaction %s is %s: parked in %s.%s, a marker sent to %s",
                    row.id.decode(), size, txn.xid, error, contract.SCHEMA, contract.PARKED_TABLE, marker.topic)

    # ------------------------------------------------------------------ per status tick
    def _status(self, force: bool = False) -> None:
        """Tell PostgreSQL what is safe to discard; often while it moves, at least every status_interval."""
        assert self._stream is not None
        state, tracker = self.state, self.tracker
        state.count_acked()
        now = time.monotonic()
        if policy.status_due(now, state.last_status, tracker.confirmed, self._reported, self.settings.status_interval,
                             force):
            self._stream.send_status(tracker.received, tracker.confirmed, pg_now_us())
            self._reported = tracker.confirmed
            state.last_status = now
        since, events = state.last_progress
        if policy.progress_due(now, since):
            log.info("published %d events (%.0f/s), %d in flight, confirmed %s", self.stats.events,
                     policy.rate(self.stats.events, events, now, since), tracker.in_flight,
                     contract.format_lsn(tracker.confirmed))
            state.last_progress = (now, self.stats.events)

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
        if policy.ends_relay(self._error):
            assert self._error is not None
            raise self._error

    # ------------------------------------------------------------------ exactly-once (relay/transactional.py)
    async def _eos_start(self) -> None:
        """After the producer fenced older ones: read the committed position and confirm it (the slot
        may be behind it: a crash between a Kafka commit and the confirm)."""
        assert self._eos is not None
        tracker = self.tracker
        position = await self._eos.load(tracker)
        resumed = policy.resume_position(tracker.confirmed, position.end_lsn if position is not None else None)
        if resumed > tracker.confirmed:
            tracker.confirmed = tracker.received = resumed

    def _eos_progress(self) -> None:
        """Count what a finished Kafka commit confirmed; start the next commit when one is due."""
        assert self._eos is not None
        for txn in self._eos.finished():
            self._txn_acked(txn)
        if self._txn is None:
            if self._eos.due():  # only whole source transactions go into a Kafka transaction
                self._eos.start_commit()
        elif (too_large := self._eos.too_large(self._txn)) is not None:  # it would outlive the Kafka transaction
            raise too_large

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
