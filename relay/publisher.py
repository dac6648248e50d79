"""The Kafka edge of the relay: an idempotent, acks=all producer with a thin lifecycle.

Built on librdkafka (confluent-kafka): its per-message cost is a few microseconds against
aiokafka's ~13 µs, which was the largest share of the relay's CPU (docs/benchmarks.md).
Delivery reports are served on the asyncio loop itself: ``poll(0)`` every ``POLL_EVERY_SENDS``
records while sending, and from a small task every millisecond while anything is in flight.
Each report calls its event's callback right there, with librdkafka's own ``(err, msg)``: no
wrapper object per event (the relay passes one callback per source transaction). A delivery-report thread (the usual
pattern) made the loop and that thread fight over the GIL once per message: serving reports
inline gave +65% events/s and 40% less RSS in the backlog benchmark (docs/benchmarks.md).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Producer

from outbox.config import KafkaSettings
from outbox.contract import Record
from outbox.errors import KafkaUnavailable, OutboxError
from outbox.relay.errors import DeliveryFailed as DeliveryFailed

log = logging.getLogger(__name__)
librdkafka_log = logging.getLogger("librdkafka")

Report = Callable[[KafkaError | None, Any], None]  # librdkafka's delivery report: (error or None, message)
POLL_EVERY_SENDS = 64  # serve delivery reports after this many records while sending
POLL_BUSY = 0.001  # seconds between polls while records are in flight
POLL_IDLE = 0.005  # ... and while nothing is


def delivery_failed(error: KafkaError) -> DeliveryFailed:
    """What librdkafka's delivery-report error means, as the plain value the relay's policy reads."""
    code = error.code()
    return DeliveryFailed(error.str(), code=code, outage=bool(error.retriable() or error.fatal() or code in _OUTAGE_CODES),
                          too_large=code == KafkaError.MSG_SIZE_TOO_LARGE,
                          purged=code in (KafkaError._PURGE_QUEUE, KafkaError._PURGE_INFLIGHT),
                          fatal=bool(error.fatal()), fenced=is_fenced(error))


_OUTAGE_CODES = frozenset({KafkaError._MSG_TIMED_OUT, KafkaError._TIMED_OUT, KafkaError._TRANSPORT,
                           KafkaError._ALL_BROKERS_DOWN, KafkaError._PURGE_QUEUE, KafkaError._PURGE_INFLIGHT,
                           KafkaError.REQUEST_TIMED_OUT, KafkaError.NOT_ENOUGH_REPLICAS,
                           KafkaError.NOT_ENOUGH_REPLICAS_AFTER_APPEND, KafkaError.LEADER_NOT_AVAILABLE,
                           KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError._UNKNOWN_PARTITION,
                           KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER, KafkaError.UNKNOWN_PRODUCER_ID,
                           KafkaError.INVALID_PRODUCER_EPOCH})


class RecordRefused(OutboxError):
    """The producer refused a record outright (too large, unknown topic name, ...)."""


class RecordTooLarge(RecordRefused):
    """Larger than the producer's message.max.bytes: Kafka would never take it."""


