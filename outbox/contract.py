"""The event contract: topic, key, value and CloudEvents headers. Pure values, no I/O.

Consumer teams code against what this module produces; tests pin it (tests/unit/test_contract.py).
Changing it is a versioned, documented decision (docs/event-contract.md).
"""
from __future__ import annotations

import functools
import re
import zlib
from dataclasses import dataclass
from datetime import datetime, timezone

from outbox.errors import ContractError as ContractError  # re-exported: the contract's checks raise it

SPECVERSION = "1.0"
CONTENT_TYPE = "application/json"
DEFAULT_TOPIC_PREFIX = "outbox"
DLQ_SUFFIX = ".dlq"
# Where an exactly-once relay keeps its source positions (compacted, keyed by source id). The
# leading "__" keeps it out of consumers' topic patterns, like Kafka's own internal topics.
DEFAULT_OFFSETS_TOPIC = "__outbox_relay_offsets"

# The store-side objects every part agrees on.
SCHEMA = "outbox"
EVENTS_TABLE = "events"
PARKED_TABLE = "parked"  # events too large for Kafka: the whole row, the reason, the position
PUBLICATION = "outbox_events"
CAPTURE_TRIGGER = "outbox_capture"
CAPTURE_TRUNCATE_TRIGGER = "outbox_capture_truncate"  # statement level: <aggregate>.truncated
ORIGIN_ROLE = "outbox_origin"  # members may set outbox.origin (store revision 0005): the CRM write-back
ORIGIN_SETTING = "outbox.origin"  # transaction-local: SET LOCAL outbox.origin = 'crm'
# The relay's heartbeat: a row of this type goes through the WAL like any event, proves the path
# end to end, lets the slot advance on an idle database, and is never published to Kafka.
HEARTBEAT_TYPE = "outbox.heartbeat"
# Written by the capture trigger next to a change it parked in outbox.parked (no primary key):
# counted by the relay (outbox_relay_capture_parked_total), never published.
CAPTURE_PARKED_TYPE = "outbox.capture_parked"
RESERVED_TYPES = frozenset({HEARTBEAT_TYPE, CAPTURE_PARKED_TYPE})  # outbox.emit() refuses them
TRUNCATED_AGGREGATE_ID = "*"  # the aggregate id of <aggregate>.truncated: every aggregate of its table

# Kafka header names (CloudEvents 1.0, Kafka protocol binding, binary mode).
H_SPECVERSION = "ce_specversion"
H_ID = "ce_id"
H_SOURCE = "ce_source"
H_TYPE = "ce_type"
H_TIME = "ce_time"
H_SUBJECT = "ce_subject"
H_CONTENT_TYPE = "content-type"
# Extensions: the source position, the aggregate type, the origin of the change.
H_COMMIT_LSN = "ce_commitlsn"  # commit LSN of the source transaction, PostgreSQL text form "0/16B3748"
H_TXSEQ = "ce_txseq"  # index of the event inside its transaction, from 0
H_XID = "ce_xid"  # source transaction id
H_AGGREGATE_TYPE = "ce_aggregatetype"
H_ORIGIN = "ce_origin"  # present when the change carried outbox.origin
H_TRACEPARENT = "traceparent"  # W3C trace context, when the application gave one
# The WAL history the position belongs to: "<system identifier>.<timeline>" of the source cluster,
# from IDENTIFY_SYSTEM at the start of the relay's session. Positions of one history only grow; a
# restored backup, a promoted standby or a new cluster starts another one, whose LSNs may be lower.
H_HISTORY = "ce_history"

# Written by ``outbox backfill --reconcile`` after the last chunk of a table, straight into
# outbox.events (applications cannot emit outbox.* types): every aggregate of that source and type
# whose position is below the payload's ``start_lsn`` was neither in the snapshot nor changed since
# the backfill began, so its row is gone from the store. Payload: {"aggregate_type", "table",
# "start_lsn", "run"}; aggregate id: the table.
SNAPSHOT_COMPLETE_TYPE = "outbox.snapshot_complete"

_TOPIC_PART = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]*$")
_PG_EPOCH_US = 946_684_800_000_000  # 2000-01-01T00:00:00Z in microseconds since the Unix epoch


