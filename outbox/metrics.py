"""Every Prometheus metric of outbox-relay is declared here, or by a sink in its own module through
:func:`sink_metric`, which holds it to the same rules.

Names follow Prometheus conventions: base units (``_seconds``, ``_bytes``), ``_total`` for
counters. Labels are bounded: ``source_id`` (one per store database), ``slot``, ``topic``
(one per aggregate type), ``group``, ``sink``, ``partition``; never an aggregate or event id.

The hot paths never look a label up per event: :class:`RelayMetrics` and
:class:`ConsumerMetrics` bind the labelled children once, and callers add to counters once
per batch. Gauges that depend on "now" (seconds behind, lag in seconds) are computed when
Prometheus scrapes, so they are never stale.

:func:`serve` exposes the default registry on ``/metrics`` (a daemon HTTP thread) and stops
it cleanly. The metric list with meanings is in docs/operations.md ("Metrics").
"""
from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any, TypeVar

from prometheus_client import Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.exposition import start_http_server

from outbox.contract import pg_time_to_unix as pg_time_to_unix  # re-exported for the metrics that read commit times
from outbox.errors import ConfigError

log = logging.getLogger(__name__)

try:
    VERSION = version("outbox-relay")
except PackageNotFoundError:  # pragma: no cover - running from a tree that was never installed
    VERSION = "unknown"

#: Latency buckets in seconds, from "milliseconds" (the goal) to "minutes" (an incident).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0)
APPLY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
WAL_STATUSES = ("reserved", "extended", "unreserved", "lost")
# pgoutput timestamps count microseconds from 2000-01-01 UTC
PG_EPOCH_UNIX = 946_684_800

# No `<name>_created` series next to every counter and histogram: a third fewer series per
# store, and nothing here reads them (rate() and increase() handle restarts).
disable_created_metrics()  # type: ignore[no-untyped-call]

#: Label names a metric may carry: each has a bounded set of values (never an aggregate or event id).
BOUNDED_LABELS = frozenset({"source_id", "slot", "database", "version", "wal_status", "topic", "group", "sink",
                            "partition", "outcome", "reason"})
_UNITS = ("_seconds", "_bytes", "_events", "_messages", "_records")

M = TypeVar("M", Counter, Gauge, Histogram)


def sink_metric(kind: type[M], name: str, documentation: str, labels: Sequence[str], **kwargs: Any) -> M:
    """Declare a sink's own metric (in the sink's module, at import): ``outbox_<sink>_...``, counters
    ending in ``_total``, histograms in a unit, bounded labels only."""
    if not name.startswith("outbox_"):
        raise ValueError(f"metric {name}: names start with outbox_")
    if kind is Counter and not name.endswith("_total"):
        raise ValueError(f"counter {name}: names end with _total")
    if kind is Histogram and not name.endswith(_UNITS):
        raise ValueError(f"histogram {name}: names end with a unit ({', '.join(_UNITS)})")
    unbounded = set(labels) - BOUNDED_LABELS
    if unbounded:
        raise ValueError(f"metric {name}: labels {sorted(unbounded)} are not bounded (allowed: {sorted(BOUNDED_LABELS)})")
    return kind(name, documentation, list(labels), **kwargs)


# --------------------------------------------------------------------------- relay
RELAY_INFO = Gauge("outbox_relay_info", "Always 1; the labels describe the relay.",
                   ["source_id", "slot", "database", "version"])
RELAY_UP = Gauge("outbox_relay_up", "1 while the relay streams its slot to Kafka, 0 while it starts or stops.",
                 ["source_id"])
RELAY_EVENTS_PUBLISHED = Counter("outbox_relay_events_published_total",
                                 "Events Kafka acknowledged (acks=all).", ["source_id", "topic"])
RELAY_PUBLISH_ERRORS = Counter("outbox_relay_publish_errors_total",
                               "Events Kafka did not take after the producer's own retries (timed out while Kafka was "
                               "away: the relay replays from its slot; refused: it stops).",
                               ["source_id"])
RELAY_EVENTS_PARKED = Counter("outbox_relay_events_parked_total",
                              "Events larger than Kafka takes (producer message.max.bytes or the topic's "
                              "max.message.bytes), or whose aggregate type names no topic (topic <prefix>.__unroutable): "
                              "written to the store's outbox.parked, a marker sent to <topic>.dlq.",
                              ["source_id", "topic"])
RELAY_CAPTURE_PARKED = Counter("outbox_relay_capture_parked_total",
                               "Changes the capture trigger could not key (the table has no primary key) and parked in "
                               "the store's outbox.parked instead of failing the application's statement, as the relay "
                               "read their markers.", ["source_id", "aggregate_type"])
