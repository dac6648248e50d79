"""outbox.metrics and the consumer loop's bookkeeping, without servers (the default registry)."""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

import pytest
from aiokafka import TopicPartition
from prometheus_client import REGISTRY

from outbox import metrics
from outbox.consumers.kafka import _count_applied
from outbox.contract import H_TIME, format_time

ALLOWED_LABELS = {"source_id", "slot", "database", "version", "topic", "group", "sink", "partition", "wal_status",
                  "outcome", "reason"}  # the last two: small fixed sets (CRM call outcomes, retry and skip reasons)


def sample(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


def test_metric_names_carry_units_and_labels_are_bounded() -> None:
    ours = [m for m in REGISTRY.collect() if m.name.startswith("outbox_")]
    assert len(ours) >= 25
    for family in ours:
        for s in family.samples:
            assert set(s.labels) - {"le"} <= ALLOWED_LABELS, f"{s.name} has unbounded labels {set(s.labels)}"
        if family.type == "counter":
            assert all(s.name.endswith("_total") for s in family.samples), family.name
        if family.type == "histogram":
            assert family.name.endswith(("_seconds", "_events")), family.name
        assert not family.name.endswith("_created")


def test_slot_gauges_follow_pg_replication_slots() -> None:
    m = metrics.RelayMetrics(f"s{uuid.uuid4().hex[:6]}")
    m.slot("outbox_x", "reserved", 1000, None)  # no max_slot_wal_keep_size
    assert sample("outbox_relay_slot_safe_wal_size_bytes", source_id=m.source_id, slot="outbox_x") == float("inf")
    assert sample("outbox_relay_slot_retained_wal_bytes", source_id=m.source_id, slot="outbox_x") == 1000
    m.slot("outbox_x", "unreserved", 9000, -10)
    assert sample("outbox_relay_slot_safe_wal_size_bytes", source_id=m.source_id, slot="outbox_x") == -10
    m.slot("outbox_x", "lost", None, None)
    assert sample("outbox_relay_slot_safe_wal_size_bytes", source_id=m.source_id, slot="outbox_x") == 0
    states = {s: sample("outbox_relay_slot_wal_status", source_id=m.source_id, slot="outbox_x", wal_status=s)
              for s in metrics.WAL_STATUSES}
    assert states == {"reserved": 0, "extended": 0, "unreserved": 0, "lost": 1}


def test_published_counts_are_added_per_topic() -> None:
    m = metrics.RelayMetrics(f"s{uuid.uuid4().hex[:6]}")
    m.published({"outbox.customer": 3, "outbox.order": 2})
    m.published({"outbox.customer": 1})
    assert sample("outbox_relay_events_published_total", source_id=m.source_id, topic="outbox.customer") == 4
    assert sample("outbox_relay_events_published_total", source_id=m.source_id, topic="outbox.order") == 2


def test_pg_time_to_unix() -> None:
    assert metrics.pg_time_to_unix(0) == datetime(2000, 1, 1, tzinfo=timezone.utc).timestamp()
    assert metrics.pg_time_to_unix(1_500_000) == metrics.PG_EPOCH_UNIX + 1.5


def test_partition_lag_seconds_is_zero_when_caught_up() -> None:
    state = metrics.PartitionState(lag=0, last_time=time.time() - 100)
    assert state.lag_seconds() == 0
    state.lag = 5
    assert 99 < state.lag_seconds() < 110
    assert metrics.PartitionState(lag=5).lag_seconds() == 0  # nothing applied yet: unknown, shown as 0


@dataclass
class Rec:
    topic: str
    partition: int
    offset: int
    headers: list[tuple[str, bytes]] = field(default_factory=list)


def test_a_batch_counts_records_and_observes_latency_once_per_transaction() -> None:
    group = f"g{uuid.uuid4().hex[:6]}"
    m = metrics.ConsumerMetrics(group, "readstore")
    t1 = datetime.now(timezone.utc) - timedelta(seconds=30)
    t2 = t1 + timedelta(seconds=10)
    h1, h2 = [(H_TIME, format_time(t1).encode())], [(H_TIME, format_time(t2).encode())]
    tp0, tp1 = TopicPartition("outbox.order", 0), TopicPartition("outbox.order", 1)
    batches = {tp0: [Rec("outbox.order", 0, 10, h1), Rec("outbox.order", 0, 11, h1), Rec("outbox.order", 0, 12, h2)],
               tp1: [Rec("outbox.order", 1, 3, [("ce_time", b"garbage")]), Rec("outbox.order", 1, 4, h1)]}
    _count_applied(m, batches, {"changed": 1, "skipped": 1, "rejected": 1, "refused": 1}, parked=2)
    labels = {"group": group, "sink": "readstore"}
    assert sample("outbox_consumer_events_applied_total", topic="outbox.order", **labels) == 5
    assert sample("outbox_consumer_duplicates_skipped_total", **labels) == 1
    assert sample("outbox_consumer_events_rejected_total", **labels) == 2  # what the sink parked in the dead-letter topic
    # two transactions (t1 on both partitions, t2), each observed once; the garbage time is skipped
    assert sample("outbox_consumer_end_to_end_seconds_count", **labels) == 2
    total = sample("outbox_consumer_end_to_end_seconds_sum", **labels)
    assert total is not None and 49 < total < 60  # ~30 s + ~20 s
    assert m.partitions[("outbox.order", 0)].last_time == pytest.approx(t2.timestamp())
    assert m.partitions[("outbox.order", 1)].last_time == pytest.approx(t1.timestamp())


def test_revoked_partitions_drop_their_series() -> None:
    group = f"g{uuid.uuid4().hex[:6]}"
    m = metrics.ConsumerMetrics(group, "readstore")
    m.position("outbox.order", 0, 100, 105)
    m.position("outbox.order", 1, 7, None)  # high watermark not known yet: no lag series
    labels = {"group": group, "sink": "readstore", "topic": "outbox.order"}
    assert sample("outbox_consumer_lag_messages", partition="0", **labels) == 5
    assert sample("outbox_consumer_lag_messages", partition="1", **labels) is None
    assert sample("outbox_consumer_offset", partition="1", **labels) == 7
    assert sample("outbox_consumer_events_applied_total", **labels) == 0  # exists from assignment on
    m.retain([("outbox.order", 1)])
    assert sample("outbox_consumer_assigned_partitions", group=group, sink="readstore") == 1
    assert sample("outbox_consumer_lag_messages", partition="0", **labels) is None
    assert sample("outbox_consumer_lag_seconds", partition="0", **labels) is None
    assert sample("outbox_consumer_offset", partition="1", **labels) == 7
    m.close()
    assert sample("outbox_consumer_offset", partition="1", **labels) is None


def test_the_served_registry_has_the_process_start_time_the_restart_alert_watches() -> None:
    # OutboxRelayRestarting (dashboards/alerts.yml) counts changes of process_start_time_seconds
    start = sample("process_start_time_seconds")
    assert start is not None and 0 < start <= time.time()