def pg_time_to_unix(us_since_2000: int) -> float:
    """A PostgreSQL timestamp (microseconds since 2000-01-01 UTC, as pgoutput sends it) in Unix seconds."""
    return us_since_2000 / 1_000_000 + _PG_EPOCH_US // 1_000_000


def format_lsn(lsn: int) -> str:
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def parse_lsn(text: str) -> int:
    hi, sep, lo = text.partition("/")
    if not sep:
        raise ValueError(f"not an LSN: {text!r}")
    return (int(hi, 16) << 32) | int(lo, 16)


def pg_timestamp_to_datetime(us_since_2000: int) -> datetime:
    """Convert a pgoutput timestamp (microseconds since 2000-01-01 UTC) to an aware datetime."""
    us = us_since_2000 + _PG_EPOCH_US
    return datetime.fromtimestamp(us // 1_000_000, tz=timezone.utc).replace(microsecond=us % 1_000_000)


def format_time(ts: datetime) -> str:
    """RFC 3339 in UTC with microseconds, as CloudEvents wants."""
    return ts.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@functools.lru_cache(maxsize=64)  # commit times of a stream of transactions share their second
def _pg_second_text(second_since_2000: int) -> str:
    return datetime.fromtimestamp(second_since_2000 + _PG_EPOCH_US // 1_000_000, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.")


def format_pg_time(us_since_2000: int) -> str:
    """``format_time`` of a pgoutput timestamp, without building a datetime per transaction."""
    second, us = divmod(us_since_2000, 1_000_000)
    return f"{_pg_second_text(second)}{us:06d}Z"


@functools.lru_cache(maxsize=4096)  # a handful of aggregate types, looked up for every event
def topic_for(prefix: str, aggregate_type: str) -> str:
    if not _TOPIC_PART.match(aggregate_type) or len(prefix) + 1 + len(aggregate_type) > 249:
        raise ContractError(f"aggregate type {aggregate_type!r} cannot name a Kafka topic (use letters, digits, '.', '_', '-')")
    return f"{prefix}.{aggregate_type}" if prefix else aggregate_type


def key_for(source_id: str, aggregate_id: str) -> str:
    return f"{source_id}:{aggregate_id}"


# The relay's producer (librdkafka) partitions with its default, consistent_random: CRC32 of the
# key modulo the partition count, a random partition for an empty key. Every other producer of
# event records (dead letters, re-drives) must do the same, or one key's events end up on two
# partitions and lose their order (consumers/dlq.py ``relay_partitioner``).
PARTITIONER = "consistent_random"


def partition_for(key: bytes | None, partitions: int) -> int | None:
    """The partition the relay puts ``key`` on, among ``partitions``; None for an empty key (any partition)."""
    if not key:
        return None
    return zlib.crc32(key) % partitions


def source_for(source_id: str) -> str:
    return f"/stores/{source_id}"


def history_for(system_identifier: str | int, timeline: int) -> str:
    """The ``ce_history`` value of a cluster's WAL history (IDENTIFY_SYSTEM's systemid and timeline)."""
    return f"{system_identifier}.{timeline}"


@dataclass(frozen=True, slots=True)
class Position:
    """Where an event stands in its source: commit LSN, then index inside the transaction."""

    commit_lsn: int
    seq: int

    def __str__(self) -> str:
        return f"{format_lsn(self.commit_lsn)}#{self.seq}"


@dataclass(frozen=True, slots=True)
class OutboxRow:
    """One row of outbox.events, values as text. The relay reads rows as :class:`RawRow` (bytes);
    this is their decoded form, for parking and for tools and tests that build records."""

    id: str
    aggregatetype: str
    aggregateid: str
    type: str
    payload: str  # JSON text, passed through to Kafka without re-encoding
    origin: str | None = None
    traceparent: str | None = None


    def encoded(self) -> RawRow:
        def enc(value: str | None) -> bytes | None:
            return None if value is None else value.encode()

        return RawRow(self.id.encode(), self.aggregatetype.encode(), self.aggregateid.encode(), self.type.encode(),
                      self.payload.encode(), enc(self.origin), enc(self.traceparent))


@dataclass(slots=True)  # not frozen: built per event, and a frozen __init__ costs 3x
class RawRow:
    """An outbox row as the relay reads it from the WAL: UTF-8 bytes (the relay checks the database
    is UTF8), never decoded on the hot path, since its values go to Kafka as bytes anyway."""

    id: bytes
    aggregatetype: bytes
    aggregateid: bytes
    type: bytes
    payload: bytes
    origin: bytes | None = None
    traceparent: bytes | None = None

    def decoded(self) -> OutboxRow:
        def dec(value: bytes | None) -> str | None:
            return None if value is None else value.decode()

        return OutboxRow(self.id.decode(), self.aggregatetype.decode(), self.aggregateid.decode(), self.type.decode(),
                         self.payload.decode(), dec(self.origin), dec(self.traceparent))


@dataclass(slots=True)  # not frozen: built per event, and a frozen __init__ costs 3x
class Record:
    """What goes to Kafka for one event."""

    topic: str
    key: bytes
    value: bytes
    headers: list[tuple[str, bytes]]


@dataclass(frozen=True, slots=True)
class TxnContext:
    """What every event of one source transaction shares, encoded once for the whole transaction."""

    prefix: str
    key_prefix: bytes  # b"<source_id>:"
    shared: tuple[tuple[str, bytes], ...]

    @classmethod
    def of(cls, *, source_id: str, prefix: str, commit_lsn: int, commit_time: datetime | int, xid: int,
           history: bytes | None = None) -> TxnContext:
        """``commit_time``: a datetime, or a pgoutput timestamp (microseconds since 2000-01-01 UTC);
        ``history``: the session's ``ce_history`` value (see :func:`history_for`), encoded once per session."""
        time_text = format_pg_time(commit_time) if isinstance(commit_time, int) else format_time(commit_time)
        shared: tuple[tuple[str, bytes], ...] = (
            (H_SPECVERSION, SPECVERSION.encode()),
            (H_SOURCE, source_for(source_id).encode()),
            (H_TIME, time_text.encode()),
            (H_CONTENT_TYPE, CONTENT_TYPE.encode()),
            (H_COMMIT_LSN, format_lsn(commit_lsn).encode()),
            (H_XID, str(xid).encode()),
        )
        if history is not None:
            shared += ((H_HISTORY, history),)
        return cls(prefix, f"{source_id}:".encode(), shared)

    def record(self, row: OutboxRow, seq: int) -> Record:
        """Turn one outbox row, the ``seq``-th event of this transaction, into its Kafka record."""
        return self.record_raw(row.encoded(), seq)

    def record_raw(self, row: RawRow, seq: int) -> Record:
        """:meth:`record` of a row as read from the WAL (the relay's hot path: no text is decoded)."""
        headers = [
            *self.shared,
            (H_ID, row.id),
            (H_TYPE, row.type),
            (H_SUBJECT, row.aggregateid),
            (H_AGGREGATE_TYPE, row.aggregatetype),
            (H_TXSEQ, str(seq).encode()),
        ]
        if row.origin:
            headers.append((H_ORIGIN, row.origin))
        if row.traceparent:
            headers.append((H_TRACEPARENT, row.traceparent))
        return Record(
            topic=_topic_for_raw(self.prefix, row.aggregatetype),
            key=self.key_prefix + row.aggregateid,
            value=row.payload,
            headers=headers,
        )


    def unroutable_record(self, row: RawRow, seq: int) -> Record:
        """The record of a row whose aggregate type cannot name a topic (:func:`topic_for` refused it):
        the same key and headers as :meth:`record_raw`, on :func:`unroutable_topic`. Only the relay's
        parking path builds it (the row goes to outbox.parked, its marker to ``<that topic>.dlq``)."""
        headers = [
            *self.shared,
            (H_ID, row.id),
            (H_TYPE, row.type),
            (H_SUBJECT, row.aggregateid),
            (H_AGGREGATE_TYPE, row.aggregatetype),
            (H_TXSEQ, str(seq).encode()),
        ]
        if row.origin:
            headers.append((H_ORIGIN, row.origin))
        if row.traceparent:
            headers.append((H_TRACEPARENT, row.traceparent))
        return Record(topic=unroutable_topic(self.prefix), key=self.key_prefix + row.aggregateid, value=row.payload,
                      headers=headers)


def unroutable_topic(prefix: str) -> str:
    """Where events of an aggregate type that cannot name a topic would go: ``<prefix>.__unroutable``.
    Nothing is published there; their markers go to ``<prefix>.__unroutable.dlq``."""
    return f"{prefix}.{UNROUTABLE_AGGREGATE}" if prefix else UNROUTABLE_AGGREGATE


# The topic part of unroutable_topic; the leading "__" keeps it apart from application aggregate types.
UNROUTABLE_AGGREGATE = "__unroutable"
# outbox.events' CHECK constraint (store revision 0007): topic_for's rule on aggregatetype.
AGGREGATE_TYPE_CONSTRAINT = "events_aggregatetype_names_a_topic"


@functools.lru_cache(maxsize=4096)
def _topic_for_raw(prefix: str, aggregate_type: bytes) -> str:
    return topic_for(prefix, aggregate_type.decode())


def record_size(record: Record) -> int:
    """Bytes the record takes in a Kafka batch, near enough to compare with max.message.bytes."""
    return len(record.key) + len(record.value) + sum(len(k) + len(v) + 4 for k, v in record.headers) + RECORD_OVERHEAD


# A v2 record batch header (61 bytes) and one record's varints, rounded up.
RECORD_OVERHEAD = 128
H_DLQ_ERROR = "dlq_error"
H_DLQ_SIZE = "dlq_size"
H_DLQ_LSN = "dlq_lsn"


def parked_marker(record: Record, error: str, commit_lsn: int) -> Record:
    """The small record that says an event was parked: same key and ce_* headers, no payload.

    It goes to ``<topic>.dlq``; the full event stays in the store's ``outbox.parked``.
    """
    headers = [(k, v) for k, v in record.headers if k != H_CONTENT_TYPE]
    headers += [(H_DLQ_ERROR, error.encode()), (H_DLQ_SIZE, str(record_size(record)).encode()),
                (H_DLQ_LSN, format_lsn(commit_lsn).encode())]
    return Record(topic=record.topic + DLQ_SUFFIX, key=record.key, value=b"", headers=headers)


def build_record(row: OutboxRow, *, source_id: str, prefix: str, position: Position, commit_time: datetime, xid: int,
                 history: str | None = None) -> Record:
    """Turn one outbox row into its Kafka record, following the contract (one-off form of TxnContext)."""
    context = TxnContext.of(source_id=source_id, prefix=prefix, commit_lsn=position.commit_lsn, commit_time=commit_time,
                            xid=xid, history=history.encode() if history is not None else None)
    return context.record(row, position.seq)


@dataclass(frozen=True, slots=True)
class ReceivedEvent:
    """An event as a consumer sees it, parsed back from a Kafka record's headers."""

    id: str
    source_id: str
    aggregate_type: str
    aggregate_id: str
    type: str
    time: datetime
    position: Position
    origin: str | None
    payload: bytes
    history: str | None = None  # ce_history; None from relays older than the header


def parse_record(headers: list[tuple[str, bytes]] | tuple[tuple[str, bytes], ...], value: bytes | None) -> ReceivedEvent:
    """Read a record back into an event; raises ContractError when a required header is missing."""
    h = {k: v.decode() for k, v in headers if v is not None}
    try:
        source = h[H_SOURCE]
        if not source.startswith("/stores/"):
            raise ContractError(f"unexpected {H_SOURCE} {source!r}")
        return ReceivedEvent(
            id=h[H_ID],
            source_id=source[len("/stores/"):],
            aggregate_type=h[H_AGGREGATE_TYPE],
            aggregate_id=h[H_SUBJECT],
            type=h[H_TYPE],
            time=datetime.fromisoformat(h[H_TIME].replace("Z", "+00:00")),
            position=Position(parse_lsn(h[H_COMMIT_LSN]), int(h[H_TXSEQ])),
            origin=h.get(H_ORIGIN),
            payload=value if value is not None else b"null",
            history=h.get(H_HISTORY),
        )
    except KeyError as exc:
        raise ContractError(f"record lacks header {exc.args[0]}") from None
    except ValueError as exc:
        raise ContractError(f"record has a malformed header: {exc}") from None


def is_deletion(event_type: str) -> bool:
    return event_type.endswith(".deleted")


def is_truncation(event_type: str) -> bool:
    """``<aggregate>.truncated``: every aggregate of that type from that source, older than this event, is gone."""
    return event_type.endswith(".truncated")
