"""The relay's background tasks, off the hot path: purge old rows, heartbeat, slot sample, Kafka probe.

None of them is fatal: streaming does not depend on them. Each logs once when it starts failing
and once when it works again; what is due when, and what a slot sample means, is in ``relay.policy``.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from outbox.config import RelaySettings
from outbox.errors import OutboxError
from outbox.relay import policy
from outbox.relay.replication import Parker, SlotMonitor, purge_events
from outbox.relay.state import RelayState

log = logging.getLogger("outbox.relay.runner")  # the relay's log lines keep their logger name


async def purge_periodically(settings: RelaySettings, stop: asyncio.Event) -> None:
    """Keep outbox.events from growing forever: rows older than --retention go."""
    while not stop.is_set():
        try:
            purged = await asyncio.to_thread(purge_events, settings.dsn, settings.retention, stop=stop.is_set)
            if purged.deleted:
                log.info("purged %d events older than %.0f s from outbox.events in %d batches", purged.deleted,
                         settings.retention, purged.batches)
        except OutboxError as exc:  # not fatal: streaming does not depend on it
            log.warning("could not purge outbox.events: %s", exc.message)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), policy.PURGE_EVERY)


class Watch:
    """Heartbeats into the WAL, samples of the slot (retained WAL, wal_status, safe_wal_size) and
    checks of Kafka, on a connection of its own; closes it and the parker's when halted."""

    def __init__(self, settings: RelaySettings, state: RelayState, parker: Parker, slot: str) -> None:
        self.settings = settings
        self.state = state
        self.slot = slot
        self._parker = parker
        self._last_heartbeat_sent = 0.0
        self._heartbeat_failing = False
        self._monitor_failing = False
        self._wal_status: str | None = None

    async def run(self, halt: asyncio.Event) -> None:
        monitor = SlotMonitor(self.settings.dsn, self.slot)
        interval = self.settings.heartbeat_interval
        tick = policy.monitor_tick(interval)
        last_sample = 0.0
        while not halt.is_set():
            now = time.monotonic()
            if policy.heartbeat_due(now, self._last_heartbeat_sent, interval):
                await self._send_heartbeat(monitor)
            if policy.sample_due(now, last_sample):
                await self._sample_slot(monitor)
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

    async def _sample_slot(self, monitor: SlotMonitor) -> None:
        try:
            sample = await asyncio.to_thread(monitor.sample)
        except OutboxError as exc:  # not fatal: streaming does not depend on it
            if not self._monitor_failing:
                log.warning("%s; slot metrics are stale until it succeeds", exc.message)
            self._monitor_failing = True
            return
        if self._monitor_failing:
            log.info("slot %s sampled again", self.slot)
        self._monitor_failing = False
        self.state.server_wal_end = sample.wal_end
        if sample.wal_status != self._wal_status:
            warning = policy.wal_status_warning(self.slot, self._wal_status, sample.wal_status)
            if warning is not None:
                log.warning("%s", warning)
            self._wal_status = sample.wal_status
        self.state.metrics.slot(self.slot, sample.wal_status, sample.retained_bytes, sample.safe_wal_size)
        self.state.metrics.foreign_slots.set(sample.foreign_slots)

    async def _probe_kafka(self) -> None:
        """1 when the producer has (or can open) a connection to some broker."""
        publisher = self.state.publisher
        if publisher is not None:
            self.state.kafka_reachable(await publisher.reachable(policy.KAFKA_PROBE_TIMEOUT))
