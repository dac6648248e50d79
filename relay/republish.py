"""``outbox republish-parked``: publish events the relay parked, with their own id and position.

A parked event (outbox.parked, issue #19 item 14) already has a place in the event stream: the
id, commit LSN, transaction index and xid the relay gave its marker. Emitting it again through the
outbox would give it a new id and a newer position, and a sink would apply a second copy as the
newest change of its aggregate. This publishes the record the relay would have published: same
topic, key, value and ce_* headers (ce_time: the row's created_at, the commit time is not kept;
ce_history: the store's current WAL history), so a repeat (after a crash, or a second run) is a
duplicate every sink already drops. The row is deleted only after Kafka acknowledged its copy.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import psycopg

from outbox import contract
from outbox.config import RepublishSettings
from outbox.dsn import connect, describe, first_line
from outbox.errors import DatabaseUnavailable, KafkaUnavailable, PreconditionFailed

Echo = Callable[[str], None]

# the relay's parked events (the capture trigger's have a table_name and no position)
SELECT_PARKED = (
    f"SELECT id::text, aggregatetype, aggregateid, type, payload::text, origin, traceparent, created_at, parked_at,"
    f" commit_lsn::text, xid, txseq, topic FROM {contract.SCHEMA}.{contract.PARKED_TABLE}"
    " WHERE table_name IS NULL AND (cardinality(%(ids)s::uuid[]) = 0 OR id = ANY(%(ids)s::uuid[]))"
    " ORDER BY commit_lsn, txseq"
)
DELETE_PARKED = f"DELETE FROM {contract.SCHEMA}.{contract.PARKED_TABLE} WHERE id = %s::uuid"
PRODUCER_MAX_BYTES = 1_000_000_000  # librdkafka's ceiling: the broker's and the topic's limits decide


def store_history(dsn: str) -> str | None:
    """The store's WAL history (IDENTIFY_SYSTEM, as the relay reads it); None when it cannot tell."""
    try:
        with connect(dsn, autocommit=True, replication="database", application_name="outbox-republish",
                     connect_timeout=10) as conn:
            result = conn.pgconn.exec_(b"IDENTIFY_SYSTEM")
            systemid, timeline = result.get_value(0, 0), result.get_value(0, 1)
    except (psycopg.Error, IndexError):
        return None
    if systemid is None or timeline is None:
        return None
    return contract.history_for(systemid.decode(), int(timeline))


def republish(settings: RepublishSettings, *, echo: Echo) -> int:
    """Publish the parked events (all, or ``settings.ids``); returns how many (would be) published."""
    from confluent_kafka import KafkaException, Producer

    where = describe(settings.dsn)
    history = store_history(settings.dsn)
    try:
        with connect(settings.dsn, autocommit=True, application_name="outbox-republish", connect_timeout=10) as conn:
            rows = conn.execute(SELECT_PARKED, {"ids": list(settings.ids)}).fetchall()
            missing = set(settings.ids) - {r[0] for r in rows}
            if missing:
                raise PreconditionFailed(f"no event parked by the relay in {contract.SCHEMA}.{contract.PARKED_TABLE} "
                                         f"on {where} has id {', '.join(sorted(missing))}")
            records: list[tuple[str, contract.Record]] = []
            for (event_id, aggregatetype, aggregateid, type_, payload, origin, traceparent, created_at, parked_at,
                 lsn, xid, txseq, parked_for) in rows:
                row = contract.OutboxRow(event_id, aggregatetype, aggregateid, type_, payload, origin, traceparent)
                try:
                    record = contract.build_record(
                        row, source_id=settings.source_id, prefix=settings.topic_prefix,
                        position=contract.Position(contract.parse_lsn(lsn), txseq), commit_time=created_at or parked_at,
                        xid=xid, history=history)
                except contract.ContractError as exc:
                    raise PreconditionFailed(f"parked event {event_id}: {exc}: correct it first (UPDATE "
                                             f"{contract.SCHEMA}.{contract.PARKED_TABLE} SET aggregatetype = ... "
                                             f"WHERE id = '{event_id}')") from None
                if record.topic != parked_for and parked_for != contract.unroutable_topic(settings.topic_prefix):
                    raise PreconditionFailed(f"parked event {event_id} was meant for topic {parked_for}, not "
                                             f"{record.topic}: give the relay's --topic-prefix")
                records.append((event_id, record))
                echo(f"{event_id} -> {record.topic} at {lsn}#{txseq} ({contract.record_size(record)} bytes)")
            if settings.dry_run or not records:
                return len(records)
            config: dict[str, Any] = {**settings.kafka.librdkafka_config(), "acks": "all", "enable.idempotence": True,
                                      "partitioner": contract.PARTITIONER, "message.max.bytes": PRODUCER_MAX_BYTES}
            producer = Producer(config)
            done = 0
            for event_id, record in records:  # one at a time: a row goes only once its copy is acknowledged
                errors: list[Any] = []

                def report(err: Any, _msg: Any, got: list[Any] = errors) -> None:
                    got.append(err)

                try:
                    producer.produce(record.topic, record.value, record.key, headers=record.headers,  # type: ignore[arg-type]
                                     on_delivery=report)
                except KafkaException as exc:
                    raise KafkaUnavailable(f"cannot publish parked event {event_id} to {record.topic}: {exc}; "
                                           f"{done} re-published before it") from None
                if producer.flush(60) or not errors or errors[0] is not None:
                    why = errors[0] if errors and errors[0] is not None else "not acknowledged within 60 s"
                    raise KafkaUnavailable(f"cannot publish parked event {event_id} to {record.topic}: {why}; "
                                           f"{done} re-published before it (it stays parked)")
                conn.execute(DELETE_PARKED, (event_id,))
                done += 1
            return done
    except psycopg.Error as exc:
        raise DatabaseUnavailable(f"cannot read {contract.SCHEMA}.{contract.PARKED_TABLE} on {where}: {first_line(exc)}") from None
