"""What outlives one replication session: counts, learned topic limits, Kafka's health, and the
gauges read at scrape time (they run in the metrics HTTP thread and only read)."""
from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field

from outbox import metrics
from outbox.config import RelaySettings
from outbox.relay import policy
from outbox.relay.events import RowReader
from outbox.relay.positions import PositionTracker
from outbox.relay.publisher import Publisher

log = logging.getLogger("outbox.relay.runner")  # the relay's log lines keep their logger name


@dataclass
class RelayStats:
    events: int = 0
    transactions: int = 0
    parked: int = 0
    started: float = field(default_factory=time.monotonic)


class RelayState:
    """Shared by the sessions, the supervisor and the background tasks of one relay."""

    def __init__(self, settings: RelaySettings, relay_metrics: metrics.RelayMetrics) -> None:
        self.settings = settings
        self.metrics = relay_metrics
        self.stats = RelayStats()
        self.tracker = PositionTracker()  # the current session's
        self.publisher: Publisher | None = None  # the current session's, once started (for the Kafka probe)
        self.streamed = False  # a session reached the stream at least once
        self.readers: dict[int, RowReader] = {}  # relation id -> reader of its rows
        self.size_limits: dict[str, int] = {}  # topic -> max.message.bytes, learned when the broker refused a size
        self.oversized_topics: set[str] = set()  # refused by the broker for size: learn their limit, then replay
        self.acked: defaultdict[str, int] = defaultdict(int)  # events acknowledged per topic, not yet counted
        self.caught_up_to = 0  # commit time (µs since 2000) up to which everything is acknowledged, as far as known
        self.server_wal_end = 0  # pg_current_wal_lsn() at the last slot sample
        self.heartbeat_seen = time.time()  # Unix time: the relay's start, then each heartbeat's commit
        self.last_status = 0.0  # monotonic time of the last standby status update
        self.last_progress = (time.monotonic(), 0)  # (monotonic time, events) at the last progress line
        self._kafka_up: bool | None = None
        relay_metrics.heartbeat_age.set_function(self.heartbeat_age)
        relay_metrics.seconds_behind.set_function(self.seconds_behind)
        relay_metrics.lag_bytes.set_function(self.lag_bytes)

    def count_acked(self) -> None:
        """Counters are added per read loop, not per event."""
        if self.acked:
            self.metrics.published(self.acked)
            self.acked.clear()

    def kafka_reachable(self, reachable: bool) -> None:
        """The gauge, and one log line when it changes."""
        self.metrics.kafka_connected.set(1 if reachable else 0)
        change = policy.reachability_change(self._kafka_up, reachable)
        if change is policy.Change.DOWN:
            log.warning("Kafka %s is unreachable: reading from PostgreSQL pauses when %d events or %d bytes are in "
                        "flight, nothing unacknowledged is confirmed", self.settings.kafka.bootstrap,
                        self.settings.max_in_flight, self.settings.max_in_flight_bytes)
        elif change is policy.Change.UP:
            log.info("Kafka %s is reachable again", self.settings.kafka.bootstrap)
        self._kafka_up = reachable

    # scrape-time gauges
    def seconds_behind(self) -> float:
        return policy.seconds_behind(self.tracker.open_transactions, self.caught_up_to, time.time())

    def heartbeat_age(self) -> float:
        return policy.heartbeat_age(self.settings.heartbeat_interval, self.heartbeat_seen, time.time())

    def lag_bytes(self) -> float:
        tracker = self.tracker
        return policy.lag_bytes(self.server_wal_end, tracker.received, tracker.confirmed)