RELAY_READ_BATCH = Histogram("outbox_relay_read_batch_events",
                             "Events decoded per read of the replication stream (reads that returned messages).",
                             ["source_id"], buckets=BATCH_BUCKETS)
RELAY_COMMIT_TO_ACK = Histogram("outbox_relay_commit_to_ack_seconds",
                                "Per source transaction with events: from its commit in the store database to "
                                "Kafka's acknowledgement of its last event.", ["source_id"], buckets=LATENCY_BUCKETS)
RELAY_LAG_BYTES = Gauge("outbox_relay_replication_lag_bytes",
                        "Server WAL end (newest of pg_current_wal_lsn(), polled, and the stream) minus the position "
                        "the relay has confirmed.", ["source_id"])
RELAY_BEHIND_SOURCE_SECONDS = Gauge("outbox_relay_behind_source_seconds",
                                    "Now minus the commit time of the newest transaction Kafka fully acknowledged; 0 "
                                    "when no transaction is in flight (caught up or idle).", ["source_id"])
RELAY_SLOT_RETAINED = Gauge("outbox_relay_slot_retained_wal_bytes",
                            "WAL the slot keeps on the store's disk: pg_current_wal_lsn() - restart_lsn.",
                            ["source_id", "slot"])
RELAY_SLOT_SAFE = Gauge("outbox_relay_slot_safe_wal_size_bytes",
                        "pg_replication_slots.safe_wal_size: WAL that may still be written before the slot is "
                        "lost; +Inf without max_slot_wal_keep_size, 0 once lost.", ["source_id", "slot"])
RELAY_SLOT_WAL_STATUS = Gauge("outbox_relay_slot_wal_status",
                              "1 for the slot's current pg_replication_slots.wal_status, 0 for the others.",
                              ["source_id", "slot", "wal_status"])
RELAY_SLOT_POLL_TIME = Gauge("outbox_relay_slot_last_poll_timestamp_seconds",
                             "Unix time of the last successful poll of pg_replication_slots.", ["source_id"])
RELAY_FOREIGN_SLOTS = Gauge("outbox_relay_foreign_logical_slots",
                            "Logical replication slots of the store's cluster that outbox did not create (neither "
                            "this relay's nor another outbox_* pgoutput slot): each decodes every table of its "
                            "database for a REPLICATION role, and pins WAL; outbox doctor names them.", ["source_id"])
RELAY_HEARTBEAT_AGE = Gauge("outbox_relay_heartbeat_age_seconds",
                            "Now minus the commit time of the last heartbeat that came back through the "
                            "replication stream (since relay start while none has); NaN with heartbeats off.",
                            ["source_id"])
RELAY_REPLICATION_CONNECTED = Gauge("outbox_relay_replication_connected",
                                    "1 while the replication connection to the store database is open.", ["source_id"])
RELAY_KAFKA_CONNECTED = Gauge("outbox_relay_kafka_connected",
                              "1 when the relay's producer reached a Kafka broker at the last check (every 10 s).",
                              ["source_id"])
RELAY_KAFKA_COMMITTED = Counter("outbox_relay_kafka_transactions_committed_total",
                                "Kafka transactions an exactly-once relay committed (events and source position).",
                                ["source_id"])
RELAY_KAFKA_ABORTED = Counter("outbox_relay_kafka_transactions_aborted_total",
                              "Kafka transactions an exactly-once relay aborted (then it starts again from the last "
                              "committed position).", ["source_id"])
RELAY_KAFKA_COMMIT = Histogram("outbox_relay_kafka_commit_seconds",
                               "Time one Kafka transaction of an exactly-once relay took to commit (the relay reads on "
                               "meanwhile; what it sends waits for the next transaction).", ["source_id"], buckets=APPLY_BUCKETS)
RELAY_SKIPPED = Counter("outbox_relay_transactions_skipped_total",
                        "Source transactions an exactly-once relay did not publish again because its offsets topic "
                        "says a committed Kafka transaction already holds them (replayed by the slot after a restart).",
                        ["source_id"])

# --------------------------------------------------------------------------- consumers
CONSUMER_INFO = Gauge("outbox_consumer_info", "Always 1; the labels describe the consumer.",
                      ["group", "sink", "version"])
CONSUMER_ASSIGNED = Gauge("outbox_consumer_assigned_partitions", "Partitions assigned to this consumer.",
                          ["group", "sink"])
CONSUMER_LAG = Gauge("outbox_consumer_lag_messages", "Kafka high watermark minus the consumer's position.",
                     ["group", "sink", "topic", "partition"])
CONSUMER_LAG_SECONDS = Gauge("outbox_consumer_lag_seconds",
                             "Now minus ce_time of the last record applied from the partition; 0 when caught up "
                             "(or before the first record).", ["group", "sink", "topic", "partition"])
