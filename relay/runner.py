"""The relay, wired: replication stream → decode → envelope → Kafka → confirm.

One relay per store database. It confirms an LSN to PostgreSQL only after Kafka acknowledged
every event up to it; killed and restarted, it resumes from its slot (at-least-once: events
after the last confirmed commit may be published again, with the same ``ce_id``).
"""
from __future__ import annotations

import asyncio
import logging
import signal
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from outbox import contract
from outbox.config import RelaySettings
from outbox.errors import OutboxError
from relay import pgoutput
from relay.events import outbox_row
from relay.positions import PositionTracker, Txn
from relay.publisher import Publisher
from relay.replication import ReplicationStream, preflight, purge_events

log = logging.getLogger(__name__)

DRAIN_TIMEOUT = 30.0  # seconds SIGTERM waits for in-flight events before giving up on them
STATUS_EVERY = 1.0  # seconds between status updates while the confirmed position moves
PURGE_EVERY = 60.0  # seconds between purges of old rows from outbox.events
PROGRESS_EVERY = 30.0  # seconds between progress log lines


class PublishFailed(OutboxError):
    """Kafka refused an event after the producer's own retries; nothing after it is confirmed."""


@dataclass
class RelayStats:
    events: int = 0
    transactions: int = 0
    started: float = field(default_factory=time.monotonic)


class Relay:
    def __init__(self, settings: RelaySettings) -> None:
        self.settings = settings
        self.tracker = PositionTracker()
        self.stats = RelayStats()
        self._relations: dict[int, pgoutput.Relation] = {}
        self._txn: Txn | None = None
        self._publisher = Publisher(settings.kafka)
        self._stream: ReplicationStream | None = None
        self._progress = asyncio.Event()  # set whenever an acknowledgement frees room
        self._error: BaseException | None = None
        self._last_status = 0.0
        self._reported = -1
        self._last_progress = (time.monotonic(), 0)

    async def run(self, stop: asyncio.Event) -> RelayStats:
        s = self.settings
        slot = await asyncio.to_thread(preflight, s.dsn, s.slot)
        self.tracker.confirmed = self.tracker.received = slot.confirmed_flush
        await self._publisher.start()
        try:
            self._stream = ReplicationStream(s.dsn, slot.name)
            await self._stream.start()
            log.info("relay %s streaming slot %s of %s from %s to Kafka %s", s.source_id, slot.name, slot.database,
                        contract.format_lsn(slot.confirmed_flush), s.kafka.bootstrap)
            purger = asyncio.create_task(self._purge_periodically(stop)) if s.retention > 0 else None
            try:
                await self._loop(stop)
                await self._drain()
            finally:
                if purger is not None:
                    purger.cancel()
        finally:
            if self._stream is not None:
                self._stream.close()
            await self._publisher.stop()
        return self.stats

    async def _loop(self, stop: asyncio.Event) -> None:
        assert self._stream is not None
        stopping = asyncio.ensure_future(stop.wait())
        try:
            while not stop.is_set():
                self._raise_if_failed()
                if self.tracker.in_flight >= self.settings.max_in_flight:
                    # back-pressure: stop reading the WAL until Kafka catches up
                    self._progress.clear()
                    await asyncio.wait([stopping, asyncio.ensure_future(self._progress.wait())],
                                       timeout=self.settings.status_interval, return_when=asyncio.FIRST_COMPLETED)
                    self._status()
                    continue
                messages = await self._stream.read(timeout=min(self.settings.status_interval, 1.0))
                for message in messages:
                    await self._handle(message)
                self._status()
        finally:
            stopping.cancel()

    async def _handle(self, message: pgoutput.XLogData | pgoutput.Keepalive) -> None:
        if isinstance(message, pgoutput.Keepalive):
            self.tracker.keepalive(message.wal_end)
            if message.reply_requested:
                self._status(force=True)
            return
        self.tracker.saw(message.data_start)
        decoded = pgoutput.decode(message.payload)
        if isinstance(decoded, pgoutput.Insert):
            await self._publish(decoded)
        elif isinstance(decoded, pgoutput.Begin):
            self._txn = self.tracker.begin(decoded.xid, decoded.final_lsn, decoded.commit_time)
        elif isinstance(decoded, pgoutput.Commit):
            assert self._txn is not None, "Commit without Begin"
            self.tracker.commit(self._txn, decoded.end_lsn)
            self.stats.transactions += 1
            self._txn = None
        elif isinstance(decoded, pgoutput.Relation):
            self._relations[decoded.relation_id] = decoded
        # Type, Origin, Update, Delete, Truncate: the publication carries inserts only.

    async def _publish(self, insert: pgoutput.Insert) -> None:
        txn = self._txn
        assert txn is not None, "Insert outside a transaction"
        relation = self._relations[insert.relation_id]
        row = outbox_row(pgoutput.relation_row(relation, insert.new))
        seq = self.tracker.sent(txn)
        record = contract.build_record(
            row,
            source_id=self.settings.source_id,
            prefix=self.settings.topic_prefix,
            position=contract.Position(txn.commit_lsn, seq),
            commit_time=contract.pg_timestamp_to_datetime(txn.commit_time),
            xid=txn.xid,
        )
        await self._publisher.send(record, partial(self._on_ack, txn, row.id))
        self.stats.events += 1

    def _on_ack(self, txn: Txn, event_id: str, future: "asyncio.Future[Any]") -> None:
        exc = future.exception() if not future.cancelled() else asyncio.CancelledError()
        if exc is None:
            self.tracker.acked(txn)
        else:
            self.tracker.failed(txn)
            if self._error is None:
                self._error = PublishFailed(f"Kafka refused event {event_id} of transaction {txn.xid}: {exc!r}")
        self._progress.set()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def _status(self, force: bool = False) -> None:
        """Tell PostgreSQL what is safe to discard; often while it moves, at least every status_interval."""
        assert self._stream is not None
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

    async def _drain(self) -> None:
        """On stop: wait (bounded) for in-flight events, confirm what was acknowledged."""
        if not await self._publisher.flush(DRAIN_TIMEOUT):
            log.warning("stopping with %d events unacknowledged after %.0f s; they will be sent again on restart",
                        self.tracker.in_flight, DRAIN_TIMEOUT)
        await asyncio.sleep(0)  # let the acknowledgement callbacks run
        self._status(force=True)
        self._raise_if_failed()


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
