"""The Kafka edge of the relay: an idempotent, acks=all producer with a thin lifecycle.

Built on librdkafka (confluent-kafka): its per-message cost is a few microseconds against
aiokafka's ~13 µs, which was the largest share of the relay's CPU (docs/benchmarks.md). A
background thread serves librdkafka's delivery reports; they reach the asyncio loop in
batches, one wake-up per batch, and each calls its event's callback there.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from functools import partial
from typing import Any, Callable

from confluent_kafka import KafkaError, KafkaException, Producer

from outbox.config import KafkaSettings
from outbox.contract import Record
from outbox.errors import KafkaUnavailable, OutboxError

log = logging.getLogger(__name__)
librdkafka_log = logging.getLogger("librdkafka")

AckCallback = Callable[[Exception | None], None]
POLL_SECONDS = 0.05  # the delivery thread's longest wait; reports are served as soon as they arrive


class DeliveryFailed(Exception):
    """Kafka did not take an event (after librdkafka's own retries)."""

    def __init__(self, error: KafkaError) -> None:
        super().__init__(error.str())
        self.fatal = error.fatal()  # a transactional producer fenced by a newer instance, say
        self.fenced = is_fenced(error)


class RecordRefused(OutboxError):
    """The producer refused a record outright (too large, unknown topic name, ...)."""


class Publisher:
    """Sends records and reports each acknowledgement (or failure) through a callback on the loop."""

    def __init__(self, kafka: KafkaSettings, *, linger_ms: int = 5, queue_messages: int = 100_000,
                 queue_kbytes: int = 32 * 1024, extra: dict[str, Any] | None = None) -> None:
        self._kafka = kafka
        self._extra = extra or {}  # more librdkafka settings (a transactional.id, say)
        self._linger_ms = linger_ms
        self._queue_messages = queue_messages
        self._queue_kbytes = queue_kbytes  # bounds the relay's memory: a full queue is back-pressure
        self._producer: Producer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reports: deque[tuple[AckCallback, Exception | None]] = deque()
        self._dispatch_pending = False
        self._polling = threading.Event()
        self._poller: threading.Thread | None = None
        self.fatal_error: KafkaError | None = None  # set by the delivery thread when librdkafka raises one

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        config = {
            **self._kafka.librdkafka_config(),
            "client.id": "outbox-relay",
            "enable.idempotence": True,  # implies acks=all, ordered retries, no duplicates from retries
            "acks": "all",
            "linger.ms": self._linger_ms,
            "queue.buffering.max.messages": self._queue_messages,
            "queue.buffering.max.kbytes": self._queue_kbytes,
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
        self._polling.set()
        self._poller = threading.Thread(target=self._serve_reports, name="kafka-delivery-reports", daemon=True)
        self._poller.start()

    async def reachable(self, timeout: float) -> bool:
        """Whether a broker answers a metadata request now (for the health gauge)."""
        if self._producer is None:
            return False
        try:
            await asyncio.to_thread(self._producer.list_topics, timeout=timeout)
            return True
        except KafkaException:
            return False

    async def send(self, record: Record, on_done: AckCallback) -> None:
        """Queue one record; waits only while librdkafka's queue is full (back-pressure)."""
        producer = self._producer
        assert producer is not None
        report = partial(self._delivered, on_done)
        while True:
            try:
                producer.produce(record.topic, record.value, record.key, headers=record.headers, on_delivery=report)
                return
            except BufferError:  # queue full: let deliveries drain it
                await asyncio.sleep(0.005)
            except KafkaException as exc:
                raise self._refused(record, exc) from None

    async def flush(self, timeout: float) -> bool:
        """Wait for everything queued to be acknowledged; False when ``timeout`` ran out first."""
        if self._producer is None:
            return True
        remaining = await asyncio.to_thread(self._producer.flush, timeout)
        await asyncio.sleep(0)  # reports delivered by flush() are dispatched on the loop
        self._dispatch()
        return remaining == 0

    async def stop(self) -> None:
        self._polling.clear()
        if self._poller is not None:
            await asyncio.to_thread(self._poller.join)
            self._poller = None
        self._producer = None  # librdkafka closes when the object goes; nothing unsent is confirmed

    def _refused(self, record: Record, exc: KafkaException) -> OutboxError:
        return RecordRefused(f"Kafka producer refused a record for {record.topic} "
                             f"({len(record.value)} bytes): {kafka_reason(exc)}")

    # ------------------------------------------------------------------ delivery reports
    def _serve_reports(self) -> None:
        producer = self._producer
        assert producer is not None
        while self._polling.is_set():
            try:
                producer.poll(POLL_SECONDS)
            except KafkaException as exc:  # a fatal error (fenced): the next produce or commit fails and says why
                self.fatal_error = exc.args[0] if exc.args else None
                time.sleep(POLL_SECONDS)

    def _delivered(self, on_done: AckCallback, err: KafkaError | None, _msg: Any) -> None:
        """In librdkafka's calling thread: queue the report, wake the loop once per batch."""
        self._reports.append((on_done, None if err is None else DeliveryFailed(err)))
        if not self._dispatch_pending and self._loop is not None:
            self._dispatch_pending = True
            self._loop.call_soon_threadsafe(self._dispatch)

    def _dispatch(self) -> None:
        """On the loop: call every queued report's callback."""
        self._dispatch_pending = False
        reports = self._reports
        while reports:
            on_done, error = reports.popleft()
            on_done(error)


def is_fenced(error: KafkaError) -> bool:
    """A newer producer with the same transactional.id took over."""
    return error.code() in (KafkaError._FENCED, KafkaError.PRODUCER_FENCED, KafkaError.INVALID_PRODUCER_EPOCH)


def kafka_reason(exc: KafkaException) -> str:
    err = exc.args[0] if exc.args else None
    return err.str() if isinstance(err, KafkaError) else str(exc)