class Publisher:
    """Sends records and reports each acknowledgement (or failure) through a callback on the loop."""

    def __init__(self, kafka: KafkaSettings, *, linger_ms: int = 5, queue_messages: int = 100_000,
                 queue_kbytes: int = 32 * 1024, message_timeout_ms: int = 300_000,
                 batch_bytes: int = 1_000_000, extra: dict[str, Any] | None = None) -> None:
        self._kafka = kafka
        self._extra = extra or {}  # more librdkafka settings (a transactional.id, say)
        self._linger_ms = linger_ms
        self._queue_messages = queue_messages
        # bound the relay's memory; sized above --max-in-flight(-bytes) (policy.producer_queue): the relay pauses
        # reading first, and a full queue only catches what one read of the stream brought past those bounds
        self._queue_kbytes = queue_kbytes
        self._message_timeout_ms = message_timeout_ms
        self._batch_bytes = batch_bytes  # at most the smallest topic's max.message.bytes: Kafka limits batches
        self._producer: Producer | None = None
        self._sends = 0
        self._poller: asyncio.Task[None] | None = None
        self.fatal_error: KafkaError | None = None  # librdkafka raised it from poll(): the producer is done

    async def start(self) -> None:
        config = {
            **self._kafka.librdkafka_config(),
            "client.id": "outbox-relay",
            "enable.idempotence": True,  # implies acks=all, ordered retries, no duplicates from retries
            "acks": "all",
            "linger.ms": self._linger_ms,
            "queue.buffering.max.messages": self._queue_messages,
            "queue.buffering.max.kbytes": self._queue_kbytes,
            "message.timeout.ms": self._message_timeout_ms,
            "batch.size": self._batch_bytes,
            "logger": librdkafka_log,
            **self._extra,
        }
        producer = Producer(config)
        try:
            await asyncio.to_thread(producer.list_topics, timeout=10)
        except KafkaException as exc:
            raise KafkaUnavailable(f"cannot reach Kafka at {self._kafka.bootstrap}: {kafka_reason(exc)} "
                                   "(check --kafka-bootstrap and that the broker runs)") from None
        self._producer = producer
        self._poller = asyncio.ensure_future(self._serve_reports())

    async def reachable(self, timeout: float) -> bool:
        """Whether a broker answers a metadata request now (for the health gauge)."""
        if self._producer is None:
            return False
        try:
            await asyncio.to_thread(self._producer.list_topics, timeout=timeout)
            return True
        except KafkaException:
            return False

    def try_send(self, record: Record, report: Report) -> bool:
        """Queue one record without waiting; False when librdkafka's queue is full (back-pressure).

        ``report(err, msg)`` runs on the loop once Kafka acknowledged the record (``err`` None) or
        gave up on it (:class:`DeliveryFailed` ``(err)`` says how).
        """
        producer = self._producer
        assert producer is not None
        self._sends += 1
        if self._sends % POLL_EVERY_SENDS == 0:
            self._poll(producer)
        try:
            producer.produce(record.topic, record.value, record.key, headers=record.headers,  # type: ignore[arg-type]
                             on_delivery=report)
            return True
        except BufferError:  # queue full: deliveries must drain it first
            return False
        except KafkaException as exc:
            raise self._refused(record, exc) from None

    async def send(self, record: Record, report: Report) -> None:
        """Queue one record; waits only while librdkafka's queue is full (back-pressure). Waits without
        bound: the session's own path (``Session._send_when_room``) keeps answering PostgreSQL and stops."""
        while not self.try_send(record, report):
            await asyncio.sleep(0.005)

    async def flush(self, timeout: float) -> bool:
        """Wait for everything queued to be acknowledged; False when ``timeout`` ran out first."""
        producer = self._producer
        if producer is None:
            return True
        # not producer.flush(): it would run the callbacks in whichever thread waits in it
        deadline = time.monotonic() + timeout
        while True:
            self._poll(producer)
            if not len(producer):
                return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(POLL_BUSY)

    @property
    def max_message_bytes(self) -> int:
        """The producer's own limit (librdkafka's message.max.bytes default)."""
        return int(self._kafka.librdkafka_config().get("message.max.bytes", 1_000_000))

    async def stop(self) -> None:
        """Drop whatever is still queued (its events were never confirmed) and close the producer."""
        if self._producer is not None:
            self._producer.purge(in_queue=True, in_flight=True)
            self._poll(self._producer)  # serves the purge reports
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
            self._poller = None
        self._producer = None  # librdkafka closes when the object goes; nothing unsent is confirmed

    def _refused(self, record: Record, exc: KafkaException) -> OutboxError:
        too_large = exc.args and isinstance(exc.args[0], KafkaError) and exc.args[0].code() == KafkaError.MSG_SIZE_TOO_LARGE
        return (RecordTooLarge if too_large else RecordRefused)(
            f"Kafka producer refused a record for {record.topic} ({len(record.value)} bytes): {kafka_reason(exc)}")

    # ------------------------------------------------------------------ delivery reports
    def _poll(self, producer: Producer) -> None:
        """Serve delivery reports; a fatal error (fenced) is kept: the next produce or commit fails and says why."""
        try:
            producer.poll(0)
        except KafkaException as exc:
            self.fatal_error = exc.args[0] if exc.args else None

    async def _serve_reports(self) -> None:
        """Serve delivery reports on the loop until cancelled (``send`` serves them too while busy)."""
        producer = self._producer
        assert producer is not None
        while True:
            self._poll(producer)
            await asyncio.sleep(POLL_BUSY if len(producer) else POLL_IDLE)


async def topic_max_bytes(kafka: KafkaSettings, topics: list[str], timeout: float = 10.0) -> dict[str, int]:
    """Each topic's max.message.bytes as the brokers enforce it (topic override or broker default)."""
    from confluent_kafka.admin import AdminClient, ConfigResource

    def describe() -> dict[str, int]:
        admin = AdminClient({**kafka.librdkafka_config(), "logger": librdkafka_log})  # type: ignore[dict-item]
        resources = [ConfigResource("topic", t) for t in topics]
        out = {}
        try:
            for resource, future in admin.describe_configs(resources, request_timeout=timeout).items():
                out[resource.name] = int(future.result(timeout)["max.message.bytes"].value)
        except (KafkaException, TimeoutError) as exc:
            reason = kafka_reason(exc) if isinstance(exc, KafkaException) else "timed out"
            raise KafkaUnavailable(f"cannot read max.message.bytes of {', '.join(topics)} from Kafka at "
                                   f"{kafka.bootstrap}: {reason}") from None
        return out

    return await asyncio.to_thread(describe)


def is_fenced(error: KafkaError) -> bool:
    """A newer producer with the same transactional.id took over."""
    return error.code() in (KafkaError._FENCED, KafkaError.PRODUCER_FENCED, KafkaError.INVALID_PRODUCER_EPOCH)


def kafka_reason(exc: KafkaException) -> str:
    err = exc.args[0] if exc.args else None
    return err.str() if isinstance(err, KafkaError) else str(exc)