CONSUMER_OFFSET = Gauge("outbox_consumer_offset",
                        "The consumer's position: the next offset it will apply.", ["group", "sink", "topic", "partition"])
CONSUMER_APPLIED = Counter("outbox_consumer_events_applied_total",
                           "Records the sink applied (committed with their offsets), including duplicates it skipped.",
                           ["group", "sink", "topic"])
CONSUMER_DUPLICATES = Counter("outbox_consumer_duplicates_skipped_total",
                              "Records that changed nothing in the sink: already applied, or older than what it holds.",
                              ["group", "sink"])
CONSUMER_REJECTED = Counter("outbox_consumer_events_rejected_total",
                            "Records parked in the dead-letter topic <topic>.dlq instead of applied (poison events, refused by the sink).",
                            ["group", "sink"])
CONSUMER_REDRIVEN = Counter("outbox_consumer_dead_letters_redriven_total",
                            "Dead letters the consumer's periodic re-drive (--redrive-every) sent back to their topic.",
                            ["group", "sink"])
CONSUMER_EXHAUSTED = Counter("outbox_consumer_dead_letters_exhausted_total",
                             "Dead letters past --redrive-max-attempts, found by the periodic re-drive: they stay parked.",
                             ["group", "sink"])
CONSUMER_LOST = Counter("outbox_consumer_records_lost_total",
                        "Records the sink never got: its stored offset was below the partition's log start (deleted "
                        "by retention before it read them), so it resumed at the log start.", ["group", "sink", "topic"])
CONSUMER_RETRIES = Counter("outbox_consumer_retries_total",
                           "Batches the sink could not apply for a retriable reason, fetched again after a backoff.",
                           ["group", "sink"])
CONSUMER_APPLY = Histogram("outbox_consumer_apply_seconds", "Time the sink took to apply one batch.",
                           ["group", "sink"], buckets=APPLY_BUCKETS)
CONSUMER_END_TO_END = Histogram("outbox_consumer_end_to_end_seconds",
                                "From the source commit (ce_time) to applied in the sink; observed once per source "
                                "transaction per partition and batch.", ["group", "sink"], buckets=LATENCY_BUCKETS)

# --------------------------------------------------------------------------- bound children
class RelayMetrics:
    """The relay's metrics with ``source_id`` bound once."""

    def __init__(self, source_id: str) -> None:
        self.source_id = source_id
        self.up = RELAY_UP.labels(source_id)
        self.publish_errors = RELAY_PUBLISH_ERRORS.labels(source_id)
        self.read_batch = RELAY_READ_BATCH.labels(source_id)
        self.commit_to_ack = RELAY_COMMIT_TO_ACK.labels(source_id)
        self.lag_bytes = RELAY_LAG_BYTES.labels(source_id)
        self.seconds_behind = RELAY_BEHIND_SOURCE_SECONDS.labels(source_id)
        self.replication_connected = RELAY_REPLICATION_CONNECTED.labels(source_id)
        self.kafka_connected = RELAY_KAFKA_CONNECTED.labels(source_id)
        self.slot_poll_time = RELAY_SLOT_POLL_TIME.labels(source_id)
        self.foreign_slots = RELAY_FOREIGN_SLOTS.labels(source_id)
        self.heartbeat_age = RELAY_HEARTBEAT_AGE.labels(source_id)
        self.kafka_committed = RELAY_KAFKA_COMMITTED.labels(source_id)
        self.kafka_aborted = RELAY_KAFKA_ABORTED.labels(source_id)
        self.kafka_commit = RELAY_KAFKA_COMMIT.labels(source_id)
        self.skipped = RELAY_SKIPPED.labels(source_id)
        self._published: dict[str, Counter] = {}

    def started(self, slot: str, database: str) -> None:
        RELAY_INFO.labels(self.source_id, slot, database, VERSION).set(1)

    def published(self, counts: dict[str, int]) -> None:
        """Add acknowledged events per topic (called once per read loop, not per event)."""
        for topic, n in counts.items():
            child = self._published.get(topic)
            if child is None:
                child = self._published[topic] = RELAY_EVENTS_PUBLISHED.labels(self.source_id, topic)
            child.inc(n)

    def parked(self, topic: str) -> None:
        RELAY_EVENTS_PARKED.labels(self.source_id, topic).inc()

    def capture_parked(self, aggregate_type: str) -> None:
        RELAY_CAPTURE_PARKED.labels(self.source_id, aggregate_type).inc()

    def slot(self, slot: str, wal_status: str | None, retained: int | None, safe_wal_size: int | None) -> None:
        RELAY_SLOT_RETAINED.labels(self.source_id, slot).set(retained if retained is not None else 0)
        if wal_status == "lost":
            safe = 0.0
        else:
            safe = float("inf") if safe_wal_size is None else float(safe_wal_size)
        RELAY_SLOT_SAFE.labels(self.source_id, slot).set(safe)
        for status in WAL_STATUSES:
            RELAY_SLOT_WAL_STATUS.labels(self.source_id, slot, status).set(1 if status == wal_status else 0)
        self.slot_poll_time.set(time.time())


