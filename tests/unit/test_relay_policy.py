"""relay.policy on values: status cadence, failure classes, reconnects, delivery reports, gauges. No I/O."""
from __future__ import annotations

import math

import pytest
from confluent_kafka import KafkaError

from outbox import contract
from outbox.errors import ConfigError, DatabaseRefused, DatabaseUnavailable, KafkaUnavailable, NotInstalled, OutboxError, PreconditionFailed
from outbox.metrics import PG_EPOCH_UNIX
from outbox.relay import policy
from outbox.relay.policy import (
    SLOT_BUSY_GRACE,
    STATUS_EVERY,
    Change,
    Delivery,
    KafkaOutage,
    Next,
    PublishFailed,
    after_preflight,
    after_session,
    classify_delivery,
    delivery_error,
)
from outbox.relay.positions import PositionTracker
from outbox.relay.publisher import DeliveryFailed, delivery_failed
from outbox.relay.replication import SlotInUse

# --------------------------------------------------------------------------- status cadence

def test_status_while_the_position_moves_every_status_every() -> None:
    # confirmed (200) differs from what was reported (100): every STATUS_EVERY
    assert not policy.status_due(now=10.0 + STATUS_EVERY - 0.001, last_sent=10.0, confirmed=200, reported=100,
                                 status_interval=10.0)
    assert policy.status_due(now=10.0 + STATUS_EVERY, last_sent=10.0, confirmed=200, reported=100, status_interval=10.0)


def test_status_while_nothing_moves_every_status_interval() -> None:
    assert not policy.status_due(now=15.0, last_sent=10.0, confirmed=100, reported=100, status_interval=10.0)
    assert not policy.status_due(now=19.999, last_sent=10.0, confirmed=100, reported=100, status_interval=10.0)
    assert policy.status_due(now=20.0, last_sent=10.0, confirmed=100, reported=100, status_interval=10.0)


def test_status_forced_is_sent_at_once() -> None:
    # the server asked for a reply (keepalive) or the session drains
    assert policy.status_due(now=10.0, last_sent=10.0, confirmed=100, reported=100, status_interval=10.0, force=True)


def test_first_status_of_a_session_follows_the_moving_cadence() -> None:
    # a session starts with reported = -1: its first update is due STATUS_EVERY after the last one sent
    assert policy.status_due(now=1.0, last_sent=0.0, confirmed=0, reported=-1, status_interval=10.0)
    assert not policy.status_due(now=0.5, last_sent=0.0, confirmed=0, reported=-1, status_interval=10.0)


def test_progress_line_and_rate() -> None:
    assert not policy.progress_due(now=129.9, since=100.0)
    assert policy.progress_due(now=130.0, since=100.0)
    assert policy.rate(3000, 0, now=130.0, since=100.0) == 100.0
    assert policy.rate(5, 5, now=100.0, since=100.0) == 0.0


@pytest.mark.parametrize(("interval", "left", "expected"), [
    (10.0, None, 1.0),  # capped: the loop looks around at least every second
    (0.2, None, 0.2),  # a short status interval wins
    (10.0, 0.05, 0.05),  # exactly-once: the open Kafka transaction is due sooner
    (0.2, 0.5, 0.2),
    (10.0, 0.0, 0.0),
])
def test_read_timeout(interval: float, left: float | None, expected: float) -> None:
    assert policy.read_timeout(interval, left) == expected


def test_back_pressure_at_max_in_flight() -> None:
    assert not policy.must_pause(19_999, 20_000)
    assert policy.must_pause(20_000, 20_000)
    assert policy.must_pause(20_001, 20_000)


def test_back_pressure_at_max_in_flight_bytes_whichever_bound_comes_first() -> None:
    mb16 = 16 * 2**20
    assert not policy.must_pause(1_999, 20_000, mb16 - 1, mb16)
    assert policy.must_pause(2_000, 20_000, mb16, mb16)  # 8 kB events: the bytes bound, far below 20,000 events
    assert policy.must_pause(2_001, 20_000, mb16 + 8_000, mb16)
    assert policy.must_pause(20_000, 20_000, 100, mb16)  # small events: the count bound
    assert not policy.must_pause(10, 20_000, 2**40)  # no bound by bytes given: the count alone


