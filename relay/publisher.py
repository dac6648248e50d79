"""The Kafka edge of the relay: an idempotent, acks=all producer with a thin lifecycle."""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaConnectionError, KafkaError

from outbox.config import KafkaSettings
from outbox.contract import Record
from outbox.errors import KafkaUnavailable

log = logging.getLogger(__name__)

AckCallback = Callable[["asyncio.Future[Any]"], None]


class Publisher:
    """Sends records and reports each acknowledgement (or failure) through a callback."""

    def __init__(self, kafka: KafkaSettings, *, linger_ms: int = 5, max_batch_size: int = 512 * 1024) -> None:
        self._kafka = kafka
        self._linger_ms = linger_ms
        self._max_batch_size = max_batch_size
        self._producer: AIOKafkaProducer | None = None

    async def start(self) -> None:
        self._producer = AIOKafkaProducer(
            **self._kafka.client_kwargs(),
            client_id="outbox-relay",
            enable_idempotence=True,  # implies acks=all and ordered retries
            acks="all",
            linger_ms=self._linger_ms,
            max_batch_size=self._max_batch_size,
            request_timeout_ms=30_000,
        )
        try:
            await self._producer.start()
        except KafkaConnectionError:
            await self._producer.stop()
            self._producer = None
            raise KafkaUnavailable(f"cannot reach Kafka at {self._kafka.bootstrap}: check --kafka-bootstrap and that the broker runs") from None
        except KafkaError as exc:
            await self._producer.stop()
            self._producer = None
            raise KafkaUnavailable(f"Kafka at {self._kafka.bootstrap} refused the producer: {exc}") from None

    @property
    def client(self) -> Any:
        """The producer's cluster client (for the health probe), or None before start / after stop."""
        return self._producer.client if self._producer is not None else None

    async def send(self, record: Record, on_done: AckCallback) -> None:
        """Queue one record; waits only when the producer's buffer is full (back-pressure)."""
        assert self._producer is not None
        future = await self._producer.send(record.topic, value=record.value, key=record.key, headers=record.headers)
        future.add_done_callback(on_done)

    async def flush(self, timeout: float) -> bool:
        """Wait for everything queued to be acknowledged; False when ``timeout`` ran out first."""
        if self._producer is None:
            return True
        try:
            await asyncio.wait_for(self._producer.flush(), timeout)
            return True
        except TimeoutError:
            return False

    async def stop(self) -> None:
        if self._producer is not None:
            producer, self._producer = self._producer, None
            await producer.stop()
