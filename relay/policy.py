"""The relay's decisions, as pure functions over values: no I/O, no clock (``now`` is passed in).

When to send a standby status, how a failure ends a session (reconnect, or exit with one line),
what a failed delivery report means, what may be confirmed on resume, what the gauges show.
The I/O around them (``relay.session``, ``relay.supervisor``, ``relay.background``) only
reads clocks and sockets and applies these answers. None of them runs per event: they are
called per transaction, per status tick, per failure or per scrape.
"""
from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from outbox import contract
from outbox.contract import pg_time_to_unix
from outbox.errors import KafkaUnavailable, OutboxError
from outbox.relay.errors import DeliveryFailed, SlotInUse

RECONNECT_INITIAL = 0.5  # seconds before the first reconnect attempt; doubles up to RECONNECT_CAP
RECONNECT_CAP = 30.0
SLOT_BUSY_GRACE = 120.0  # after a reconnect, how long "slot in use" may be our own old walsender
STATUS_EVERY = 1.0  # seconds between status updates while the confirmed position moves
HEARTBEAT_TYPE = contract.HEARTBEAT_TYPE.encode()  # compared with rows as read from the WAL (bytes)
CAPTURE_PARKED_TYPE = contract.CAPTURE_PARKED_TYPE.encode()  # a change the capture trigger parked: counted
PURGE_EVERY = 60.0  # seconds between purges of old rows from outbox.events
PURGE_BATCH = 10_000  # rows per DELETE of the purge
PURGE_PAUSE = 0.5  # seconds between two batches: a catch-up after an outage trickles, it does not burst
PURGE_STATEMENT_TIMEOUT = 30.0  # seconds one batch may take (a batch normally takes well under one)
PURGE_LOCK_TIMEOUT = 5.0  # seconds a batch may wait for a lock (someone's LOCK TABLE outbox.events)
PROGRESS_EVERY = 30.0  # seconds between progress log lines
MONITOR_EVERY = 10.0  # seconds between samples of pg_replication_slots and checks of Kafka
KAFKA_PROBE_TIMEOUT = 5.0
MAX_BATCH_BYTES = 1_000_000  # the producer's batch.size when no topic's limit is known to be lower
QUEUE_MESSAGES = 100_000  # the producer's queue.buffering.max.messages at least (librdkafka's default)
QUEUE_KBYTES = 32 * 1024  # ... and its queue.buffering.max.kbytes (32 MB)
ROOM_POLL = 0.005  # seconds between attempts to queue a record while the producer's queue is full
READ_TIMEOUT_CAP = 1.0  # seconds a read of the stream waits at most, so the loop looks around often


class PublishFailed(OutboxError):
    """Kafka refused an event after the producer's own retries; nothing after it is confirmed."""


class KafkaOutage(OutboxError):
    """Events could not be delivered in time (Kafka away): restart from the slot with a new producer."""

    retriable = True


# --------------------------------------------------------------------------- status cadence


def status_due(now: float, last_sent: float, confirmed: int, reported: int, status_interval: float,
               force: bool = False) -> bool:
    """Whether to send a standby status update now: when forced (the server asked for a reply, or
    the session drains), every STATUS_EVERY while the confirmed position moves, and at least every
    ``status_interval`` while it does not (that keeps wal_sender_timeout away)."""
    if force:
        return True
    return now - last_sent >= (STATUS_EVERY if confirmed != reported else status_interval)


def progress_due(now: float, since: float) -> bool:
    """Whether the periodic progress line is due."""
    return now - since >= PROGRESS_EVERY


def rate(count: int, count_before: float, now: float, since: float) -> float:
    """Events per second between two samples (0 when no time passed)."""
    elapsed = now - since
    return (count - count_before) / elapsed if elapsed > 0 else 0.0


def read_timeout(status_interval: float, transaction_time_left: float | None) -> float:
    """How long one read of the stream may wait: short enough for the status cadence, and for the
    open Kafka transaction (exactly-once) to commit when it is due."""
    timeout = min(status_interval, READ_TIMEOUT_CAP)
    return timeout if transaction_time_left is None else min(timeout, transaction_time_left)


def must_pause(in_flight: int, max_in_flight: int, in_flight_bytes: int = 0, max_in_flight_bytes: int = 0) -> bool:
    """Back-pressure: stop reading the WAL while this many events, or this many bytes of them, wait
    for Kafka (``max_in_flight_bytes`` 0: no bound by bytes)."""
    return in_flight >= max_in_flight or 0 < max_in_flight_bytes <= in_flight_bytes