def test_the_producers_queue_has_room_above_both_bounds() -> None:
    assert policy.producer_queue(20_000, 16 * 2**20) == (100_000, 32 * 1024)  # librdkafka's defaults at least
    messages, kbytes = policy.producer_queue(80_000, 64 * 2**20)
    assert messages == 160_000 and kbytes * 1024 == 2 * 64 * 2**20
    assert policy.producer_queue(1, 2**31 + 1)[1] * 1024 >= 2 * (2**31 + 1)  # rounded up, never below twice


# --------------------------------------------------------------------------- session set-up

def test_batch_bytes_stays_under_the_smallest_known_topic_limit() -> None:
    assert policy.batch_bytes({}) == 1_000_000
    assert policy.batch_bytes({"a": 5_000_000}) == 1_000_000
    assert policy.batch_bytes({"a": 5_000_000, "b": 200_000, "c": 300_000}) == 200_000 - contract.RECORD_OVERHEAD


def test_resume_position_takes_the_offsets_topic_only_when_ahead() -> None:
    assert policy.resume_position(1000, None) == 1000  # nothing committed yet
    assert policy.resume_position(1000, 900) == 1000  # the slot is ahead (confirmed after the commit)
    assert policy.resume_position(1000, 1000) == 1000
    assert policy.resume_position(1000, 1500) == 1500  # crash between the Kafka commit and the confirm


# --------------------------------------------------------------------------- failures and reconnects

RETRIABLE = [DatabaseUnavailable("pg restarted"), KafkaUnavailable("kafka away"), KafkaOutage("timed out")]
PERMANENT = [DatabaseRefused("bad password"), NotInstalled("no schema"), PreconditionFailed("wal_level"),
             ConfigError("bad option"), PublishFailed("refused"), OutboxError("fenced")]


@pytest.mark.parametrize("exc", RETRIABLE, ids=lambda e: type(e).__name__)
def test_a_retriable_failure_after_streaming_reconnects(exc: OutboxError) -> None:
    assert after_session(exc, streamed=True, stopping=False) is Next.RECONNECT
    assert after_session(exc, streamed=True, stopping=True) is Next.RECONNECT  # the backoff loop sees the stop


@pytest.mark.parametrize("exc", RETRIABLE, ids=lambda e: type(e).__name__)
def test_a_retriable_failure_before_the_first_stream_is_a_setup_problem(exc: OutboxError) -> None:
    assert after_session(exc, streamed=False, stopping=False) is Next.FAIL
    assert after_session(exc, streamed=False, stopping=True) is Next.STOP  # stopping anyway: exit 0


@pytest.mark.parametrize("exc", PERMANENT, ids=lambda e: type(e).__name__)
def test_a_permanent_failure_exits(exc: OutboxError) -> None:
    for streamed in (False, True):
        for stopping in (False, True):
            assert after_session(exc, streamed=streamed, stopping=stopping) is Next.FAIL


def test_slot_in_use_is_retried_for_the_grace_period_then_exits() -> None:
    busy = SlotInUse("outbox_s1", 4242, "localhost:5432")
    first = after_preflight(busy, busy_since=None, now=1000.0)
    assert first == policy.Attempt(Next.RECONNECT, 1000.0)  # the clock starts at the first "in use"
    within = after_preflight(busy, first.busy_since, now=1000.0 + SLOT_BUSY_GRACE)
    assert within == policy.Attempt(Next.RECONNECT, 1000.0)  # exactly at the limit: still ours, maybe
    past = after_preflight(busy, within.busy_since, now=1000.0 + SLOT_BUSY_GRACE + 0.001)
    assert past == policy.Attempt(Next.FAIL, 1000.0)  # another relay streams it


def test_other_preflight_failures_keep_the_busy_clock() -> None:
    assert after_preflight(DatabaseUnavailable("down"), 1000.0, now=1050.0) == policy.Attempt(Next.RECONNECT, 1000.0)
    assert after_preflight(KafkaUnavailable("away"), None, now=1050.0) == policy.Attempt(Next.RECONNECT, None)
    # the slot was dropped or invalidated meanwhile: exit, never recreate it
    assert after_preflight(PreconditionFailed("slot gone"), 1000.0, now=1050.0) == policy.Attempt(Next.FAIL, 1000.0)
    assert after_preflight(DatabaseRefused("no access"), None, now=1050.0).next is Next.FAIL


