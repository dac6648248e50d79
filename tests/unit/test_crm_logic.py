"""The CRM sink's pure logic: Retry-After, backoff, token bucket, status policy, mapping, per-key order."""
from __future__ import annotations

import json
import random
from datetime import datetime, timezone
from email.utils import formatdate

import pytest

from outbox import contract
from outbox.consumers.crm_logic import (
    AUTH,
    DEFAULT_MAPPINGS,
    OK,
    PERMANENT,
    RETRY,
    KeyScheduler,
    MappingError,
    Pending,
    TokenBucket,
    backoff,
    classify_status,
    load_mappings,
    parse_retry_after,
)
from outbox.dev.crm_reference import Faults, parse_items, retry_after_header, validate_fields
from outbox.errors import ConfigError


# --------------------------------------------------------------------------- Retry-After
def test_retry_after_seconds_and_http_date() -> None:
    now = 1_700_000_000.0
    assert parse_retry_after("120", now) == 120.0
    assert parse_retry_after(" 0 ", now) == 0.0
    assert parse_retry_after(formatdate(now + 30, usegmt=True), now) == pytest.approx(30, abs=1)
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now) == 0.0  # in the past: go now
    for bad in (None, "", "soon", "-5", "1.5", "Wed, 99 Foo 2015"):
        assert parse_retry_after(bad, now) is None


def test_reference_crm_writes_both_retry_after_forms_readably() -> None:
    rng = random.Random(1)
    now = 1_700_000_000.0
    assert retry_after_header(2, "seconds", rng, now) == "2"
    date = retry_after_header(2, "date", rng, now)
    assert date.endswith("GMT") and parse_retry_after(date, now) == pytest.approx(2, abs=1)