@dataclass(slots=True)
class PartitionState:
    """What the consumer loop knows about one assigned partition; read at scrape time."""

    lag: int = 0
    last_time: float | None = None  # ce_time (Unix seconds) of the last applied record

    def lag_seconds(self) -> float:
        if self.lag <= 0 or self.last_time is None:
            return 0.0
        return max(0.0, time.time() - self.last_time)


class ConsumerMetrics:
    """A consumer's metrics with ``group`` and ``sink`` bound once; per-partition children on assignment."""

    def __init__(self, group: str, sink: str) -> None:
        self.group = group
        self.sink = sink
        CONSUMER_INFO.labels(group, sink, VERSION).set(1)
        self.assigned = CONSUMER_ASSIGNED.labels(group, sink)
        self.duplicates = CONSUMER_DUPLICATES.labels(group, sink)
        self.rejected = CONSUMER_REJECTED.labels(group, sink)
        self.retries = CONSUMER_RETRIES.labels(group, sink)
        self.redriven = CONSUMER_REDRIVEN.labels(group, sink)
        self.exhausted = CONSUMER_EXHAUSTED.labels(group, sink)
        self.apply_seconds = CONSUMER_APPLY.labels(group, sink)
        self.end_to_end = CONSUMER_END_TO_END.labels(group, sink)
        self.partitions: dict[tuple[str, int], PartitionState] = {}
        self._applied: dict[str, Counter] = {}

    def applied(self, topic: str) -> Counter:
        child = self._applied.get(topic)
        if child is None:
            child = self._applied[topic] = CONSUMER_APPLIED.labels(self.group, self.sink, topic)
        return child

    def lost(self, topic: str) -> Counter:
        """Records of ``topic`` deleted (retention) before the sink read them."""
        return CONSUMER_LOST.labels(self.group, self.sink, topic)

    def partition(self, topic: str, partition: int) -> PartitionState:
        state = self.partitions.get((topic, partition))
        if state is None:
            state = self.partitions[(topic, partition)] = PartitionState()
            CONSUMER_LAG_SECONDS.labels(self.group, self.sink, topic, str(partition)).set_function(state.lag_seconds)
            self.applied(topic)  # the series exists (at 0) from assignment on: alerts can compare it
        return state

    def position(self, topic: str, partition: int, offset: int, highwater: int | None) -> None:
        state = self.partition(topic, partition)
        labels = (self.group, self.sink, topic, str(partition))
        CONSUMER_OFFSET.labels(*labels).set(offset)
        if highwater is not None:
            state.lag = max(0, highwater - offset)
            CONSUMER_LAG.labels(*labels).set(state.lag)

    def retain(self, assigned: Iterable[tuple[str, int]]) -> None:
        """Forget partitions no longer assigned, so their lag does not linger (another consumer owns it)."""
        keep = set(assigned)
        self.assigned.set(len(keep))
        for topic, partition in [tp for tp in self.partitions if tp not in keep]:
            del self.partitions[(topic, partition)]
            for gauge in (CONSUMER_LAG, CONSUMER_LAG_SECONDS, CONSUMER_OFFSET):
                with contextlib.suppress(KeyError):
                    gauge.remove(self.group, self.sink, topic, str(partition))

    def close(self) -> None:
        self.retain(())


# --------------------------------------------------------------------------- /metrics
class MetricsServer:
    """The /metrics endpoint: a daemon HTTP thread, stopped by :meth:`close`."""

    def __init__(self, host: str, port: int) -> None:
        try:
            self._httpd, self._thread = start_http_server(port, addr=host)
        except OSError as exc:
            raise ConfigError(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc} "
                              "(choose another --metrics-port or --metrics-host)") from None
        self.host = host
        self.port = int(self._httpd.server_address[1])
        log.info("serving Prometheus metrics on http://%s:%d/metrics", _url_host(host), self.port)

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


@contextlib.contextmanager
def serve(host: str, port: int | None) -> Iterator[MetricsServer | None]:
    """Serve /metrics on ``host:port`` inside the block; ``port`` None: nothing (metrics off)."""
    if port is None:
        yield None
        return
    server = MetricsServer(host, port)
    try:
        yield server
    finally:
        server.close()
