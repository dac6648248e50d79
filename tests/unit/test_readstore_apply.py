"""The read store's pure logic: parsing, poison classification, batch reduction. No I/O."""
from __future__ import annotations

import json
import uuid
from datetime import datetime, timezone

import pytest

from outbox import contract
from outbox.consumers.kafka import topic_pattern
from outbox.consumers.readstore import Rejected, Row, check_payload, classify, plan_batch, row_columns
from tests.support.records import Rec

T0 = datetime(2025, 3, 1, 12, 0, 0, 123456, tzinfo=timezone.utc)


def event(aggregate_id: str, etype: str, lsn: int, seq: int = 0, *, offset: int = 0, partition: int = 0,
          aggregate: str = "customer", source: str = "s1", payload: object | None = None) -> Rec:
    row = contract.OutboxRow(id=str(uuid.uuid4()), aggregatetype=aggregate, aggregateid=aggregate_id,
                             type=f"{aggregate}.{etype}",
                             payload=json.dumps(payload if payload is not None else {"id": aggregate_id, "v": lsn}))
    r = contract.build_record(row, source_id=source, prefix="outbox", position=contract.Position(lsn, seq),
                              commit_time=T0, xid=lsn)
    return Rec(r.topic, partition, offset, r.key, r.value, r.headers)


def rows_by_id(records: list[Rec]) -> dict[str, Row]:
    return {r.aggregate_id: r for r in plan_batch(records).rows}


# --------------------------------------------------------------------------- classify
def test_classify_reads_the_contract() -> None:
    row = classify(event("42", "updated", 0x16B3748, 3, payload={"name": "Ada"}))
    assert isinstance(row, Row)
    assert row.key == ("s1", "customer", "42")
    assert row.position == (0x16B3748, 3)
    assert json.loads(row.payload) == {"name": "Ada"}
    assert row.event_type == "customer.updated" and not row.deleted
    assert row.committed_at == T0


def test_deleted_event_is_a_tombstone() -> None:
    row = classify(event("42", "deleted", 10))
    assert isinstance(row, Row) and row.deleted


def test_kafka_tombstone_value_is_json_null() -> None:
    rec = event("42", "deleted", 10)
    rec.value = None
    row = classify(rec)
    assert isinstance(row, Row) and row.payload == "null"


def _without(rec: Rec, header: str) -> Rec:
    rec.headers = [(k, v) for k, v in rec.headers if k != header]
    return rec


def _with(rec: Rec, header: str, value: bytes) -> Rec:
    rec.headers = [(k, value if k == header else v) for k, v in rec.headers]
    return rec


@pytest.mark.parametrize("make, reason", [
    (lambda: _without(event("1", "updated", 5, offset=7), contract.H_ID), "ce_id"),
    (lambda: _without(event("1", "updated", 5), contract.H_COMMIT_LSN), "ce_commitlsn"),
    (lambda: _with(event("1", "updated", 5), contract.H_COMMIT_LSN, b"nonsense"), "malformed"),
    (lambda: _with(event("1", "updated", 5), contract.H_TXSEQ, b"-1"), "out of range"),
    (lambda: _with(event("1", "updated", 5), contract.H_TXSEQ, str(2**31).encode()), "out of range"),
    (lambda: _with(event("1", "updated", 5), contract.H_ID, b"not-a-uuid"), "UUID"),
    (lambda: _with(event("1", "updated", 5), contract.H_SOURCE, b"/elsewhere/1"), "ce_source"),
    (lambda: _with(event("1", "updated", 5), contract.H_SUBJECT, b"a\x00b"), "NUL"),
    (lambda: _with(event("1", "updated", 5), contract.H_TIME, b"2025-03-01T12:00:00"), "time zone"),
], ids=["no-id", "no-lsn", "bad-lsn", "negative-seq", "seq-overflow", "id-not-uuid", "bad-source", "nul-id",
        "naive-time"])
def test_contract_violations_are_poison(make, reason: str) -> None:  # type: ignore[no-untyped-def]
    rec = make()
    item = classify(rec)
    assert isinstance(item, Rejected)
    assert reason.lower() in item.error.lower()
    assert (item.topic, item.partition, item.offset) == (rec.topic, rec.partition, rec.offset)
    assert item.value == rec.value and item.key == rec.key


@pytest.mark.parametrize("value", [b"{not json", b'{"a": NaN}', b"Infinity", b"\xff\xfe{}", b'{"a": "x\\u0000y"}', b""],
                         ids=["broken", "nan", "infinity", "not-utf8", "nul-escape", "empty"])
def test_invalid_json_payload_is_poison(value: bytes) -> None:
    rec = event("1", "updated", 5)
    rec.value = value
    assert isinstance(classify(rec), Rejected)


def test_escaped_backslash_before_u0000_is_fine() -> None:
    assert check_payload(b'{"path": "C:\\\\u0000"}') == '{"path": "C:\\\\u0000"}'


def test_rejected_records_are_kept_whole_for_the_dead_letter_topic() -> None:
    rec = _without(event("1", "updated", 5), contract.H_ID)
    rec.headers.append(("x-bin", b"\xff\x00"))
    item = classify(rec)
    assert isinstance(item, Rejected)
    assert item.headers == tuple(rec.headers) and item.value == rec.value and item.attempts == 1
    assert item.error.startswith(("ValueError", "UnicodeDecodeError", "ContractError"))


