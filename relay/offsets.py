"""The relay's source positions in Kafka (exactly-once delivery).

Each Kafka transaction of the relay ends with its source position, written twice in that same
transaction, so both are visible exactly when the events are:

* one record in the compacted offsets topic, keyed by the source id (shared by every relay of
  the fleet; what operators read and reset);
* the committed offset of the source's own consumer group ``<offsets topic>.<source id>``
  (``send_offsets_to_transaction``), the position JSON as its metadata.

On start the relay reads its group's offset. That read is per source: a transaction another
relay left open (stalled, paused, killed and not yet timed out) holds back ``read_committed``
readers of the shared offsets partition at its start (the last stable offset), which would show
a restarting relay a stale position of its own, but it never touches this group. Only without a
group offset (first start, a relay upgraded from a version without it, or the group expired after
``offsets.retention.minutes`` without a commit) is the offsets topic read; that read knows when a
record of its own key lies beyond the last stable offset and then waits for it to settle instead
of taking an older position. Every source transaction whose commit LSN is not after the position
is skipped. Both records name the transactional id that wrote them, so a relay of the same source
with another id (which would not fence the first) is refused.

:func:`encode_position` / :func:`decode_position` are pure; :class:`OffsetsTopic` is the thin
I/O edge (create the topic if missing, read a source's position). Blocking: call it through
``asyncio.to_thread``.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from outbox import contract
from outbox.config import KafkaSettings
from outbox.errors import KafkaUnavailable, OutboxError
from outbox.relay.publisher import kafka_reason

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
READ_TIMEOUT = 120.0  # seconds to read a source's position before giving up (an open transaction blocks it)
PROGRESS_EVERY = 10.0
GROUP_PARTITION = 0  # the group offset is kept for the offsets topic's partition 0


class OffsetsCorrupt(OutboxError):
    """The offsets topic holds a record for this source that the relay cannot read."""


@dataclass(frozen=True, slots=True)
class SourcePosition:
    """Where a source's published history ends: its last source transaction inside a committed Kafka transaction."""

    commit_lsn: int  # the transaction's commit LSN (pgoutput Begin.final_lsn): unique and ordered
    end_lsn: int  # the end of its commit record (pgoutput Commit.end_lsn): what the slot may confirm
    xid: int

    def covers(self, commit_lsn: int) -> bool:
        """Whether the source transaction that committed at ``commit_lsn`` is already in Kafka."""
        return commit_lsn <= self.commit_lsn

    def __str__(self) -> str:
        return f"commit {contract.format_lsn(self.commit_lsn)} (xid {self.xid})"


@dataclass(frozen=True, slots=True)
class Stored:
    """A source's position as read back, with the transactional id that wrote it (None: an older relay's)."""

    position: SourcePosition
    transactional_id: str | None
    where: str  # "group <name>" or "topic <name>", for the log


def encode_position(source_id: str, position: SourcePosition, transactional_id: str | None = None) -> tuple[bytes, bytes]:
    """Key and value of an offsets record (the value is also the group offset's metadata)."""
    value: dict[str, Any] = {
        "version": FORMAT_VERSION,
        "source_id": source_id,
        "commit_lsn": contract.format_lsn(position.commit_lsn),
        "end_lsn": contract.format_lsn(position.end_lsn),
        "xid": position.xid,
    }
    if transactional_id is not None:
        value["transactional_id"] = transactional_id
    return source_id.encode(), json.dumps(value, separators=(",", ":")).encode()


def writer_of(value: bytes) -> str | None:
    """The transactional id an offsets record names (None: written by a relay that did not record it)."""
    try:
        found = json.loads(value).get("transactional_id")
    except (AttributeError, json.JSONDecodeError):
        return None
    return found if isinstance(found, str) else None


def group_id(offsets_topic: str, source_id: str) -> str:
    """The consumer group whose committed offset holds the source's position (one per source)."""
    return f"{offsets_topic}.{source_id}"


