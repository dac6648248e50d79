"""Exactly-once delivery: whole source transactions in Kafka transactions, with the source position.

The relay produces its events inside a Kafka transaction (librdkafka transactional producer)
and, before committing it, one record in the offsets topic (:mod:`relay.offsets`) naming the last
source transaction it holds. A ``read_committed`` consumer sees the events and the position
together or not at all. Only then is the slot confirmed; a relay restarted after a crash skips
the source transactions the slot replays but the offsets topic already holds.

Rules kept here:

* a Kafka transaction holds whole source transactions only: it is committed at a source
  transaction's boundary, every ``interval`` seconds or ``max_events`` events, whichever first;
  a source transaction that keeps it open past most of ``transaction.timeout.ms`` (the broker
  would abort it, fence the relay, and the restarted relay would replay it: a crash loop) stops
  the relay with one line (:class:`TransactionTooLarge`);
* the position goes to the offsets topic and to the source's own group offset
  (:mod:`relay.offsets`), in the same Kafka transaction; the transactional id is the source's
  (one per source id), recorded with the position, and a relay of the source with another id is
  refused (:class:`OtherTransactionalId`): it would not fence the first;
* delivery reports run on the loop: before ``commit_transaction`` (and ``abort_transaction``),
  which would serve them in the worker thread that calls it, the transaction's records are
  flushed (purged) while the loop serves their reports;
* a source transaction stays unconfirmed (held in the :class:`PositionTracker`) until the Kafka
  transaction holding it committed; one with nothing to publish (heartbeats) is released at its
  commit, in order behind the others;
* a fatal producer error (fenced by a newer relay with the same ``transactional.id``) stops the
  relay with one line; an abortable one ends the relay's session (:class:`RestartFromCommitted`
  is retriable, like an outage): the next session's producer aborts the Kafka transaction, the
  offsets topic is read again and the slot replays from its confirmed position;
* the commit runs in the background: the relay reads on, and what it sends meanwhile waits, in
  order, for the next Kafka transaction (:class:`TransactionalPublisher`).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from typing import Any

from confluent_kafka import KafkaError, KafkaException

from outbox import contract
from outbox.config import KafkaSettings, RelaySettings
from outbox.contract import Record
from outbox.errors import KafkaUnavailable, OutboxError
from outbox.metrics import RelayMetrics
from outbox.relay import policy
from outbox.relay.offsets import OffsetsTopic, SourcePosition, encode_position
from outbox.relay.positions import PositionTracker, Txn
from outbox.relay.publisher import DeliveryFailed, Publisher, Report, is_fenced, kafka_reason, librdkafka_log

log = logging.getLogger(__name__)

TRANSACTION_TIMEOUT_MS = 120_000  # the broker aborts a transaction left open this long (a dead relay's)
INIT_TIMEOUT = 60.0
OFFSETS_TIMEOUT = 30.0  # send_offsets_to_transaction
ABORT_FLUSH_TIMEOUT = 10.0  # seconds an abort waits for records in flight (their reports served on the loop)
COMMIT_TIMEOUT = 60.0
COMMIT_RETRIES = 5
COMMIT_POLL = 0.005  # seconds between looks at a running commit while the WAL is quiet


def default_transactional_id(source_id: str) -> str:
    return f"outbox-relay.{source_id}"


class Fenced(OutboxError):
    """A newer producer with the same transactional.id took over: this relay must stop."""


class TransactionTooLarge(OutboxError):
    """A source transaction takes longer to produce than the Kafka transaction timeout allows."""


class OtherTransactionalId(OutboxError):
    """The source's position was written by a relay with another transactional id."""


def transaction_timeout_ms(settings: RelaySettings) -> int:
    """librdkafka's transaction.timeout.ms: --transaction-timeout, else the message timeout, at least 120 s."""
    if settings.transaction_timeout is not None:
        return max(1, int(settings.transaction_timeout * 1000))
    return max(TRANSACTION_TIMEOUT_MS, int(settings.kafka_message_timeout * 1000))


class RestartFromCommitted(OutboxError):
    """The Kafka transaction must be aborted: the relay starts a new session (a new producer aborts
    it, the offsets topic is read again, the slot replays from its confirmed position)."""

    retriable = True


