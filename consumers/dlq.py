"""The dead-letter mechanism every sink shares: ``<topic>.dlq``.

A record a sink cannot apply for a permanent reason (it breaks the event contract, the target
refuses it, it is past its attempt limit) is *parked*: produced whole to ``<topic>.dlq`` (same
key, same value, every original header, so ``ce_id`` stays) with these headers added:

=================  ==========================================================================
``dlq_error``      why, one line, passwords redacted, at most 500 characters
``dlq_attempts``   how many times a consumer tried it: 1, plus one for every re-drive that failed
``dlq_topic``      the topic, partition and offset it was read from
``dlq_partition``
``dlq_offset``
``dlq_group``      the consumer group that parked it (re-drives go back to that group only)
``dlq_time``       when it was parked (RFC 3339, UTC)
=================  ==========================================================================

API for a sink (consumers/kafka.py ``run_consumer`` calls it)
-------------------------------------------------------------
The loop calls ``await sink.apply(batch)`` with a :class:`Batch`: ``batch.records`` (aiokafka
``ConsumerRecord``s for this group), ``batch.offsets`` (the next offset per partition the
whole fetch covers, for sinks that store offsets themselves) and ``batch.dead_letters``
(:class:`DeadLetters`). For each record it cannot apply for good, the sink calls::

    await batch.dead_letters.park([DeadLetter.of(record, "ValueError: ...")])

BEFORE it makes its own effects or offsets durable. ``park`` returns once Kafka acknowledged
every letter (acks=all, idempotent producer); when Kafka cannot take them it raises
:class:`DeadLetterUnavailable` (retriable): the loop rewinds and retries the whole batch, so a
record is never lost (it may be parked twice, with the same ``ce_id``, if the sink then fails).
The loop commits Kafka offsets only after ``apply`` returned, and counts parked records in
``outbox_consumer_events_rejected_total``. A transient failure is not a dead letter: raise an
error with ``retriable = True`` (e.g. ``SinkUnavailable``) and the loop retries with backoff.

Re-drive
--------
``outbox replay --dlq TOPIC`` (and a consumer's ``--redrive-every``) produce parked records back
to their original topic with one more header, ``dlq_redrive`` = the group that parked them, and
their ``dlq_attempts``. The loop hands such a record only to that group (:func:`for_group`);
other groups skip it. Parked again, its ``dlq_attempts`` grows by one.

The pure part (building letters and records, filters) has no I/O; :class:`DeadLetters` is the
thin Kafka edge.
"""
from __future__ import annotations

import asyncio
import fnmatch
import hashlib
import logging
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Protocol

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from outbox import contract
from outbox.config import KafkaSettings
from outbox.dsn import redact
from outbox.errors import ConfigError, KafkaUnavailable, OutboxError

log = logging.getLogger(__name__)

H_ERROR = "dlq_error"
H_ATTEMPTS = "dlq_attempts"
H_TOPIC = "dlq_topic"
H_PARTITION = "dlq_partition"
H_OFFSET = "dlq_offset"
H_GROUP = "dlq_group"
H_TIME = "dlq_time"
H_REDRIVE = "dlq_redrive"
DLQ_HEADERS = (H_ERROR, H_ATTEMPTS, H_TOPIC, H_PARTITION, H_OFFSET, H_GROUP, H_TIME, H_REDRIVE)
MAX_ERROR = 500
SEND_TIMEOUT = 30.0


class DeadLetterUnavailable(OutboxError):
    """Kafka did not acknowledge a dead letter: the batch is retried, nothing is lost."""

    retriable = True


class TopicMissing(OutboxError):
    """A topic named on the command line does not exist."""