def test_slot_in_use_is_permanent_outside_the_reconnect_loop() -> None:
    # at start-up (or as a session's own failure) "in use" is another relay: one line, exit
    busy = SlotInUse("outbox_s1", None, "localhost:5432")
    assert not busy.retriable
    assert after_session(busy, streamed=True, stopping=False) is Next.FAIL
    assert "pid ?" in busy.message


def test_kafka_down_only_for_kafka_unavailable() -> None:
    assert policy.means_kafka_down(KafkaUnavailable("away"))
    assert not policy.means_kafka_down(KafkaOutage("timed out"))  # its report already said so
    assert not policy.means_kafka_down(DatabaseUnavailable("pg"))


def test_ends_relay_after_a_drain() -> None:
    assert not policy.ends_relay(None)
    assert not policy.ends_relay(KafkaOutage("next session replays"))
    assert policy.ends_relay(PublishFailed("refused"))


# --------------------------------------------------------------------------- delivery reports

def failed(code: int, *, fatal: bool = False, retriable: bool = False) -> DeliveryFailed:
    return delivery_failed(KafkaError(code, "reason", fatal=fatal, retriable=retriable))


@pytest.mark.parametrize(("code", "kind"), [
    (KafkaError._PURGE_QUEUE, Delivery.PURGED),
    (KafkaError._PURGE_INFLIGHT, Delivery.PURGED),
    (KafkaError.MSG_SIZE_TOO_LARGE, Delivery.TOO_LARGE),
    (KafkaError._MSG_TIMED_OUT, Delivery.OUTAGE),
    (KafkaError._TRANSPORT, Delivery.OUTAGE),
    (KafkaError._ALL_BROKERS_DOWN, Delivery.OUTAGE),
    (KafkaError.NOT_ENOUGH_REPLICAS, Delivery.OUTAGE),
    (KafkaError.UNKNOWN_PRODUCER_ID, Delivery.OUTAGE),  # idempotence state spent: a new producer
    (KafkaError.TOPIC_AUTHORIZATION_FAILED, Delivery.REFUSED),
    (KafkaError.INVALID_RECORD, Delivery.REFUSED),
])
def test_classify_delivery(code: int, kind: Delivery) -> None:
    assert classify_delivery(failed(code), fatal=None) is kind


def test_a_retriable_report_is_an_outage_whatever_its_code() -> None:
    assert classify_delivery(failed(KafkaError.INVALID_RECORD, retriable=True), fatal=None) is Delivery.OUTAGE


def test_too_large_wins_over_outage() -> None:
    # a size refusal flagged retriable is still a size problem: learn the limit and park, not replay forever
    exc = failed(KafkaError.MSG_SIZE_TOO_LARGE, retriable=True)
    assert exc.outage and exc.too_large
    assert classify_delivery(exc, fatal=None) is Delivery.TOO_LARGE


def test_exactly_once_fatal_wins_but_not_over_a_purge() -> None:
    fenced = OutboxError("fenced: another relay started")
    assert classify_delivery(failed(KafkaError._MSG_TIMED_OUT), fatal=fenced) is Delivery.FATAL
    assert classify_delivery(failed(KafkaError.MSG_SIZE_TOO_LARGE), fatal=fenced) is Delivery.FATAL
    assert classify_delivery(failed(KafkaError._PURGE_QUEUE), fatal=fenced) is Delivery.PURGED


def test_delivery_errors_say_what_and_how_the_session_ends() -> None:
    exc = failed(KafkaError._MSG_TIMED_OUT)
    assert delivery_error(Delivery.PURGED, exc, "e1", 7, "shop.customer") is None
    outage = delivery_error(Delivery.OUTAGE, exc, "e1", 7, "shop.customer")
    assert isinstance(outage, KafkaOutage) and outage.retriable
    assert outage.message.startswith("Kafka did not take event e1 of transaction 7 in time (")
    large = delivery_error(Delivery.TOO_LARGE, failed(KafkaError.MSG_SIZE_TOO_LARGE), "e2", 8, "shop.order")
    assert isinstance(large, KafkaOutage) and large.retriable  # learn the limit, replay, park
    assert "as too large for shop.order" in large.message
    refused = delivery_error(Delivery.REFUSED, failed(KafkaError.TOPIC_AUTHORIZATION_FAILED), "e3", 9, "t")
    assert isinstance(refused, PublishFailed) and not refused.retriable
    assert refused.message.startswith("Kafka refused event e3 of transaction 9: ")
    fenced = OutboxError("fenced")
    assert delivery_error(Delivery.FATAL, exc, "e4", 10, "t", fenced) is fenced