class _FencedLogFilter(logging.Filter):
    """librdkafka logs the fencing as FATAL; the relay says it once, in its own words."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "fenced" not in record.getMessage()


_FENCED_LOG_FILTER = _FencedLogFilter()


class TransactionalPublisher(Publisher):
    """The relay's producer with a ``transactional.id``: every send lands in the open Kafka transaction."""

    def __init__(self, kafka: KafkaSettings, transactional_id: str, *, transaction_timeout_ms: int | None = None,
                 **kwargs: Any) -> None:
        if transaction_timeout_ms is None:
            transaction_timeout_ms = max(TRANSACTION_TIMEOUT_MS, kwargs.get("message_timeout_ms", 0))
        # librdkafka wants message.timeout.ms <= transaction.timeout.ms
        kwargs["message_timeout_ms"] = min(kwargs.get("message_timeout_ms", transaction_timeout_ms), transaction_timeout_ms)
        super().__init__(kafka, extra={"transactional.id": transactional_id,
                                       "transaction.timeout.ms": transaction_timeout_ms}, **kwargs)
        self.transactional_id = transactional_id
        self.transaction_timeout = transaction_timeout_ms / 1000
        self.in_transaction = False
        self.began = 0.0  # monotonic time the open Kafka transaction began
        self._offsets: tuple[list[Any], Any] | None = None  # the group offset of the ended transaction
        self.sent_in_transaction = 0  # events for the open (or, while one commits, the next) Kafka transaction
        # While a commit runs the producer may not produce: records sent meanwhile wait here, in order,
        # for the next transaction, so reading and decoding the WAL go on during the commit.
        self._held: deque[tuple[Record, Report]] = deque()
        self._holding = False

    async def start(self) -> None:
        librdkafka_log.addFilter(_FENCED_LOG_FILTER)  # once: the same filter is not added twice
        await super().start()
        assert self._producer is not None
        try:  # fences any older producer with this id and aborts the transaction it left open
            await asyncio.to_thread(self._producer.init_transactions, INIT_TIMEOUT)
        except KafkaException as exc:
            raise KafkaUnavailable(f"cannot initialise Kafka transactions for transactional id {self.transactional_id}: "
                                   f"{kafka_reason(exc)} (the relay's user needs WRITE and DESCRIBE on the "
                                   "TransactionalId; the broker needs transaction.state.log.* settings it can meet)") from None

    def try_send(self, record: Record, report: Report) -> bool:
        if self._holding:
            self._held.append((record, report))
        elif not self._produce(record, report):
            return False
        self.sent_in_transaction += 1
        return True

    def _produce(self, record: Record, report: Report) -> bool:
        if not self.in_transaction:
            self._call(self._producer.begin_transaction)  # type: ignore[union-attr]
            self.in_transaction = True
            self.began = time.monotonic()
        return super().try_send(record, report)

    @property
    def open_for(self) -> float:
        """Seconds the open Kafka transaction has been open (0: none open, or it is committing)."""
        return time.monotonic() - self.began if self.in_transaction and not self._holding else 0.0

    def end_transaction(self, key: bytes, value: bytes, offsets_topic: str,
                        group_offsets: tuple[list[Any], Any] | None = None) -> None:
        """Add the position record: nothing sent from now on goes into this transaction; then :meth:`commit`.
        ``group_offsets`` (offsets, group metadata) are committed with it (``send_offsets_to_transaction``).

        Synchronous on purpose: a record sent before the commit task runs must wait too.
        """
        producer = self._producer
        assert producer is not None and self.in_transaction and not self._holding, "end_transaction out of turn"
        try:
            producer.produce(offsets_topic, value, key)
        except KafkaException as exc:
            raise self._classify(exc.args[0], "write the source position") from None
        self._holding = True
        self._offsets = group_offsets
        self.sent_in_transaction = 0

    async def commit(self) -> None:
        """Commit the ended transaction; retriable errors are retried, the rest raise. What was sent
        meanwhile is then produced, in order, into the next transaction."""
        producer = self._producer
        assert producer is not None and self._holding, "commit without end_transaction"
        await self._commit(producer)
        self.in_transaction = False
        while self._held:  # anything sent while these are produced queues behind them
            record, report = self._held.popleft()
            while not self._produce(record, report):  # queue full: let deliveries drain it
                await asyncio.sleep(0.005)
        self._holding = False

    async def _flush_on_loop(self, producer: Any, timeout: float) -> None:
        """Serve every delivery report of the transaction here, on the loop: ``commit_transaction`` would
        serve them in the thread that calls it."""
        deadline = time.monotonic() + timeout
        while True:
            self._poll(producer)
            if not len(producer):
                return
            if time.monotonic() >= deadline:
                raise RestartFromCommitted(f"Kafka did not acknowledge the transaction's records in {timeout:.0f} s")
            await asyncio.sleep(0.001)

    async def _commit(self, producer: Any) -> None:
        await self._flush_on_loop(producer, COMMIT_TIMEOUT)
        if self._offsets is not None:
            offsets, group_metadata = self._offsets
            try:
                await asyncio.to_thread(producer.send_offsets_to_transaction, offsets, group_metadata, OFFSETS_TIMEOUT)
            except KafkaException as exc:
                raise self._classify(exc.args[0], "commit the source position to its consumer group") from None
        for attempt in range(COMMIT_RETRIES):
            try:
                await asyncio.to_thread(producer.commit_transaction, COMMIT_TIMEOUT)
                break
            except KafkaException as exc:
                err: KafkaError = exc.args[0]
                if policy.retry_commit(err.retriable(), err.txn_requires_abort(), attempt, COMMIT_RETRIES):
                    log.warning("Kafka transaction commit failed, retrying: %s", err.str())
                    continue
                raise self._classify(err, "commit the Kafka transaction") from None

    async def abort(self) -> None:
        """Abort the open Kafka transaction (its records stay invisible to read_committed consumers)."""
        self._held.clear()  # never produced: nothing to take back
        self._holding = False
        producer = self._producer
        if producer is None or not self.in_transaction:
            self.sent_in_transaction = 0
            return
        try:
            # abort_transaction purges what is unacknowledged and serves those reports in its thread: let it
            # land first while the loop serves the reports (purging here would fail the transaction itself)
            with contextlib.suppress(RestartFromCommitted):
                await self._flush_on_loop(producer, ABORT_FLUSH_TIMEOUT)
            await asyncio.to_thread(producer.abort_transaction, COMMIT_TIMEOUT)
        except KafkaException as exc:
            err: KafkaError = exc.args[0]
            if err.fatal():
                raise self._classify(err, "abort the Kafka transaction") from None
            raise KafkaUnavailable(f"cannot abort the Kafka transaction: {err.str()}") from None
        finally:
            self.in_transaction = False
            self.sent_in_transaction = 0

    def _call(self, method: Any) -> None:
        try:
            method()
        except KafkaException as exc:
            raise self._classify(exc.args[0], "begin a Kafka transaction") from None

    def _classify(self, err: KafkaError, doing: str) -> Exception:
        if err.code() == KafkaError._FATAL and self.fatal_error is not None:  # "Local: Fatal error": the cause
            err = self.fatal_error
        if err.fatal() or err.code() == KafkaError._FATAL:
            return fenced_or_fatal(self.transactional_id, is_fenced(err), err.str())
        return RestartFromCommitted(f"could not {doing}: {err.str()}")

    def _refused(self, record: Record, exc: KafkaException) -> OutboxError:
        err = exc.args[0] if exc.args else None
        if isinstance(err, KafkaError) and (err.fatal() or err.code() == KafkaError._FATAL):
            fatal = self._classify(err, "produce")
            assert isinstance(fatal, OutboxError)
            return fatal
        return super()._refused(record, exc)


