"""Pins the event contract: topic, key, value and headers (docs/event-contract.md)."""
from datetime import datetime, timezone

import pytest

from outbox import contract
from outbox.contract import ContractError, OutboxRow, Position


def _row(**kw: str) -> OutboxRow:
    base = dict(id="6c0f7d6e-8a51-4f7e-9d1e-0b7d9a3c2f10", aggregatetype="customer", aggregateid="42",
                type="customer.updated", payload='{"id": 42, "name": "Zoë"}')
    base.update(kw)
    return OutboxRow(**base)  # type: ignore[arg-type]


def test_record_follows_the_contract() -> None:
    t = datetime(2026, 11, 23, 10, 0, 0, 123456, tzinfo=timezone.utc)
    r = contract.build_record(_row(traceparent="00-abc-def-01"), source_id="store7", prefix="pos",
                              position=Position(0x1_0000_00A0, 3), commit_time=t, xid=991)
    assert r.topic == "pos.customer"
    assert r.key == b"store7:42"
    assert r.value == '{"id": 42, "name": "Zoë"}'.encode()
    assert dict(r.headers) == {
        "ce_specversion": b"1.0",
        "ce_id": b"6c0f7d6e-8a51-4f7e-9d1e-0b7d9a3c2f10",
        "ce_source": b"/stores/store7",
        "ce_type": b"customer.updated",
        "ce_time": b"2026-11-23T10:00:00.123456Z",
        "ce_subject": b"42",
        "content-type": b"application/json",
        "ce_aggregatetype": b"customer",
        "ce_commitlsn": b"1/A0",
        "ce_txseq": b"3",
        "ce_xid": b"991",
        "traceparent": b"00-abc-def-01",
    }


def test_origin_header_only_when_set() -> None:
    t = datetime(2026, 1, 1, tzinfo=timezone.utc)
    plain = contract.build_record(_row(), source_id="s", prefix="p", position=Position(1, 0), commit_time=t, xid=1)
    assert "ce_origin" not in dict(plain.headers)
    crm = contract.build_record(_row(origin="crm"), source_id="s", prefix="p", position=Position(1, 0), commit_time=t, xid=1)
    assert dict(crm.headers)["ce_origin"] == b"crm"


def test_round_trip_through_parse_record() -> None:
    t = datetime(2026, 11, 23, 10, 0, 0, 5, tzinfo=timezone.utc)
    r = contract.build_record(_row(), source_id="s1", prefix="p", position=Position(77, 2), commit_time=t, xid=5)
    e = contract.parse_record(r.headers, r.value)
    assert (e.id, e.source_id, e.aggregate_type, e.aggregate_id, e.type) == (
        "6c0f7d6e-8a51-4f7e-9d1e-0b7d9a3c2f10", "s1", "customer", "42", "customer.updated")
    assert e.time == t and e.position == Position(77, 2) and e.payload == r.value


def test_missing_header_is_a_contract_error() -> None:
    with pytest.raises(ContractError, match="ce_id"):
        contract.parse_record([("ce_source", b"/stores/x")], b"{}")


@pytest.mark.parametrize("bad", ["", "a b", "x/y", "é"])
def test_aggregate_type_must_name_a_topic(bad: str) -> None:
    with pytest.raises(ContractError):
        contract.topic_for("outbox", bad)


def test_lsn_text_form() -> None:
    assert contract.format_lsn(0x16B3748) == "0/16B3748"
    assert contract.parse_lsn("1/A0") == 0x1_0000_00A0
    assert contract.pg_timestamp_to_datetime(0) == datetime(2000, 1, 1, tzinfo=timezone.utc)


def test_pgoutput_commit_times_format_as_their_datetimes_do() -> None:
    for us in (0, 1, 999_999, 1_000_000, 817_254_245_123_456, 817_254_245_000_000, -1, -86_400_000_001):
        assert contract.format_pg_time(us) == contract.format_time(contract.pg_timestamp_to_datetime(us)), us
    assert contract.format_pg_time(817_254_245_000_007) == "2025-11-23T23:04:05.000007Z"


def test_a_parked_event_leaves_a_small_marker_with_its_headers_and_no_payload() -> None:
    from outbox.contract import OutboxRow, TxnContext, parked_marker, record_size

    context = TxnContext.of(source_id="s1", prefix="p", commit_lsn=0x16B3748,
                            commit_time=datetime(2026, 1, 1, tzinfo=timezone.utc), xid=42)
    row = OutboxRow(id="0b6e7f5c-0000-4000-8000-000000000001", aggregatetype="customer", aggregateid="7",
                    type="customer.created", payload='{"blob": "' + "x" * 5_000_000 + '"}', origin=None, traceparent=None)
    record = context.record(row, 3)
    marker = parked_marker(record, "Broker: Message size too large", 0x16B3748)
    assert marker.topic == "p.customer.dlq" and marker.key == record.key and marker.value == b""
    headers = dict(marker.headers)
    assert headers["ce_id"] == row.id.encode() and headers["ce_type"] == b"customer.created"
    assert headers["ce_txseq"] == b"3" and headers["ce_source"] == b"/stores/s1"
    assert headers["dlq_error"] == b"Broker: Message size too large" and headers["dlq_lsn"] == b"0/16B3748"
    assert int(headers["dlq_size"]) == record_size(record) > 5_000_000
    assert record_size(marker) < 2_000


def test_a_row_read_from_the_wal_as_bytes_makes_the_same_record_as_its_text_form() -> None:
    from outbox.contract import RawRow, TxnContext

    text = OutboxRow(id="0b6e7f5c-0000-4000-8000-000000000001", aggregatetype="customer", aggregateid="7:ü",
                     type="customer.updated", payload='{"name": "Grüße ☃"}', origin="crm", traceparent=None)
    raw = text.encoded()
    assert raw == RawRow(text.id.encode(), b"customer", "7:ü".encode(), b"customer.updated",
                         '{"name": "Grüße ☃"}'.encode(), b"crm", None)
    assert raw.decoded() == text
    context = TxnContext.of(source_id="s1", prefix="p", commit_lsn=0x16B3748, commit_time=817_254_245_000_007, xid=42)
    assert context.record_raw(raw, 2) == context.record(text, 2)
    record = context.record_raw(raw, 2)
    assert record.topic == "p.customer" and record.key == "s1:7:ü".encode() and record.value == raw.payload
    assert dict(record.headers)["ce_time"] == b"2025-11-23T23:04:05.000007Z"
    with pytest.raises(ContractError, match="cannot name a Kafka topic"):
        context.record_raw(RawRow(b"1", b"bad topic", b"7", b"x", b"{}"), 0)


def test_ce_history_is_one_shared_header_of_the_transaction_and_parsed_back() -> None:
    from outbox.contract import TxnContext

    assert contract.H_HISTORY == "ce_history" and contract.history_for(7334781021562914113, 2) == "7334781021562914113.2"
    assert contract.SNAPSHOT_COMPLETE_TYPE == "outbox.snapshot_complete"
    context = TxnContext.of(source_id="s1", prefix="p", commit_lsn=1, commit_time=0, xid=1, history=b"73.2")
    assert ("ce_history", b"73.2") in context.shared  # built once per transaction, not per event
    record = context.record(_row(), 0)
    assert dict(record.headers)["ce_history"] == b"73.2"
    assert contract.parse_record(record.headers, record.value).history == "73.2"
    plain = TxnContext.of(source_id="s1", prefix="p", commit_lsn=1, commit_time=0, xid=1).record(_row(), 0)
    assert "ce_history" not in dict(plain.headers) and contract.parse_record(plain.headers, plain.value).history is None