# --------------------------------------------------------------------------- backoff, bucket, policy
def test_backoff_grows_exponentially_with_jitter_and_a_cap() -> None:
    rng = random.Random(7)
    for attempt, ceiling in ((1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (10, 30.0), (50, 30.0)):
        delays = [backoff(attempt, 0.5, 30.0, rng) for _ in range(200)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert max(delays) - min(delays) > ceiling / 10  # jittered, not a fixed sleep


def test_token_bucket_allows_a_burst_then_the_rate() -> None:
    bucket = TokenBucket(rate=10, burst=3, now=0.0)
    assert [bucket.reserve(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.reserve(0.0) == pytest.approx(0.1)  # borrowed: wait one token's time
    assert bucket.reserve(0.0) == pytest.approx(0.2)
    assert bucket.reserve(1.0) == 0.0  # refilled (never above the burst)
    waits = [bucket.reserve(2.0) for _ in range(23)]
    assert waits[2] == 0.0 and waits[-1] == pytest.approx(2.0)  # 20 more calls take 2 s at 10/s
    with pytest.raises(ValueError):
        TokenBucket(rate=0, burst=1, now=0.0)


@pytest.mark.parametrize("status,verdict", [(200, OK), (201, OK), (204, OK), (400, PERMANENT), (404, PERMANENT),
                                            (409, PERMANENT), (422, PERMANENT), (401, AUTH), (403, AUTH),
                                            (408, RETRY), (429, RETRY), (500, RETRY), (502, RETRY), (503, RETRY)])
def test_status_policy(status: int, verdict: str) -> None:
    assert classify_status(status) == verdict


# --------------------------------------------------------------------------- mapping
def event(aggregate: str, aggregate_id: str, payload: object, type_: str = "customer.updated",
          origin: str | None = None) -> contract.ReceivedEvent:
    return contract.ReceivedEvent(id="6f1c0b0e-8d1f-4a53-9b7e-0a6d2f4f5a11", source_id="store7", aggregate_type=aggregate,
                                  aggregate_id=aggregate_id, type=type_, time=datetime.now(timezone.utc),
                                  position=contract.Position(0x16B3748, 2), origin=origin,
                                  payload=json.dumps(payload).encode())


def test_customer_maps_to_a_contact_by_external_id() -> None:
    item = DEFAULT_MAPPINGS["customer"].item(event("customer", "42", {"id": 42, "name": "Zoë", "email": "z@x.de",
                                                                      "loyalty_pts": 5, "created_at": "x"}))
    assert item["external_id"] == "store7:42"
    assert item["fields"] == {"name": "Zoë", "email": "z@x.de", "loyalty_points": 5}
    assert item["active"] is True
    assert item["idempotency_key"] == "6f1c0b0e-8d1f-4a53-9b7e-0a6d2f4f5a11"
    assert item["meta"]["position"] == "0/16B3748#2"


def test_order_references_its_contact_and_a_delete_marks_inactive() -> None:
    item = DEFAULT_MAPPINGS["order"].item(event("order", "9", {"id": 9, "customer_id": 42, "status": "paid",
                                                               "total": "12.50"}, "order.deleted"))
    assert item["fields"] == {"status": "paid", "total": "12.50", "contact": "store7:42"}
    assert item["active"] is False


def test_unmappable_payloads_are_permanent() -> None:
    with pytest.raises(MappingError):
        DEFAULT_MAPPINGS["customer"].item(event("customer", "1", [1, 2]))
    bad = event("customer", "1", {})
    bad = contract.ReceivedEvent(**{**{f: getattr(bad, f) for f in bad.__slots__}, "payload": b"{nope"})
    with pytest.raises(MappingError):
        DEFAULT_MAPPINGS["customer"].item(bad)


def test_the_way_back_maps_crm_fields_to_columns() -> None:
    assert DEFAULT_MAPPINGS["customer"].columns({"name": "A", "phone": "1", "unknown": 3}) == {"name": "A", "phone": "1"}


def test_mapping_file(tmp_path: object) -> None:
    from pathlib import Path

    path = Path(str(tmp_path)) / "m.toml"
    path.write_text('[customer]\nkind = "leads"\nfields = { full_name = "name" }\ntable = "app.users"\n')
    m = load_mappings(str(path))["customer"]
    assert (m.kind, m.fields, m.table, m.key_column) == ("leads", {"full_name": "name"}, "app.users", "id")
    path.write_text('[customer]\nkind = "leads"\nfields = { full_name = 3 }\n')
    with pytest.raises(ConfigError, match="fields"):
        load_mappings(str(path))
    path.write_text('[customer]\nkind = "leads"\nfields = {}\ncolour = "red"\n')
    with pytest.raises(ConfigError, match="colour"):
        load_mappings(str(path))


# --------------------------------------------------------------------------- per-key scheduling
def pending(offset: int, key: str, tp: tuple[str, int] = ("t", 0), kind: str = "contacts") -> Pending:
    return Pending(tp, offset, (tp[0], key.encode()), kind, {"n": offset})


def test_a_key_waits_behind_its_retried_event_while_other_keys_flow() -> None:
    s = KeyScheduler()
    a1, b2, a3, c4 = pending(1, "a"), pending(2, "b"), pending(3, "a"), pending(4, "c")
    for p in (a1, b2, a3, c4):
        s.add(p)
    first = s.take("contacts", 10, now=0)
    assert first == [a1, b2, c4]  # one per key, the oldest of each
    s.retry(a1, at=5.0)  # a1 failed: a3 must not overtake it
    s.release(b2)
    s.release(c4)
    assert s.take("contacts", 10, now=1.0) == []
    assert s.next_due() == 5.0
    assert s.finish([b2, c4]) == {}  # offset 1 is not done: nothing to commit yet
    assert s.take("contacts", 10, now=5.0) == [a1]
    s.release(a1)
    assert s.take("contacts", 10, now=5.0) == [a3]
    assert s.finish([a1]) == {("t", 0): 3}  # 1, 2 done; 3 still in flight
    s.release(a3)
    assert s.finish([a3]) == {("t", 0): 5}
    assert s.idle()


def test_skipped_and_held_offsets_keep_partition_order() -> None:
    s = KeyScheduler()
    s.skip(("t", 1), 10)
    assert s.committable() == {("t", 1): 11}
    held = pending(11, "x", ("t", 1))
    s.hold(held)  # bound for the dead-letter topic
    s.skip(("t", 1), 12)
    assert s.committable() == {("t", 1): 11}
    s.finish([held])
    assert s.committable() == {("t", 1): 13}


def test_batches_are_per_kind_and_bounded() -> None:
    s = KeyScheduler()
    for n in range(5):
        s.add(pending(n, f"k{n}"))
    s.add(pending(5, "o", kind="orders"))
    assert sorted(s.kinds_ready(0)) == ["contacts", "orders"]
    assert len(s.take("contacts", 2, 0)) == 2
    assert len(s.take("contacts", 10, 0)) == 3
    assert [p.offset for p in s.take("orders", 10, 0)] == [5]
    assert s.buffered(("t", 0)) == 6


def test_dropping_a_partition_forgets_its_work_and_ignores_late_outcomes() -> None:
    s = KeyScheduler()
    p0, p1, q = pending(0, "a"), pending(1, "a"), pending(0, "z", ("t", 1))
    for p in (p0, p1, q):
        s.add(p)
    assert s.take("contacts", 10, 0) == [p0, q]
    s.drop([("t", 0)])
    s.release(p0)  # the call ends after the revocation: ignored
    s.retry(p0, 0)
    assert s.finish([p0]) == {}
    assert s.buffered(("t", 0)) == 0 and s.buffered(("t", 1)) == 1
    s.add(pending(0, "a"))  # the new owner's fetch (or ours again) starts over
    assert [p.offset for p in s.take("contacts", 10, 0)] == [0]


# --------------------------------------------------------------------------- reference CRM rules
def test_reference_crm_request_rules() -> None:
    items = parse_items({"records": [{"external_id": "s:1", "fields": {"name": "A"}, "idempotency_key": "k"}]})
    assert items[0].external_id == "s:1" and items[0].active is True
    for body in ({"records": []}, {"records": [{"external_id": ""}]}, {"nope": 1},
                 {"records": [{"external_id": "a"}, {"external_id": "a"}]},
                 {"records": [{"external_id": "a", "active": "yes"}]}):
        with pytest.raises(ValueError):
            parse_items(body)
    assert validate_fields("contacts", {"email": "broken"}) is not None
    assert validate_fields("contacts", {"email": "a@b.c", "name": "A"}) is None
    assert validate_fields("orders", {"total": "x"}) is not None
    assert Faults.from_json({"error_rate": 0.15, "rate_limit_rate": 0.15}).error_rate == 0.15
    for bad in ({"error_rate": 2}, {"colour": 1}, {"retry_after_form": "never"}, {"error_rate": 0.6, "rate_limit_rate": 0.6}):
        with pytest.raises(ValueError):
            Faults.from_json(bad)


# --------------------------------------------------------------------------- the way back: exact numbers, changed fields
def test_a_notification_keeps_its_numbers_exact_and_names_what_the_crm_had() -> None:
    from outbox.consumers.crm_logic import column_json, parse_change

    body = (b'{"id": "d", "kind": "contacts", "external_id": "s1:7", "fields": {"balance": 12345678901234567.89},'
            b' "previous": {"balance": 0.10}}')
    change = parse_change(body)
    mapping = DEFAULT_MAPPINGS["customer"]
    assert column_json(mapping.columns(change.fields)) == '{"balance": "12345678901234567.89"}'  # never a float
    assert column_json(mapping.previous_columns(change) or {}) == '{"balance": "0.10"}'
    assert mapping.previous_columns(parse_change(body.replace(b', "previous": {"balance": 0.10}', b""))) is None