def _retrieve(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()


def fenced_or_fatal(transactional_id: str, fenced: bool, reason: str) -> OutboxError:
    if fenced:
        return Fenced(f"fenced: another relay started with transactional id {transactional_id}; this one stops "
                      "without confirming anything more (run one relay per source id)")
    return OutboxError(f"Kafka producer failed fatally (transactional id {transactional_id}): {reason}")


def exactly_once(settings: RelaySettings, metrics: RelayMetrics) -> ExactlyOnce:
    return ExactlyOnce(settings.kafka, source_id=settings.source_id,
                       transactional_id=settings.transactional_id or default_transactional_id(settings.source_id),
                       offsets_topic=settings.offsets_topic, interval=settings.transaction_interval,
                       max_events=settings.transaction_max_events, metrics=metrics,
                       transaction_timeout_ms=transaction_timeout_ms(settings))


class ExactlyOnce:
    """Groups source transactions into Kafka transactions and keeps the offsets topic in step."""

    def __init__(self, kafka: KafkaSettings, *, source_id: str, transactional_id: str, offsets_topic: str,
                 interval: float, max_events: int, metrics: RelayMetrics,
                 transaction_timeout_ms: int = TRANSACTION_TIMEOUT_MS) -> None:
        self.kafka = kafka
        self.transactional_id = transactional_id
        self.transaction_timeout_ms = transaction_timeout_ms
        self.publisher = TransactionalPublisher(kafka, transactional_id,  # one per session: new_publisher()
                                                transaction_timeout_ms=transaction_timeout_ms)
        self.offsets = OffsetsTopic(kafka, offsets_topic)
        self.source_id = source_id
        self.interval = interval
        self.max_events = max_events
        self.metrics = metrics
        self.position: SourcePosition | None = None  # the newest committed one
        self.commits = 0
        self._skipped = 0  # source transactions skipped since the last one published
        self.tracker = PositionTracker()
        self._members: list[Txn] = []  # complete source transactions in the open Kafka transaction
        self._commit: asyncio.Task[list[Txn]] | None = None  # the Kafka transaction being committed
        self._opened = 0.0  # monotonic time the open Kafka transaction got its first complete source transaction
        self._group_metadata: Any = None  # for send_offsets_to_transaction (read once, at the first load)
        self._abort_on_close = False

    def new_publisher(self, **options: Any) -> TransactionalPublisher:
        """The producer of a new session; its start() fences older ones and aborts what they left open."""
        self.publisher = TransactionalPublisher(self.kafka, self.transactional_id,
                                                transaction_timeout_ms=self.transaction_timeout_ms, **options)
        return self.publisher

    async def load(self, tracker: PositionTracker) -> SourcePosition | None:
        """Once the session's producer started: read this source's committed position."""
        self.reset(tracker)
        await asyncio.to_thread(self.offsets.ensure)
        if self._group_metadata is None:
            self._group_metadata = await asyncio.to_thread(self.offsets.group_metadata, self.source_id)
        # the source's own group first: no other relay's open transaction holds it back
        stored = await asyncio.to_thread(self.offsets.read_group, self.source_id)
        if stored is None:  # first start, an older relay's positions, or the group expired
            stored = await asyncio.to_thread(self.offsets.read_stored, self.source_id)
        if stored is not None and stored.transactional_id not in (None, self.transactional_id):
            raise OtherTransactionalId(
                f"source {self.source_id} was published by a relay with transactional id {stored.transactional_id} "
                f"({stored.where}); this one has {self.transactional_id} and would not fence it: run every relay of "
                f"a source with the same transactional id (the default, outbox-relay.<source id>, or the same "
                "--transactional-id); to change it, stop the old relay for good and reset the source's position "
                "(docs/delivery.md, The offsets topic)")
        self.position = stored.position if stored is not None else None
        if stored is None:
            log.info("exactly-once: no position for %s in %s: publishing everything the slot sends",
                     self.source_id, self.offsets.topic)
        else:
            log.info("exactly-once: %s already published up to %s (from %s); earlier transactions are skipped",
                     self.source_id, stored.position, stored.where)
        return self.position

    def reset(self, tracker: PositionTracker) -> None:
        """A new session: nothing of an earlier, unfinished Kafka transaction counts."""
        self.tracker = tracker
        self._members = []
        self._commit = None
        self._skipped = 0

    def begin(self, txn: Txn) -> bool:
        """A source transaction starts; True when Kafka already holds it (skip its events)."""
        self.tracker.hold(txn)
        return self.position is not None and self.position.covers(txn.commit_lsn)

    def source_committed(self, txn: Txn, skipped: bool) -> None:
        if skipped:
            self.metrics.skipped.inc()
            self._skipped += 1
        elif self._skipped:
            log.info("exactly-once: skipped %d source transactions the slot sent again (already in Kafka)", self._skipped)
            self._skipped = 0
        if skipped or not txn.events:  # nothing of it is in the open Kafka transaction
            self.tracker.release(txn)
            return
        if not self._members:
            self._opened = time.monotonic()
        self._members.append(txn)

    @property
    def committing(self) -> bool:
        return self._commit is not None

    def due(self, force: bool = False) -> bool:
        """Whether the open Kafka transaction should commit now (call only between source transactions)."""
        return policy.kafka_commit_due(members=len(self._members), committing=self._commit is not None,
                                       sent=self.publisher.sent_in_transaction, max_events=self.max_events,
                                       opened=self._opened, interval=self.interval, now=time.monotonic(), force=force)

    def time_left(self) -> float | None:
        """Seconds until the open Kafka transaction is due (or, while one commits, until it is worth looking
        again); None when it holds no complete source transaction."""
        return policy.kafka_commit_wait(members=len(self._members), committing=self._commit is not None,
                                        opened=self._opened, interval=self.interval, now=time.monotonic(),
                                        poll=COMMIT_POLL)

    def start_commit(self) -> None:
        """Commit the open Kafka transaction in the background; :meth:`finished` says when it is done."""
        members, self._members = self._members, []
        last = members[-1]
        position = SourcePosition(commit_lsn=last.commit_lsn, end_lsn=last.end_lsn or last.commit_lsn, xid=last.xid)
        key, value = encode_position(self.source_id, position, self.transactional_id)
        if self._group_metadata is None:  # not loaded (unit tests)
            self.publisher.end_transaction(key, value, self.offsets.topic)
        else:
            group = self.offsets.group_offset(self.source_id, position, self.transactional_id)
            self.publisher.end_transaction(key, value, self.offsets.topic, (group, self._group_metadata))
        self._commit = asyncio.create_task(self._commit_members(members, position))

    def finished(self) -> list[Txn]:
        """The source transactions of a Kafka transaction committed since the last call (now confirmed);
        raises what the commit raised."""
        task = self._commit
        if task is None or not task.done():
            return []
        self._commit = None
        return task.result()

    async def settle(self) -> list[Txn]:
        """Wait for a running commit to end; then as :meth:`finished`."""
        if self._commit is not None:
            await asyncio.wait([self._commit])
        return self.finished()

    async def _commit_members(self, members: list[Txn], position: SourcePosition) -> list[Txn]:
        started = time.monotonic()
        await self.publisher.commit()
        self.metrics.kafka_commit.observe(time.monotonic() - started)
        self.metrics.kafka_committed.inc()
        self.commits += 1
        self.position = position
        for txn in members:
            self.tracker.release(txn)
        return members

    async def abort(self) -> None:
        """Abort the open Kafka transaction, after a running commit ended (raises if that one was fenced)."""
        with contextlib.suppress(RestartFromCommitted):
            await self.settle()
        had = self.publisher.in_transaction
        await self.publisher.abort()
        if had:
            self.metrics.kafka_aborted.inc()
        self._members = []

    def too_large(self, txn: Txn) -> TransactionTooLarge | None:
        """The error that stops the relay when the open Kafka transaction, still producing the source
        transaction ``txn``, is about to outlive the Kafka transaction timeout (None: not yet)."""
        publisher = self.publisher
        if not policy.kafka_transaction_overdue(publisher.open_for, publisher.transaction_timeout):
            return None
        self._abort_on_close = True
        return TransactionTooLarge(
            f"source transaction {txn.xid} (commit {contract.format_lsn(txn.commit_lsn)}) is too large for one Kafka "
            f"transaction: after {publisher.open_for:.1f} s and {txn.events} events it is still being produced, and "
            f"the broker aborts a Kafka transaction open for {publisher.transaction_timeout:g} s; a relay left to "
            "it would be fenced and replay it forever. Raise --transaction-timeout (at most the broker's "
            "transaction.max.timeout.ms) or publish it with --delivery at-least-once; nothing of it was published")

    def fatal(self, exc: Exception) -> OutboxError | None:
        """A failed delivery that must stop the relay (fenced); None for the others, which end the
        session like in at-least-once mode (the next one aborts the Kafka transaction)."""
        fatal = self.publisher.fatal_error  # then the report says only "purged"
        if fatal is not None:
            return fenced_or_fatal(self.transactional_id, is_fenced(fatal), fatal.str())
        if isinstance(exc, DeliveryFailed) and exc.fatal:
            return fenced_or_fatal(self.transactional_id, exc.fenced, str(exc))
        return None

    async def close(self, timeout: float = 5.0) -> None:
        """End of a session: let a running commit finish (briefly); its outcome no longer matters here,
        the next session reads the offsets topic again."""
        task = self._commit
        if task is not None:
            await asyncio.wait([task], timeout=timeout)
            if not task.done():  # Kafka away: the next session's producer aborts it; retrieve how it ends
                task.cancel()
                task.add_done_callback(_retrieve)
            elif not task.cancelled():
                task.exception()  # retrieved: it ended the session or is moot
        self._commit = None
        if self.publisher.in_transaction:  # left open: the next session's producer aborts it
            self.metrics.kafka_aborted.inc()
            if self._abort_on_close:  # ... but the relay stops: do not hold read_committed readers back
                self._abort_on_close = False
                with contextlib.suppress(OutboxError):
                    await self.publisher.abort()
