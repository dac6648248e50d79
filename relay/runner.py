"""The relay, wired: replication stream → decode → envelope → Kafka → confirm.

One relay per store database. It confirms an LSN to PostgreSQL only after Kafka acknowledged
every event up to it; killed and restarted, it resumes from its slot (at-least-once: events
after the last confirmed commit may be published again, with the same ``ce_id``).

The parts: ``relay.policy`` (the decisions, pure), ``relay.session`` (one stream and one
producer), ``relay.supervisor`` (reconnects, signals), ``relay.background`` (purge, heartbeat,
slot sample, Kafka probe), ``relay.state`` (what outlives a session, and the gauges). This
module only assembles them.
"""
from __future__ import annotations

import asyncio

from outbox import metrics
from outbox.backoff import Backoff
from outbox.config import RelaySettings
from outbox.relay import policy
from outbox.relay.background import Watch, purge_periodically
from outbox.relay.policy import KafkaOutage, PublishFailed
from outbox.relay.positions import PositionTracker
from outbox.relay.replication import Parker, SlotInfo, preflight
from outbox.relay.session import Session
from outbox.relay.state import RelayState, RelayStats
from outbox.relay.supervisor import stop_on_signals, supervise
from outbox.relay.transactional import ExactlyOnce, exactly_once

__all__ = ["KafkaOutage", "PublishFailed", "Relay", "RelayStats", "run_relay"]


class Relay:
    def __init__(self, settings: RelaySettings) -> None:
        self.settings = settings
        self._parker = Parker(settings.dsn)
        self.metrics = metrics.RelayMetrics(settings.source_id)
        # exactly-once: Kafka transactions with the source position (relay/transactional.py)
        self._eos: ExactlyOnce | None = exactly_once(settings, self.metrics) if settings.exactly_once else None
        self.state = RelayState(settings, self.metrics)

    @property
    def stats(self) -> RelayStats:
        return self.state.stats

    @property
    def tracker(self) -> PositionTracker:
        """The current (or last) session's positions."""
        return self.state.tracker

    async def run(self, stop: asyncio.Event) -> RelayStats:
        s = self.settings
        slot = await asyncio.to_thread(preflight, s.dsn, s.slot)  # at start, every problem stops the relay
        self.metrics.started(slot.name, slot.database)
        purger = asyncio.create_task(purge_periodically(s, stop)) if s.retention > 0 else None
        halt = asyncio.Event()
        monitor = asyncio.create_task(Watch(s, self.state, self._parker, slot.name).run(halt))
        try:
            await supervise(s, self.state, slot, stop, self._session)
        finally:
            if purger is not None:
                purger.cancel()
            halt.set()  # let the monitor finish its sample and close its connection
            await asyncio.wait([monitor], timeout=policy.KAFKA_PROBE_TIMEOUT + 5)
            monitor.cancel()
            self.state.count_acked()
        return self.state.stats

    async def _session(self, slot: SlotInfo, stop: asyncio.Event, retry: Backoff) -> None:
        await Session(self.settings, self.state, slot, parker=self._parker, eos=self._eos).run(stop, retry)


async def run_relay(settings: RelaySettings, stop: asyncio.Event | None = None) -> RelayStats:
    """Run until ``stop`` is set (or SIGTERM/SIGINT when ``stop`` is None)."""
    if stop is not None:
        return await Relay(settings).run(stop)
    stop = asyncio.Event()
    with stop_on_signals(stop, asyncio.get_running_loop()):
        return await Relay(settings).run(stop)