def producer_queue(max_in_flight: int, max_in_flight_bytes: int) -> tuple[int, int]:
    """librdkafka's queue.buffering.max.messages and queue.buffering.max.kbytes: twice the relay's own
    bounds (at least librdkafka's defaults), so the relay pauses reading before the producer refuses a
    record; what one read of the stream brings past them, keys and headers fit in the rest."""
    return max(QUEUE_MESSAGES, 2 * max_in_flight), max(QUEUE_KBYTES, -(-2 * max_in_flight_bytes // 1024))


# --------------------------------------------------------------------------- session set-up


def batch_bytes(size_limits: Mapping[str, int]) -> int:
    """Kafka limits a whole batch to the topic's max.message.bytes: stay under the smallest known."""
    return min([MAX_BATCH_BYTES, *(limit - contract.RECORD_OVERHEAD for limit in size_limits.values())])


def resume_position(confirmed: int, committed_end_lsn: int | None) -> int:
    """Exactly-once: the position a session starts confirmed from. The offsets topic may be ahead of
    the slot (a crash between a Kafka commit and the confirm), never the other way round."""
    if committed_end_lsn is not None and committed_end_lsn > confirmed:
        return committed_end_lsn
    return confirmed


# --------------------------------------------------------------------------- failures and reconnects


class Next(enum.Enum):
    """What the supervisor does after a session or a reconnect attempt failed."""

    RECONNECT = "reconnect"  # transient: back off, check the slot again, stream again
    STOP = "stop"  # stopping anyway (SIGTERM during the failure): exit cleanly
    FAIL = "fail"  # permanent: exit with the error's one line and exit code


def after_session(exc: OutboxError, streamed: bool, stopping: bool) -> Next:
    """A session ended with ``exc``. A problem before the first stream is a setup problem (one line,
    exit); after it, only what is retriable reconnects."""
    if exc.retriable and streamed:
        return Next.RECONNECT
    if stopping and exc.retriable:
        return Next.STOP
    return Next.FAIL


@dataclass(frozen=True, slots=True)
class Attempt:
    """The outcome of a failed reconnect attempt (the preflight check before the next session)."""

    next: Next
    busy_since: float | None  # since when the slot has been "in use" in a row of attempts


def after_preflight(exc: OutboxError, busy_since: float | None, now: float) -> Attempt:
    """The slot check before a reconnect failed. "Slot in use" right after our own session ended may
    be our old walsender, which lingers until PostgreSQL sees its connection is gone: retry for
    SLOT_BUSY_GRACE seconds, then it is another relay (exit). Other failures reconnect when
    retriable and exit when not; they leave the busy clock as it is."""
    if isinstance(exc, SlotInUse):
        busy_since = busy_since or now
        return Attempt(Next.FAIL if now - busy_since > SLOT_BUSY_GRACE else Next.RECONNECT, busy_since)
    return Attempt(Next.RECONNECT if exc.retriable else Next.FAIL, busy_since)


def means_kafka_down(exc: BaseException) -> bool:
    """Whether a failure says Kafka cannot be reached (the kafka_connected gauge drops)."""
    return isinstance(exc, KafkaUnavailable)


def ends_relay(error: OutboxError | None) -> bool:
    """After a drain: an error recorded by a delivery report that no new session can cure."""
    return error is not None and not error.retriable


# --------------------------------------------------------------------------- delivery reports


class Delivery(enum.Enum):
    """What one failed delivery report means."""

    PURGED = "purged"  # the relay dropped it on purpose (stop, or a new session that replays it)
    FATAL = "fatal"  # exactly-once: fenced, or the producer failed fatally: exit
    TOO_LARGE = "too large"  # the topic's limit is below the producer's: learn it, replay, park
    OUTAGE = "outage"  # Kafka away or the producer spent: restart from the slot, new producer
    REFUSED = "refused"  # Kafka said no for good: exit, nothing after it confirmed


def classify_delivery(exc: DeliveryFailed, fatal: OutboxError | None) -> Delivery:
    """``exc`` from librdkafka's report; ``fatal`` what exactly-once mode makes of it (None: nothing)."""
    if exc.purged:
        return Delivery.PURGED
    if fatal is not None:
        return Delivery.FATAL
    if exc.too_large:
        return Delivery.TOO_LARGE
    if exc.outage:
        return Delivery.OUTAGE
    return Delivery.REFUSED


def delivery_error(kind: Delivery, exc: DeliveryFailed, event_id: str, xid: int, topic: str,
                   fatal: OutboxError | None = None) -> OutboxError | None:
    """The error that ends the session after a failed report of ``kind`` (None when purged)."""
    if kind is Delivery.PURGED:
        return None
    if kind is Delivery.FATAL:
        assert fatal is not None
        return fatal
    if kind is Delivery.TOO_LARGE:
        return KafkaOutage(f"Kafka refused event {event_id} of transaction {xid} as too large "
                           f"for {topic}: reading its max.message.bytes, then replaying to park it")
    if kind is Delivery.OUTAGE:
        return KafkaOutage(f"Kafka did not take event {event_id} of transaction {xid} in time "
                           f"({exc}); nothing after it was confirmed")
    return PublishFailed(f"Kafka refused event {event_id} of transaction {xid}: {exc}")


def event_id(headers: Iterable[tuple[str, bytes]] | None) -> str:
    """The event's ce_id from a Kafka record's headers ("?" when it has none)."""
    return next((v.decode(errors="replace") for k, v in headers or () if k == contract.H_ID), "?")


# --------------------------------------------------------------------------- gauges and health


def caught_up_at_begin(caught_up_to: int, open_transactions: int, commit_time: int) -> int:
    """A transaction begins: with nothing open, everything committed before it is acknowledged."""
    return max(caught_up_to, commit_time) if not open_transactions else caught_up_to


def seconds_behind(open_transactions: int, caught_up_to: int, now_unix: float) -> float:
    """How far behind the source the relay is: the age of the commit (µs since 2000, 0: none known yet)
    up to which everything is acknowledged; 0 with nothing open."""
    if not open_transactions or not caught_up_to:
        return 0.0
    return max(0.0, now_unix - pg_time_to_unix(caught_up_to))


def heartbeat_age(heartbeat_interval: float, seen_unix: float, now_unix: float) -> float:
    """Seconds since the last heartbeat came back through the WAL (NaN: heartbeats are off)."""
    if heartbeat_interval <= 0:
        return math.nan
    return max(0.0, now_unix - seen_unix)


def lag_bytes(server_wal_end: int, received: int, confirmed: int) -> float:
    """WAL the slot retains beyond what the relay confirmed."""
    return float(max(0, max(server_wal_end, received) - confirmed))


class Change(enum.Enum):
    DOWN = "down"
    UP = "up"


def reachability_change(known: bool | None, reachable: bool) -> Change | None:
    """One log line when Kafka's reachability changes: DOWN when it is lost (also as the first
    thing known), UP when it comes back (not at the first success)."""
    if reachable == known:
        return None
    if not reachable:
        return Change.DOWN
    return Change.UP if known is not None else None


def wal_status_warning(slot: str, before: str | None, now: str | None) -> str | None:
    """The warning when the slot's wal_status changed to one that loses (or is about to lose) WAL."""
    if now == before or now not in ("unreserved", "lost"):
        return None
    why = ("exceeded" if now == "unreserved"
           else "exceeded and WAL the slot needs was removed (events lost: re-snapshot)")
    return f"slot {slot}: wal_status is {now}: max_slot_wal_keep_size is {why}; see docs/operations.md, Alerts"


def monitor_tick(heartbeat_interval: float) -> float:
    """Seconds between looks of the monitor task: the heartbeat interval when it is shorter."""
    return min(MONITOR_EVERY, heartbeat_interval) if heartbeat_interval > 0 else MONITOR_EVERY


def heartbeat_due(now: float, last_sent: float, heartbeat_interval: float) -> bool:
    return heartbeat_interval > 0 and now - last_sent >= heartbeat_interval


def sample_due(now: float, last_sample: float) -> bool:
    return now - last_sample >= MONITOR_EVERY


# --------------------------------------------------------------------------- exactly-once: Kafka transactions


def kafka_commit_due(*, members: int, committing: bool, sent: int, max_events: int, opened: float,
                     interval: float, now: float, force: bool = False) -> bool:
    """Whether the open Kafka transaction should commit now (asked only between source transactions):
    it holds ``members`` complete source transactions, none commits yet, and it is forced, full
    (``sent`` events, a trigger, not a cap) or open for ``interval`` seconds since ``opened``."""
    if not members or committing:
        return False
    return force or sent >= max_events or now - opened >= interval


def kafka_commit_wait(*, members: int, committing: bool, opened: float, interval: float, now: float,
                      poll: float) -> float | None:
    """Seconds until the open Kafka transaction is due (while one commits: ``poll``, the time to look
    again); None when it holds no complete source transaction."""
    if committing:
        return poll
    if not members:
        return None
    return max(0.0, interval - (now - opened))


KAFKA_TRANSACTION_TIMEOUT_SHARE = 0.8  # a source transaction may keep a Kafka transaction open this share of its timeout


def kafka_transaction_overdue(open_for: float, timeout: float, share: float = KAFKA_TRANSACTION_TIMEOUT_SHARE) -> bool:
    """Whether a Kafka transaction still producing one source transaction (it cannot commit before that
    one ends) has been open so long that the broker would abort it before it could commit: stop then,
    rather than be fenced and replay the same source transaction forever."""
    return open_for > 0 and open_for >= share * timeout


def retry_commit(retriable: bool, requires_abort: bool, attempt: int, attempts: int) -> bool:
    """A Kafka transaction commit failed on try ``attempt`` (from 0) of ``attempts``: try again only
    when the error is retriable and the transaction need not be aborted."""
    return retriable and not requires_abort and attempt + 1 < attempts