def test_event_id_from_headers() -> None:
    assert policy.event_id([("content-type", b"application/json"), (contract.H_ID, b"abc-1")]) == "abc-1"
    assert policy.event_id([("content-type", b"x")]) == "?"
    assert policy.event_id(None) == "?"
    assert policy.event_id([(contract.H_ID, b"\xff")]) == "\ufffd"


# --------------------------------------------------------------------------- what may be confirmed

def test_confirm_waits_for_a_gap_then_jumps_over_out_of_order_acks() -> None:
    tracker = PositionTracker(confirmed=100, received=100)
    t1, t2, t3 = tracker.begin(1, 200, 0), tracker.begin(2, 300, 0), tracker.begin(3, 400, 0)
    for txn, end in ((t1, 210), (t2, 310), (t3, 410)):
        tracker.sent(txn)
        tracker.sent(txn)
        tracker.commit(txn, end)
    tracker.acked(t3)
    tracker.acked(t3)
    tracker.acked(t2)
    assert tracker.confirmed == 100  # t1 (the gap) is not acknowledged: nothing after it either
    tracker.acked(t1)
    assert tracker.confirmed == 100 and tracker.in_flight == 2
    tracker.acked(t1)
    assert tracker.confirmed == 210  # t2 has one event left
    tracker.acked(t2)
    assert tracker.confirmed == 410 and tracker.in_flight == 0 and not tracker.open_transactions


def test_a_failed_event_holds_everything_after_it() -> None:
    tracker = PositionTracker(confirmed=100, received=100)
    t1, t2 = tracker.begin(1, 200, 0), tracker.begin(2, 300, 0)
    tracker.sent(t1)
    tracker.sent(t2)
    tracker.commit(t1, 210)
    tracker.commit(t2, 310)
    tracker.acked(t2)
    tracker.failed(t1)
    assert tracker.confirmed == 100
    tracker.keepalive(500)  # something is open: a keepalive confirms nothing
    assert tracker.confirmed == 100 and tracker.received == 500


def test_exactly_once_hold_until_the_kafka_commit() -> None:
    tracker = PositionTracker(confirmed=100, received=100)
    t1 = tracker.begin(1, 200, 0)
    tracker.hold(t1)
    tracker.sent(t1)
    tracker.commit(t1, 210)
    tracker.acked(t1)
    assert tracker.confirmed == 100  # acknowledged, not yet in a committed Kafka transaction
    tracker.release(t1)
    assert tracker.confirmed == 210


# --------------------------------------------------------------------------- gauges and health

def test_caught_up_moves_at_begin_only_with_nothing_open() -> None:
    assert policy.caught_up_at_begin(caught_up_to=50, open_transactions=0, commit_time=80) == 80
    assert policy.caught_up_at_begin(caught_up_to=50, open_transactions=1, commit_time=80) == 50
    assert policy.caught_up_at_begin(caught_up_to=90, open_transactions=0, commit_time=80) == 90  # never back


def test_seconds_behind() -> None:
    commit = 1_000_000_000  # µs since 2000: 1000 s after the PostgreSQL epoch
    now = PG_EPOCH_UNIX + 1000 + 2.5
    assert policy.seconds_behind(open_transactions=0, caught_up_to=commit, now_unix=now) == 0.0  # nothing waits
    assert policy.seconds_behind(open_transactions=3, caught_up_to=0, now_unix=now) == 0.0  # nothing known yet
    assert policy.seconds_behind(open_transactions=3, caught_up_to=commit, now_unix=now) == pytest.approx(2.5)
    assert policy.seconds_behind(open_transactions=3, caught_up_to=commit, now_unix=now - 10) == 0.0  # clock skew


def test_heartbeat_age() -> None:
    assert math.isnan(policy.heartbeat_age(0, seen_unix=100.0, now_unix=130.0))  # heartbeats off
    assert policy.heartbeat_age(10, seen_unix=100.0, now_unix=130.0) == 30.0
    assert policy.heartbeat_age(10, seen_unix=130.0, now_unix=100.0) == 0.0