class RecordLike(Protocol):
    """What is read from a Kafka record (aiokafka's ConsumerRecord fits)."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...
    @property
    def headers(self) -> Sequence[tuple[str, bytes]]: ...


# --------------------------------------------------------------------------- pure
def dlq_topic(topic: str) -> str:
    return topic + contract.DLQ_SUFFIX


def one_line(error: str) -> str:
    text = " ".join(redact(error).split())
    return text if len(text) <= MAX_ERROR else text[:MAX_ERROR - 1] + "…"


def header(headers: Iterable[tuple[str, bytes | None]], name: str) -> bytes | None:
    for key, value in headers:
        if key == name:
            return value
    return None


def attempts_of(headers: Iterable[tuple[str, bytes | None]]) -> int:
    """Attempts recorded on a (re-driven or parked) record; 0 for a fresh one."""
    raw = header(headers, H_ATTEMPTS)
    try:
        return int(raw) if raw is not None else 0
    except ValueError:
        return 0


def original_headers(headers: Iterable[tuple[str, bytes | None]]) -> list[tuple[str, bytes | None]]:
    """The record's own headers, without any dead-letter bookkeeping from an earlier parking."""
    return [(k, v) for k, v in headers if k not in DLQ_HEADERS]


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A record a sink could not apply, and why."""

    topic: str
    partition: int
    offset: int
    error: str
    headers: tuple[tuple[str, bytes | None], ...]
    key: bytes | None
    value: bytes | None
    attempts: int = 1

    @classmethod
    def of(cls, record: RecordLike, error: str, attempts: int | None = None) -> DeadLetter:
        """``attempts`` defaults to one more than the record carries (1 for a fresh record)."""
        tries = attempts if attempts is not None else attempts_of(record.headers) + 1
        return cls(record.topic, record.partition, record.offset, one_line(error), tuple(record.headers),
                   record.key, record.value, tries)

    def record(self, group: str, now: datetime) -> contract.Record:
        """The record produced to ``<topic>.dlq``."""
        headers = [(k, v if v is not None else b"") for k, v in original_headers(self.headers)]
        headers += [
            (H_ERROR, self.error.encode()),
            (H_ATTEMPTS, str(self.attempts).encode()),
            (H_TOPIC, self.topic.encode()),
            (H_PARTITION, str(self.partition).encode()),
            (H_OFFSET, str(self.offset).encode()),
            (H_GROUP, group.encode()),
            (H_TIME, contract.format_time(now).encode()),
        ]
        return contract.Record(dlq_topic(self.topic), self.key or b"", self.value or b"", headers)


def redrive_record(parked: RecordLike) -> contract.Record | None:
    """The record that sends a parked one back to the group that parked it (None: not a dead letter)."""
    topic, group = header(parked.headers, H_TOPIC), header(parked.headers, H_GROUP)
    if not topic or not group:
        return None
    headers = [(k, v if v is not None else b"") for k, v in original_headers(parked.headers)]
    headers += [(H_REDRIVE, group), (H_ATTEMPTS, str(attempts_of(parked.headers)).encode())]
    return contract.Record(topic.decode(), parked.key or b"", parked.value or b"", headers)


def for_group(records: Sequence[Any], group: str) -> list[Any]:
    """The records this group applies: all but those re-driven for another group."""
    mine = group.encode()
    out = []
    for r in records:
        target = header(r.headers, H_REDRIVE) if r.headers else None
        if target is None or target == mine:
            out.append(r)
    return out


FILTERS = {"group": "group", "error": "error", "type": "event_type", "key": "key", "id": "ids",
           "attempts-below": "max_attempts"}


@dataclass(frozen=True, slots=True)
class Filter:
    """Which parked records ``outbox replay --dlq`` re-drives (every given condition must hold)."""

    group: str | None = None
    error: str | None = None  # substring of dlq_error
    event_type: str | None = None  # ce_type, shell pattern (customer.*)
    key: str | None = None  # record key, shell pattern
    ids: frozenset[str] = frozenset()  # ce_id values
    max_attempts: int | None = None  # only records with fewer attempts

    @classmethod
    def parse(cls, items: Sequence[str], group: str | None = None) -> Filter:
        """``--filter`` values: group=G, error=TEXT, type=PATTERN, key=PATTERN, id=UUID (repeatable), attempts-below=N."""
        values: dict[str, Any] = {"group": group}
        ids: set[str] = set()
        for item in items:
            name, sep, value = item.partition("=")
            name = name.strip().replace("_", "-")
            if not sep or not value:
                raise ConfigError(f"invalid --filter {item!r}: expected NAME=VALUE, NAME one of {', '.join(FILTERS)}")
            if name == "id":
                ids.add(value)
            elif name == "attempts-below":
                if not value.isdigit() or int(value) < 1:
                    raise ConfigError(f"invalid --filter {item!r}: attempts-below wants a whole number >= 1")
                values["max_attempts"] = int(value)
            elif name in FILTERS:
                values[FILTERS[name]] = value
            else:
                raise ConfigError(f"invalid --filter {item!r}: NAME is one of {', '.join(FILTERS)}")
        return cls(ids=frozenset(ids), **values)

    def matches(self, record: RecordLike) -> bool:
        h = {k: (v or b"").decode("utf-8", "replace") for k, v in record.headers}
        if self.group is not None and h.get(H_GROUP) != self.group:
            return False
        if self.error is not None and self.error not in h.get(H_ERROR, ""):
            return False
        if self.event_type is not None and not fnmatch.fnmatchcase(h.get(contract.H_TYPE, ""), self.event_type):
            return False
        if self.key is not None and not fnmatch.fnmatchcase((record.key or b"").decode("utf-8", "replace"), self.key):
            return False
        if self.ids and h.get(contract.H_ID) not in self.ids:
            return False
        return not self.exhausted(record)

    def matches_except_attempts(self, record: RecordLike) -> bool:
        return Filter(self.group, self.error, self.event_type, self.key, self.ids).matches(record)

    def exhausted(self, record: RecordLike) -> bool:
        """Past the attempt limit: stays parked."""
        return self.max_attempts is not None and attempts_of(record.headers) >= self.max_attempts


def cursor_group(flt: Filter, base: str = "outbox-redrive") -> str:
    """The consumer group that remembers how far ``outbox replay --dlq`` with this filter has read:
    ``base`` without a filter, ``base.<hash of the filter>`` with one. Each filter has its own
    cursor, so a filtered run never moves another filter's past records it did not match."""
    parts = [f"{name}={getattr(flt, attr)}" for name, attr in sorted(FILTERS.items())
             if attr != "ids" and getattr(flt, attr) is not None]
    parts += [f"id={i}" for i in sorted(flt.ids)]
    if not parts:
        return base
    return f"{base}.{hashlib.sha256(chr(0).join(parts).encode()).hexdigest()[:16]}"


