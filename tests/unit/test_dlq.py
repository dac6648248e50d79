"""The dead-letter mechanism's pure part: letters, their records, re-drive records, filters. No I/O."""
from __future__ import annotations

from datetime import datetime, timezone

from outbox import contract
from outbox.consumers import dlq
from tests.support.records import Rec

NOW = datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=timezone.utc)


def poison() -> Rec:
    return Rec("outbox.customer", 2, 41, b"s1:7", b'{"id": 7}',
               [(contract.H_ID, b"0b6f3c3e-5a4b-4d0e-9f3e-1f2a3b4c5d6e"), (contract.H_TYPE, b"customer.updated")])


def headers(record: contract.Record) -> dict[str, bytes]:
    return dict(record.headers)


def test_a_letter_keeps_the_record_and_adds_the_reason_and_origin() -> None:
    letter = dlq.DeadLetter.of(poison(), "ValueError: bad\npassword=hunter2 in\tthe DSN")
    out = letter.record("readstore-g", NOW)
    assert out.topic == "outbox.customer.dlq" and out.key == b"s1:7" and out.value == b'{"id": 7}'
    h = headers(out)
    assert h[contract.H_ID] == b"0b6f3c3e-5a4b-4d0e-9f3e-1f2a3b4c5d6e"
    assert h[dlq.H_ERROR] == b"ValueError: bad password=*** in the DSN"  # one line, no secret
    assert (h[dlq.H_ATTEMPTS], h[dlq.H_TOPIC], h[dlq.H_PARTITION], h[dlq.H_OFFSET]) == (b"1", b"outbox.customer", b"2", b"41")
    assert h[dlq.H_GROUP] == b"readstore-g" and h[dlq.H_TIME] == b"2026-01-02T03:04:05.000006Z"


def test_long_errors_are_cut() -> None:
    assert len(dlq.DeadLetter.of(poison(), "x" * 5000).error) == dlq.MAX_ERROR


def test_redrive_goes_back_to_the_original_topic_for_the_parking_group_and_counts_attempts() -> None:
    parked = dlq.DeadLetter.of(poison(), "boom").record("g1", NOW)
    as_read = Rec(parked.topic, 0, 0, parked.key, parked.value, parked.headers)
    back = dlq.redrive_record(as_read)
    assert back is not None and back.topic == "outbox.customer" and back.value == b'{"id": 7}'
    h = headers(back)
    assert h[dlq.H_REDRIVE] == b"g1" and h[dlq.H_ATTEMPTS] == b"1" and dlq.H_ERROR not in h
    assert h[contract.H_ID] == b"0b6f3c3e-5a4b-4d0e-9f3e-1f2a3b4c5d6e"  # the original id
    # parked again: one more attempt, the old bookkeeping replaced
    again = dlq.DeadLetter.of(Rec("outbox.customer", 1, 90, back.key, back.value, back.headers), "boom again")
    assert again.attempts == 2
    h2 = [k for k, _ in again.record("g1", NOW).headers]
    assert h2.count(dlq.H_ATTEMPTS) == 1 and dlq.H_REDRIVE not in h2


def test_a_record_that_is_no_dead_letter_is_not_redriven() -> None:
    assert dlq.redrive_record(poison()) is None


def test_redriven_records_reach_only_their_group() -> None:
    plain = poison()
    mine = Rec("t", 0, 1, b"k", b"{}", [(dlq.H_REDRIVE, b"g1")])
    other = Rec("t", 0, 2, b"k", b"{}", [(dlq.H_REDRIVE, b"g2")])
    assert dlq.for_group([plain, mine, other], "g1") == [plain, mine]


def test_filter() -> None:
    parked = dlq.DeadLetter.of(poison(), "DataError: bad").record("g1", NOW)
    rec = Rec(parked.topic, 0, 0, parked.key, parked.value, parked.headers)
    assert dlq.Filter().matches(rec)
    assert dlq.Filter(group="g1", error="DataError", event_type="customer.*", key="s1:*").matches(rec)
    assert not dlq.Filter(group="g2").matches(rec)
    assert not dlq.Filter(event_type="order.*").matches(rec)
    assert dlq.Filter(ids=frozenset({"0b6f3c3e-5a4b-4d0e-9f3e-1f2a3b4c5d6e"})).matches(rec)
    assert not dlq.Filter(max_attempts=1).matches(rec)  # 1 attempt: at the limit
    assert dlq.Filter(max_attempts=2).matches(rec)


def test_filter_parse() -> None:
    import pytest

    from outbox.errors import ConfigError

    f = dlq.Filter.parse(["type=customer.*", "id=a", "id=b", "attempts-below=3", "error=DataError"], group="g")
    assert f == dlq.Filter(group="g", error="DataError", event_type="customer.*", ids=frozenset({"a", "b"}), max_attempts=3)
    for bad in ("type", "colour=red", "attempts-below=0"):
        with pytest.raises(ConfigError, match="invalid --filter"):
            dlq.Filter.parse([bad])