def test_lag_bytes() -> None:
    assert policy.lag_bytes(server_wal_end=1000, received=800, confirmed=600) == 400.0
    assert policy.lag_bytes(server_wal_end=0, received=800, confirmed=600) == 200.0  # not sampled yet
    assert policy.lag_bytes(server_wal_end=500, received=500, confirmed=700) == 0.0  # eos resumed ahead


def test_reachability_changes_log_once() -> None:
    assert policy.reachability_change(None, True) is None  # the first success says nothing
    assert policy.reachability_change(None, False) is Change.DOWN
    assert policy.reachability_change(True, False) is Change.DOWN
    assert policy.reachability_change(False, False) is None
    assert policy.reachability_change(False, True) is Change.UP
    assert policy.reachability_change(True, True) is None


def test_wal_status_warning() -> None:
    assert policy.wal_status_warning("s", None, "reserved") is None
    assert policy.wal_status_warning("s", "unreserved", "unreserved") is None  # once per change
    unreserved = policy.wal_status_warning("s", "reserved", "unreserved")
    assert unreserved == "slot s: wal_status is unreserved: max_slot_wal_keep_size is exceeded; see docs/operations.md, Alerts"
    lost = policy.wal_status_warning("s", "unreserved", "lost")
    assert lost is not None and "WAL the slot needs was removed (events lost: re-snapshot)" in lost
    assert policy.wal_status_warning("s", "lost", None) is None  # the slot is gone: the sample says so


def test_monitor_cadence() -> None:
    assert policy.monitor_tick(0) == 10.0
    assert policy.monitor_tick(3.0) == 3.0
    assert policy.monitor_tick(30.0) == 10.0
    assert not policy.heartbeat_due(now=100.0, last_sent=0.0, heartbeat_interval=0)  # off
    assert not policy.heartbeat_due(now=104.9, last_sent=95.0, heartbeat_interval=10.0)
    assert policy.heartbeat_due(now=105.0, last_sent=95.0, heartbeat_interval=10.0)
    assert policy.sample_due(now=10.0, last_sample=0.0) and not policy.sample_due(now=9.9, last_sample=0.0)


def test_heartbeat_rows_are_recognised_as_read_from_the_wal() -> None:
    assert policy.HEARTBEAT_TYPE == contract.HEARTBEAT_TYPE.encode() and isinstance(policy.HEARTBEAT_TYPE, bytes)


# --------------------------------------------------------------------------- exactly-once: Kafka transactions

def due(**kw: object) -> bool:
    args: dict[str, object] = {"members": 2, "committing": False, "sent": 10, "max_events": 100, "opened": 50.0,
                               "interval": 0.1, "now": 50.05}
    args.update(kw)
    return policy.kafka_commit_due(**args)  # type: ignore[arg-type]


def test_kafka_commit_due_by_time_size_or_force() -> None:
    assert not due()  # open 0.05 s of 0.1, 10 events of 100
    assert due(now=50.1)  # by time, at the boundary
    assert due(sent=100)  # by size
    assert due(force=True)  # drain


def test_kafka_commit_never_due_empty_or_while_one_commits() -> None:
    assert not due(members=0, force=True, sent=1000, now=99.0)  # no complete source transaction in it
    assert not due(committing=True, force=True, sent=1000, now=99.0)  # one at a time


def test_kafka_commit_wait() -> None:
    wait = policy.kafka_commit_wait
    assert wait(members=0, committing=False, opened=50.0, interval=0.1, now=50.0, poll=0.005) is None
    assert wait(members=0, committing=True, opened=50.0, interval=0.1, now=50.0, poll=0.005) == 0.005
    assert wait(members=1, committing=False, opened=50.0, interval=0.1, now=50.04, poll=0.005) == pytest.approx(0.06)
    assert wait(members=1, committing=False, opened=50.0, interval=0.1, now=51.0, poll=0.005) == 0.0  # overdue


def test_retry_commit() -> None:
    assert policy.retry_commit(retriable=True, requires_abort=False, attempt=0, attempts=5)
    assert policy.retry_commit(retriable=True, requires_abort=False, attempt=3, attempts=5)
    assert not policy.retry_commit(retriable=True, requires_abort=False, attempt=4, attempts=5)  # the last try
    assert not policy.retry_commit(retriable=True, requires_abort=True, attempt=0, attempts=5)
    assert not policy.retry_commit(retriable=False, requires_abort=False, attempt=0, attempts=5)