def relay_partitioner(key: bytes | None, all_partitions: Sequence[int], available: Sequence[int]) -> int:
    """aiokafka's ``partitioner`` argument: the relay's (librdkafka's consistent_random, see
    ``contract.partition_for``), so a dead letter or a re-drive of a key lands where the relay puts that key."""
    ids = sorted(all_partitions)
    index = contract.partition_for(key, len(ids))
    if index is None:  # librdkafka: an empty key goes to a random (available) partition
        return random.choice(list(available) or ids)
    return ids[index]


# --------------------------------------------------------------------------- the batch a sink gets
@dataclass(slots=True)
class Batch:
    """One fetch, as handed to ``Sink.apply``."""

    records: Sequence[Any]
    offsets: Mapping[tuple[str, int], int]  # (topic, partition) -> next offset, the whole fetch
    dead_letters: DeadLetters
    skipped: int = 0  # records of the fetch re-driven for another group, not in ``records``


# --------------------------------------------------------------------------- I/O: Kafka
@dataclass
class DeadLetters:
    """Produces dead letters for one consumer group; ``async with`` or ``start``/``close``.

    The producer is opened on the first ``park`` (most batches park nothing).
    """

    kafka: KafkaSettings
    group: str
    parked: int = 0  # records parked since the last take_count()
    _producer: AIOKafkaProducer | None = field(default=None, repr=False)

    async def __aenter__(self) -> DeadLetters:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None

    def take_count(self) -> int:
        n, self.parked = self.parked, 0
        return n

    async def park(self, letters: Sequence[DeadLetter]) -> None:
        """Produce every letter and wait for all acknowledgements (one round of sends, not one per letter)."""
        if not letters:
            return
        now = datetime.now(timezone.utc)
        await send_all(await self._ready(), [letter.record(self.group, now) for letter in letters], "dead letters")
        for letter in letters:
            log.error("parked %s[%d]@%d in %s (attempt %d): %s", letter.topic, letter.partition, letter.offset,
                      dlq_topic(letter.topic), letter.attempts, letter.error)
        self.parked += len(letters)

    async def _ready(self) -> AIOKafkaProducer:
        if self._producer is None:
            self._producer = await start_producer(self.kafka, "outbox-dlq")
        return self._producer


async def start_producer(kafka: KafkaSettings, client_id: str) -> AIOKafkaProducer:
    producer = AIOKafkaProducer(**kafka.client_kwargs(), client_id=client_id, acks="all", enable_idempotence=True,
                                linger_ms=5, partitioner=relay_partitioner)
    try:
        await producer.start()
    except KafkaError as exc:
        await producer.stop()
        raise DeadLetterUnavailable(f"cannot reach Kafka at {kafka.bootstrap} to produce dead letters: {exc}") from None
    return producer


async def send_all(producer: AIOKafkaProducer, records: Sequence[contract.Record], what: str) -> None:
    """Send every record, then wait for every acknowledgement; one line when Kafka refuses."""
    try:
        futures = [await producer.send(r.topic, value=r.value, key=r.key, headers=r.headers) for r in records]
        await asyncio.wait_for(asyncio.gather(*futures), SEND_TIMEOUT)
    except (TimeoutError, KafkaError) as exc:
        raise DeadLetterUnavailable(f"Kafka did not acknowledge {len(records)} {what} "
                                    f"({type(exc).__name__}: {exc}); the batch is retried") from None


# --------------------------------------------------------------------------- I/O: re-drive
@dataclass
class Redriven:
    scanned: int = 0
    redriven: int = 0
    exhausted: int = 0  # matched but past the attempt limit: left parked
    topics: tuple[str, ...] = ()


