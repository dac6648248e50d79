"""The relay's source positions in a compacted Kafka topic (exactly-once delivery).

Each Kafka transaction of the relay ends with one record in the offsets topic, keyed by the
source id, holding the position of the last source transaction it contains. Written in the same
Kafka transaction as the events, it is visible to a ``read_committed`` reader exactly when they
are. On start the relay reads the newest position for its source id and skips every source
transaction whose commit LSN is not after it.

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


def encode_position(source_id: str, position: SourcePosition) -> tuple[bytes, bytes]:
    """Key and value of an offsets record."""
    value = {
        "version": FORMAT_VERSION,
        "source_id": source_id,
        "commit_lsn": contract.format_lsn(position.commit_lsn),
        "end_lsn": contract.format_lsn(position.end_lsn),
        "xid": position.xid,
    }
    return source_id.encode(), json.dumps(value, separators=(",", ":")).encode()


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

    def read(self, source_id: str, timeout: float = READ_TIMEOUT) -> SourcePosition | None:
        """The newest committed position of ``source_id``; None when it never committed one (or was reset
        by a tombstone, a record with its key and no value).

        Reads every partition from the beginning to the high watermark seen at the start, as a
        ``read_committed`` consumer: records of aborted transactions are never seen. A transaction
        still open on the topic (another relay's) holds the read back until it ends.
        """
        consumer = Consumer({
            **self._kafka.librdkafka_config(),
            "client.id": "outbox-relay-offsets",
            "group.id": "outbox-relay-offsets-reader",  # never joins or commits: partitions are assigned
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "isolation.level": "read_committed",
            "enable.partition.eof": True,
            "logger": logging.getLogger("librdkafka"),
        })
        try:
            return self._read(consumer, source_id.encode(), timeout)
        except KafkaException as exc:
            raise KafkaUnavailable(f"cannot read offsets topic {self.topic}: {kafka_reason(exc)}") from None
        finally:
            consumer.close()

    def _read(self, consumer: Consumer, key: bytes, timeout: float) -> SourcePosition | None:
        metadata = consumer.list_topics(timeout=30)
        if self.topic not in metadata.topics:
            return None
        partitions = sorted(metadata.topics[self.topic].partitions)
        ends: dict[int, int] = {}
        for p in partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(self.topic, p), timeout=30)
            if high > low:
                ends[p] = high
        if not ends:
            return None
        consumer.assign([TopicPartition(self.topic, p, OFFSET_BEGINNING) for p in ends])
        found: list[SourcePosition] = []
        deadline = time.monotonic() + timeout
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
                    if msg.value() is None:  # a tombstone: an operator reset this source's position
                        found.clear()
                    else:
                        found.append(self._decode(msg))
            done = [p for p in ends if _position(consumer, self.topic, p) >= ends[p]]
            for p in done:
                del ends[p]
        return newest(found)

    def _decode(self, msg: Any) -> SourcePosition:
        try:
            return decode_position(msg.value())
        except ValueError as exc:
            raise OffsetsCorrupt(f"offsets topic {self.topic} partition {msg.partition()} offset {msg.offset()}: {exc} "
                                 "(another program writes there? choose another --offsets-topic)") from None


def _position(consumer: Consumer, topic: str, partition: int) -> int:
    (tp,) = consumer.position([TopicPartition(topic, partition)])
    return tp.offset if tp.offset >= 0 else 0
