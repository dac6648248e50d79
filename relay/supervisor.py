"""The relay's supervisor: sessions one after another, reconnects with backoff, signals.

Thin I/O: which failure reconnects, which exits, and how long "slot in use" may be our own old
walsender are decided in ``relay.policy`` (``after_session``, ``after_preflight``). A stop
(SIGTERM, Ctrl-C) ends the current session through its drain; during a backoff it exits at once.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Iterator

from outbox.backoff import Backoff
from outbox.config import RelaySettings
from outbox.dsn import describe
from outbox.errors import OutboxError
from outbox.relay import policy
from outbox.relay.policy import Next
from outbox.relay.replication import SlotInfo, preflight
from outbox.relay.state import RelayState

log = logging.getLogger("outbox.relay.runner")  # the relay's log lines keep their logger name

RunSession = Callable[[SlotInfo, asyncio.Event, Backoff], Awaitable[None]]


async def supervise(settings: RelaySettings, state: RelayState, slot: SlotInfo, stop: asyncio.Event,
                    session: RunSession) -> None:
    """Stream sessions from the slot; after a transient failure (PostgreSQL restarted, Kafka away
    longer than --kafka-message-timeout), reconnect with backoff and resume from the slot."""
    s = settings
    retry = Backoff(policy.RECONNECT_INITIAL, policy.RECONNECT_CAP)
    busy_since: float | None = None
    while True:
        try:
            await session(slot, stop, retry)
            return
        except OutboxError as exc:
            decision = policy.after_session(exc, state.streamed, stop.is_set())
            if decision is Next.STOP:
                return
            if decision is Next.FAIL:
                raise
            failure: OutboxError = exc
            if policy.means_kafka_down(failure):
                state.kafka_reachable(False)
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
            except OutboxError as exc:
                attempt = policy.after_preflight(exc, busy_since, time.monotonic())
                busy_since = attempt.busy_since
                if attempt.next is Next.FAIL:
                    raise
                failure = exc
            if policy.means_kafka_down(failure):
                state.kafka_reachable(False)


@contextlib.contextmanager
def stop_on_signals(stop: asyncio.Event, loop: asyncio.AbstractEventLoop) -> Iterator[None]:
    """SIGTERM and SIGINT set ``stop`` (the session drains, then the relay exits 0)."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        yield
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