async def topic_partitions(kafka: KafkaSettings, topics: Sequence[str], *, strict: bool = False) -> list[TopicPartition]:
    """Every partition of the topics that exist (``strict``: a missing topic is an error)."""
    admin = AIOKafkaAdminClient(**kafka.client_kwargs())
    try:
        await admin.start()
        existing = set(await admin.list_topics())
        missing = [t for t in topics if t not in existing]
        if missing and strict:
            raise TopicMissing(f"topic {missing[0]} does not exist on Kafka at {kafka.bootstrap}")
        present = [t for t in topics if t in existing]
        described = await admin.describe_topics(present) if present else []
    except KafkaError as exc:
        raise KafkaUnavailable(f"cannot reach Kafka at {kafka.bootstrap}: {exc} (check --kafka-bootstrap)") from None
    finally:
        await admin.close()
    return sorted((TopicPartition(d["topic"], p["partition"]) for d in described for p in d["partitions"]),
                  key=lambda tp: (tp.topic, tp.partition))


async def redrive(kafka: KafkaSettings, topics: Sequence[str], flt: Filter, *, cursor_group: str,
                  from_beginning: bool = False, dry_run: bool = False, strict: bool = False,
                  base_group: str | None = None) -> Redriven:
    """Send the parked records of ``topics`` (``*.dlq``) that match ``flt`` back to their topic.

    Reads each partition from the cursor group's committed offset (or the beginning) up to the end
    offset seen at start; produces the re-drives, waits for every acknowledgement, then commits
    the cursor, so a record is re-driven at least once and, barring a crash, at most once.

    Each filter has a cursor of its own (:func:`cursor_group`). ``base_group`` is the cursor of the
    run without a filter: a filtered run moves it only across records the filter matched (from
    where it stands up to the first record the filter did not match), so an unfiltered run later
    still finds every record no filtered run re-drove, and is not handed those one did.
    """
    result = Redriven(topics=tuple(topics))
    consumer = await _cursor_consumer(kafka, cursor_group)
    base: AIOKafkaConsumer | None = None
    producer = None
    try:
        if base_group and base_group != cursor_group:
            base = await _cursor_consumer(kafka, base_group)
        tps = await topic_partitions(kafka, topics, strict=strict)
        if not tps:
            return result
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        if from_beginning:
            await consumer.seek_to_beginning(*tps)
        own = {tp: await consumer.position(tp) for tp in tps}
        base_at: dict[TopicPartition, int] = {}
        if base is not None:
            base.assign(tps)
            base_at = {tp: await base.position(tp) for tp in tps}
            for tp in tps:
                if base_at[tp] < own[tp]:
                    consumer.seek(tp, base_at[tp])  # read from there too, to see how far the base may move
        base_next = dict(base_at)
        prefix = {tp for tp in base_at if base_at[tp] < ends[tp]}  # still matching from the base's position
        pending = {tp for tp in tps if await consumer.position(tp) < ends[tp]}
        records: list[contract.Record] = []
        while pending:
            batches = await consumer.getmany(*pending, timeout_ms=1000)
            for tp, part in batches.items():
                for rec in part:
                    if rec.offset >= ends[tp]:
                        break
                    matched = flt.matches(rec)
                    if tp in prefix and rec.offset >= base_at[tp]:
                        if matched or redrive_record(rec) is None:
                            base_next[tp] = rec.offset + 1
                        else:
                            prefix.discard(tp)
                    if rec.offset < own[tp]:  # this filter's earlier runs handled it
                        continue
                    result.scanned += 1
                    if flt.exhausted(rec) and flt.matches_except_attempts(rec):
                        result.exhausted += 1
                    elif matched and (back := redrive_record(rec)) is not None:
                        records.append(back)
            pending = {tp for tp in pending if await consumer.position(tp) < ends[tp]}
        if records and not dry_run:
            producer = await start_producer(kafka, "outbox-redrive")
            await send_all(producer, records, "re-driven records")
        result.redriven = len(records)
        if not dry_run:
            await consumer.commit({tp: ends[tp] for tp in tps})
            moved = {tp: o for tp, o in base_next.items() if o > base_at[tp]}
            if base is not None and moved:
                await base.commit(moved)
        return result
    finally:
        if producer is not None:
            await producer.stop()
        if base is not None:
            await base.stop()
        await consumer.stop()


async def _cursor_consumer(kafka: KafkaSettings, group: str) -> AIOKafkaConsumer:
    consumer = AIOKafkaConsumer(**kafka.client_kwargs(), group_id=group, enable_auto_commit=False,
                                auto_offset_reset="earliest", client_id="outbox-redrive", isolation_level="read_committed")
    try:
        await consumer.start()
    except KafkaError as exc:
        await consumer.stop()
        raise KafkaUnavailable(f"cannot reach Kafka at {kafka.bootstrap}: {exc} (check --kafka-bootstrap)") from None
    return consumer