# --------------------------------------------------------------------------- reduction
def test_per_key_the_greatest_position_wins() -> None:
    rows = rows_by_id([
        event("a", "created", 100, 0, offset=0),
        event("b", "created", 100, 1, offset=1),
        event("a", "updated", 200, 5, offset=2),
        event("a", "updated", 200, 4, offset=3),  # same transaction, earlier in it: older
        event("b", "updated", 150, 0, offset=4),
    ])
    assert rows["a"].position == (200, 5)
    assert rows["b"].position == (150, 0)


def test_delete_wins_over_older_updates_and_loses_to_newer() -> None:
    rows = rows_by_id([
        event("a", "updated", 100), event("a", "deleted", 300), event("a", "updated", 200),
        event("b", "deleted", 100), event("b", "created", 400),
    ])
    assert rows["a"].deleted and rows["a"].position == (300, 0)
    assert not rows["b"].deleted and rows["b"].position == (400, 0)


def test_a_replay_of_older_events_changes_nothing() -> None:
    fresh = [event("a", "created", 100), event("a", "updated", 200), event("b", "created", 150)]
    replay = [event("a", "created", 100), event("b", "created", 150), event("a", "updated", 50)]
    first = rows_by_id(fresh)
    both = rows_by_id(fresh + replay)
    assert {k: r.position for k, r in both.items()} == {k: r.position for k, r in first.items()}
    assert both["a"].payload == first["a"].payload


def test_keys_are_per_source_and_aggregate_type() -> None:
    plan = plan_batch([event("1", "created", 10, source="s1"), event("1", "created", 5, source="s2"),
                       event("1", "created", 7, aggregate="order")])
    assert sorted(r.key for r in plan.rows) == [("s1", "customer", "1"), ("s1", "order", "1"), ("s2", "customer", "1")]


def test_offsets_cover_rejected_records_too() -> None:
    good = event("a", "created", 10, offset=41, partition=2)
    bad = _without(event("b", "created", 11, offset=42, partition=2), contract.H_ID)
    other = event("c", "created", 12, offset=7, partition=0)
    plan = plan_batch([good, bad, other])
    assert plan.offsets == {("outbox.customer", 2): 43, ("outbox.customer", 0): 8}
    assert plan.received == 3 and len(plan.rows) == 2 and len(plan.rejected) == 1


def test_row_columns_line_up() -> None:
    rows = plan_batch([event("a", "created", 0x1_0000_0010, 2), event("b", "deleted", 5)]).rows
    cols = row_columns(rows)
    assert len(cols) == 10 and all(len(c) == 2 for c in cols)
    assert cols[6] == ["1/10", "0/5"] and cols[7] == [2, 0] and cols[9] == [False, True]


# --------------------------------------------------------------------------- subscription
@pytest.mark.parametrize("topic, matches", [
    ("outbox.customer", True), ("outbox.sales.order", True), ("outbox.customer.dlq", False),
    ("outbox", False), ("outbox.", False), ("outboxx.customer", False), ("other.customer", False),
    ("outbox.dlq", True),  # the aggregate type "dlq", not a dead-letter topic
])
def test_topic_pattern(topic: str, matches: bool) -> None:
    import re

    assert bool(re.match(topic_pattern("outbox"), topic)) is matches


def test_topic_pattern_escapes_the_prefix() -> None:
    import re

    assert re.match(topic_pattern("a.b"), "a.b.customer")
    assert not re.match(topic_pattern("a.b"), "aXb.customer")


def test_a_snapshot_is_applied_like_an_upsert_ordered_by_its_position() -> None:
    rows = rows_by_id([event("1", "snapshot", 5, offset=0), event("1", "updated", 6, offset=1),
                       event("2", "snapshot", 9, offset=2)])
    assert rows["1"].event_type == "customer.updated" and rows["2"].event_type == "customer.snapshot"
    assert not rows["2"].deleted


def test_a_reconcile_marker_is_no_entity_and_carries_the_start_position() -> None:
    row = contract.OutboxRow(id=str(uuid.uuid4()), aggregatetype="customer", aggregateid="pos.customers",
                             type=contract.SNAPSHOT_COMPLETE_TYPE,
                             payload=json.dumps({"aggregate_type": "customer", "start_lsn": "1/A0", "run": 3}))
    r = contract.build_record(row, source_id="s1", prefix="outbox", position=contract.Position(0x2_0000_0000, 0),
                              commit_time=T0, xid=9)
    plan = plan_batch([Rec(r.topic, 0, 0, r.key, r.value, r.headers), event("1", "created", 5)])
    assert [x.aggregate_id for x in plan.rows] == ["1"]
    assert [(m.aggregate_type, m.reconcile_from) for m, _ in plan.marks] == [("customer", 0x1_0000_00A0)]
    bad = contract.build_record(contract.OutboxRow(id=str(uuid.uuid4()), aggregatetype="customer", aggregateid="x",
                                                   type=contract.SNAPSHOT_COMPLETE_TYPE, payload="{}"),
                                source_id="s1", prefix="outbox", position=contract.Position(1, 0), commit_time=T0, xid=1)
    assert isinstance(classify(Rec(bad.topic, 0, 1, bad.key, bad.value, bad.headers)), Rejected)