def decode_position(value: bytes) -> SourcePosition:
    """The position in an offsets record's value; ValueError when it is not one this relay wrote."""
    try:
        data = json.loads(value)
        if data.get("version") != FORMAT_VERSION:
            raise ValueError(f"unknown format version {data.get('version')!r}")
        return SourcePosition(commit_lsn=contract.parse_lsn(data["commit_lsn"]),
                              end_lsn=contract.parse_lsn(data["end_lsn"]), xid=int(data["xid"]))
    except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not an offsets record: {exc}") from None


def newest(positions: list[SourcePosition]) -> SourcePosition | None:
    """Commit LSNs only grow, so the newest position is the largest, wherever it was stored."""
    return max(positions, key=lambda p: p.commit_lsn, default=None)


class OffsetsTopic:
    """The offsets topic on the cluster: created compacted when missing, read with ``read_committed``."""

    def __init__(self, kafka: KafkaSettings, topic: str) -> None:
        self._kafka = kafka
        self.topic = topic

    def ensure(self, timeout: float = 30.0) -> None:
        """Create the topic (one partition, cleanup.policy=compact) unless it exists; check an existing one."""
        admin = AdminClient({**self._kafka.librdkafka_config(), "client.id": "outbox-relay-offsets"})
        try:
            metadata = admin.list_topics(timeout=timeout)  # naming the topic could auto-create it
        except KafkaException as exc:
            raise KafkaUnavailable(f"cannot reach Kafka at {self._kafka.bootstrap}: {kafka_reason(exc)}") from None
        found = metadata.topics.get(self.topic)
        if found is None or found.error is not None:
            futures = admin.create_topics([NewTopic(self.topic, num_partitions=1, replication_factor=-1,
                                                    config={"cleanup.policy": "compact"})], request_timeout=timeout)
            try:
                futures[self.topic].result(timeout)
                log.info("created offsets topic %s (cleanup.policy=compact)", self.topic)
                return
            except KafkaException as exc:
                if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise KafkaUnavailable(f"cannot create offsets topic {self.topic}: {kafka_reason(exc)} "
                                           "(create it with cleanup.policy=compact, or let the relay's user create topics)") from None
        self._check_compacted(admin, timeout)

    def _check_compacted(self, admin: AdminClient, timeout: float) -> None:
        from confluent_kafka.admin import ConfigResource

        try:
            resource = ConfigResource(ConfigResource.Type.TOPIC, self.topic)
            configs = admin.describe_configs([resource])[resource].result(timeout)
        except KafkaException as exc:  # not allowed to describe: the topic exists, carry on
            log.warning("cannot check the cleanup.policy of offsets topic %s: %s", self.topic, kafka_reason(exc))
            return
        policy = configs.get("cleanup.policy")
        if policy is not None and "compact" not in str(policy.value):
            raise OffsetsCorrupt(f"offsets topic {self.topic} has cleanup.policy={policy.value}: positions would expire "
                                 f"with retention; set it to compact (kafka-configs --alter --add-config "
                                 "cleanup.policy=compact) or choose another --offsets-topic")

    def _consumer(self, isolation: str, group: str = "outbox-relay-offsets-reader") -> Consumer:
        return Consumer({
            **self._kafka.librdkafka_config(),
            "client.id": "outbox-relay-offsets",
            "group.id": group,  # never joins or commits: partitions are assigned
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "isolation.level": isolation,
            "enable.partition.eof": True,
            "logger": logging.getLogger("librdkafka"),
        })

    def group_metadata(self, source_id: str) -> Any:
        """What ``send_offsets_to_transaction`` needs to commit the source's group offset."""
        consumer = self._consumer("read_committed", group_id(self.topic, source_id))
        try:
            return consumer.consumer_group_metadata()
        finally:
            consumer.close()

    def group_offset(self, source_id: str, position: SourcePosition, transactional_id: str) -> list[TopicPartition]:
        """The offsets ``send_offsets_to_transaction`` commits with a Kafka transaction: the commit LSN as
        the offset, the position record as its metadata."""
        _, value = encode_position(source_id, position, transactional_id)
        return [TopicPartition(self.topic, GROUP_PARTITION, position.commit_lsn, value.decode())]

    def read_group(self, source_id: str, timeout: float = READ_TIMEOUT) -> Stored | None:
        """The position in the source's own group offset; None when the group has none.

        Per source: no other relay's transaction holds it back. A ``read_committed`` consumer asks
        for stable offsets: a pending commit of this group's own (a transaction this relay's
        producer left open) would wait, but the producer's start aborted it.
        """
        group = group_id(self.topic, source_id)
        consumer = self._consumer("read_committed", group)
        try:
            (tp,) = consumer.committed([TopicPartition(self.topic, GROUP_PARTITION)], timeout=timeout)
        except KafkaException as exc:
            raise KafkaUnavailable(f"cannot read the committed offset of group {group}: {kafka_reason(exc)} "
                                   "(the relay's user needs READ and DESCRIBE on it)") from None
        finally:
            consumer.close()
        if tp.offset < 0 or not tp.metadata:
            return None
        try:
            value = tp.metadata.encode()
            return Stored(decode_position(value), writer_of(value), f"group {group}")
        except ValueError as exc:
            raise OffsetsCorrupt(f"group {group} holds an offset for {self.topic} the relay cannot read: {exc} "
                                 "(another program commits there? delete the group's offsets)") from None

    def read(self, source_id: str, timeout: float = READ_TIMEOUT) -> SourcePosition | None:
        """The newest committed position of ``source_id`` in the topic; None when it never committed one
        (or was reset by a tombstone, a record with its key and no value). See :meth:`read_stored`."""
        stored = self.read_stored(source_id, timeout)
        return stored.position if stored is not None else None

    def read_stored(self, source_id: str, timeout: float = READ_TIMEOUT) -> Stored | None:
        """As :meth:`read`, with the transactional id that wrote the position.

        Reads every partition from the beginning to its last stable offset, as a ``read_committed``
        consumer: records of aborted transactions are never seen. A transaction still open on the
        topic (another relay's) ends the read at its start; when a record of this source's key lies
        beyond (``read_uncommitted`` sees it), the position read may be stale: wait until those
        records settle (committed or aborted), then read again.
        """
        key = source_id.encode()
        deadline = time.monotonic() + timeout
        noted = False
        while True:
            consumer = self._consumer("read_committed")
            try:
                stored, ends = self._read(consumer, key, deadline)
                pending = self._pending(key, ends, deadline)
                if not pending:
                    return stored
                if not noted:
                    log.info("offsets topic %s: records of %s lie beyond the last stable offset (a transaction "
                             "left open there, another relay's?): waiting for them to settle", self.topic, source_id)
                    noted = True
                self._wait_stable(consumer, pending, deadline)
            except KafkaException as exc:
                raise KafkaUnavailable(f"cannot read offsets topic {self.topic}: {kafka_reason(exc)}") from None
            finally:
                consumer.close()

    def _pending(self, key: bytes, stable: dict[int, int], deadline: float) -> dict[int, int]:
        """Partitions holding a record with ``key`` past their last stable offset ``stable``: their log end."""
        consumer = self._consumer("read_uncommitted")
        try:
            ends: dict[int, int] = {}
            for p, start in stable.items():
                _, high = consumer.get_watermark_offsets(TopicPartition(self.topic, p), timeout=30, cached=False)
                if high > start:
                    ends[p] = high
            if not ends:
                return {}
            consumer.assign([TopicPartition(self.topic, p, stable[p]) for p in ends])
            pending: dict[int, int] = {}
            remaining = dict(ends)
            while remaining:
                if time.monotonic() > deadline:
                    return ends  # not seen through: treat as pending
                for msg in consumer.consume(1000, 0.2):
                    err = msg.error()
                    if err is not None and err.code() != KafkaError._PARTITION_EOF:
                        raise KafkaException(err)
                    partition, offset = msg.partition(), msg.offset()
                    if err is None and msg.key() == key and partition is not None and offset is not None \
                            and offset < ends[partition]:
                        pending[partition] = ends[partition]
                for p in [p for p in remaining if _position(consumer, self.topic, p) >= remaining[p]]:
                    del remaining[p]
            return pending
        finally:
            consumer.close()

    def _wait_stable(self, consumer: Consumer, pending: dict[int, int], deadline: float) -> None:
        """Wait until each partition's last stable offset reached ``pending``'s offset."""
        while pending:
            if time.monotonic() > deadline:
                raise KafkaUnavailable(f"could not read offsets topic {self.topic}: a transaction left open on it "
                                       "holds back this source's newest position (it ends when that relay restarts "
                                       "or its transaction times out): try again")
            for p, end in list(pending.items()):
                _, stable = consumer.get_watermark_offsets(TopicPartition(self.topic, p), timeout=30, cached=False)
                if stable >= end:
                    del pending[p]
            if pending:
                time.sleep(0.5)

    def _read(self, consumer: Consumer, key: bytes, deadline: float) -> tuple[Stored | None, dict[int, int]]:
        """Read to the last stable offsets; the newest record of ``key`` and the offsets read to."""
        metadata = consumer.list_topics(timeout=30)
        if self.topic not in metadata.topics:
            return None, {}
        partitions = sorted(metadata.topics[self.topic].partitions)
        stable: dict[int, int] = {}
        ends: dict[int, int] = {}
        for p in partitions:
            # read_committed: the high watermark librdkafka reports is the last stable offset
            low, high = consumer.get_watermark_offsets(TopicPartition(self.topic, p), timeout=30, cached=False)
            stable[p] = high
            if high > low:
                ends[p] = high
        if not ends:
            return None, stable
        consumer.assign([TopicPartition(self.topic, p, OFFSET_BEGINNING) for p in ends])
        found: list[Stored] = []
        timeout = max(0.0, deadline - time.monotonic())
        next_note = time.monotonic() + PROGRESS_EVERY
        while ends:
            now = time.monotonic()
            if now > deadline:
                raise KafkaUnavailable(f"could not read offsets topic {self.topic} to its end in {timeout:.0f} s "
                                       "(a transaction left open on it blocks read_committed readers until it "
                                       "times out): try again")
            if now > next_note:
                log.info("reading offsets topic %s: waiting for partitions %s to reach their end", self.topic,
                         ", ".join(map(str, sorted(ends))))
                next_note = now + PROGRESS_EVERY
            for msg in consumer.consume(1000, 0.2):
                err = msg.error()
                if err is not None and err.code() != KafkaError._PARTITION_EOF:
                    raise KafkaException(err)
                if err is None and msg.key() == key:
                    value = msg.value()
                    if value is None:  # a tombstone: an operator reset this source's position
                        found.clear()
                    else:
                        found.append(Stored(self._decode(msg), writer_of(value), f"topic {self.topic}"))
            done = [p for p in ends if _position(consumer, self.topic, p) >= ends[p]]
            for p in done:
                del ends[p]
        best = newest([f.position for f in found])
        return next((f for f in found if f.position == best), None), stable

    def _decode(self, msg: Any) -> SourcePosition:
        try:
            return decode_position(msg.value())
        except ValueError as exc:
            raise OffsetsCorrupt(f"offsets topic {self.topic} partition {msg.partition()} offset {msg.offset()}: {exc} "
                                 "(another program writes there? choose another --offsets-topic)") from None


def _position(consumer: Consumer, topic: str, partition: int) -> int:
    (tp,) = consumer.position([TopicPartition(topic, partition)])
    return tp.offset if tp.offset >= 0 else 0
