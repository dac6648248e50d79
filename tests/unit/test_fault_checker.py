"""The fault suite's checker on hand-made inputs: it must name every broken promise."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from outbox.consumers.kafka import FAULT_KILL_AFTER_SINK_COMMIT, fault_kill_after
from outbox.errors import ConfigError
from tests.faults import report
from tests.faults.checker import CheckResult, SeenEvent, SourceEvent, WriterRecord, compare, seen_event

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def src(event_id: str, xid: int, aggregate_id: str = "1", at: int = 0) -> SourceEvent:
    return SourceEvent(event_id, xid, "customer", aggregate_id, T0 + timedelta(microseconds=at))


def rec(event_id: str, xid: int, lsn: int, seq: int = 0, *, key: str = "s1:1", partition: int = 0,
        offset: int = 0) -> SeenEvent:
    return SeenEvent("p.customer", partition, offset, key, event_id, xid, lsn, seq)


def numbered(*records: SeenEvent) -> list[SeenEvent]:
    """Give records increasing offsets in the order written, per partition."""
    out, next_offset = [], {}
    for r in records:
        offset = next_offset.get(r.partition, 0)
        next_offset[r.partition] = offset + 1
        out.append(SeenEvent(r.topic, r.partition, offset, r.key, r.id, r.xid, r.commit_lsn, r.txseq))
    return out


# Two committed transactions (xid 10: a, b; xid 11: c) and a rolled-back one (xid 12).
SOURCE = [src("a", 10, at=1), src("b", 10, at=2), src("c", 11, at=3)]
WRITER = WriterRecord(committed={10, 11}, rolled_back={12})
GOOD = numbered(rec("a", 10, 100, 0), rec("b", 10, 100, 1), rec("c", 11, 200, 0))


def test_a_clean_run_has_no_problems() -> None:
    result = compare(SOURCE, GOOD, WRITER)
    assert result.problems(duplicates_allowed=False) == []
    assert (result.expected, result.records, result.duplicates) == (3, 3, 0)


def test_a_missing_event_is_lost() -> None:
    result = compare(SOURCE, GOOD[:2], WRITER)
    assert result.lost == ["c"]
    assert result.problems(duplicates_allowed=True) == ["1 lost: c"]


def test_an_event_of_a_rolled_back_transaction_is_named() -> None:
    result = compare(SOURCE, numbered(*GOOD, rec("x", 12, 300)), WRITER)
    assert result.rolled_back == ["x (xid 12)"]
    assert result.phantoms == []
    assert "1 rolled back: x (xid 12)" in result.problems(duplicates_allowed=True)


def test_a_source_event_of_a_transaction_the_writer_says_rolled_back_is_named() -> None:
    """The writer's record wins over the source: an event both committed and 'rolled back' is reported."""
    writer = WriterRecord(committed={10}, rolled_back={11, 12})
    result = compare(SOURCE, GOOD, writer)
    assert result.rolled_back == ["c (xid 11)"]
    assert result.unrecorded == ["c (xid 11)"]


def test_a_record_nobody_wrote_is_a_phantom() -> None:
    result = compare(SOURCE, numbered(*GOOD, rec("ghost", 99, 300)), WRITER)
    assert result.phantoms == ["ghost"]
    assert result.problems(duplicates_allowed=True) == ["1 phantoms: ghost"]


def test_duplicates_are_counted_and_fail_only_when_not_allowed() -> None:
    replayed = numbered(*GOOD, rec("b", 10, 100, 1), rec("c", 11, 200, 0), rec("c", 11, 200, 0))
    result = compare(SOURCE, replayed, WRITER)
    assert result.duplicates == 3
    assert result.problems(duplicates_allowed=True) == []
    assert result.problems(duplicates_allowed=False) == ["3 duplicates"]
    assert result.order_violations == []  # a re-delivery going back in position is not an order violation


def test_positions_going_back_for_a_key_are_an_order_violation() -> None:
    swapped = numbered(rec("c", 11, 200, 0), rec("a", 10, 100, 0), rec("b", 10, 100, 1))
    result = compare(SOURCE, swapped, WRITER)
    assert len(result.order_violations) == 1
    assert result.order_violations[0].startswith("key s1:1: a at 0/64#0 after c at 0/C8#0")


def test_source_order_is_checked_even_when_positions_look_right() -> None:
    """A relay that stamps wrong positions cannot hide a reordering: the rows' created_at tell."""
    source = [src("a", 10, at=5), src("b", 10, at=2), src("c", 11, at=9)]
    result = compare(source, GOOD, WRITER)
    assert len(result.order_violations) == 1 and "b written at" in result.order_violations[0]


def test_one_key_on_two_partitions_is_an_order_violation() -> None:
    split = numbered(rec("a", 10, 100, 0), rec("b", 10, 100, 1), rec("c", 11, 200, 0, partition=1))
    result = compare(SOURCE, split, WRITER)
    assert result.order_violations == ["key s1:1 of p.customer on partitions 0 and 1"]


def test_different_keys_do_not_constrain_each_other() -> None:
    source = [src("a", 10, "1", at=1), src("c", 11, "2", at=3)]
    seen = numbered(rec("c", 11, 200, key="s1:2"), rec("a", 10, 100, key="s1:1"))
    assert compare(source, seen, WRITER).order_violations == []


def test_unrecorded_source_transactions_are_named() -> None:
    result = compare([*SOURCE, src("d", 13, at=4)], numbered(*GOOD, rec("d", 13, 300)), WRITER)
    assert result.unrecorded == ["d (xid 13)"]
    assert result.problems(duplicates_allowed=True) == ["1 unrecorded: d (xid 13)"]


def test_problem_lists_are_shortened() -> None:
    result = CheckResult(lost=[str(i) for i in range(8)])
    assert result.problems(duplicates_allowed=True) == ["8 lost: 0, 1, 2, 3, 4 ..."]


def test_a_kcat_line_reads_into_a_seen_event() -> None:
    line = {"topic": "p.order", "partition": 2, "offset": 7, "key": "s1:5", "payload": "{}",
            "headers": ["ce_id", "e1", "ce_xid", "4711", "ce_commitlsn", "0/16B3748", "ce_txseq", "3", "ce_type", "order.created"]}
    assert seen_event(line) == SeenEvent("p.order", 2, 7, "s1:5", "e1", 4711, 0x16B3748, 3)


def test_the_report_keeps_the_latest_run_of_each_scenario(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    report.append({"scenario": "a", "committed": 1, "recover_s": 1.5}, path)
    report.append({"scenario": "b", "committed": 2}, path)
    report.append({"scenario": "a", "committed": 3}, path)
    rows = report.latest(report.load(path))
    assert [(r["scenario"], r["committed"]) for r in rows] == [("b", 2), ("a", 3)]
    lines = report.table(rows).splitlines()
    assert lines[0].startswith("| scenario | txns committed") and lines[2].startswith("| b | 2 |")


@pytest.mark.parametrize("value, expected", [(None, None), ("", None), ("3", 3)])
def test_the_consumer_kill_hook_reads_its_variable(value: str | None, expected: int | None) -> None:
    environ = {} if value is None else {FAULT_KILL_AFTER_SINK_COMMIT: value}
    assert fault_kill_after(environ) == expected


@pytest.mark.parametrize("value", ["0", "-1", "soon"])
def test_the_consumer_kill_hook_refuses_nonsense_in_one_line(value: str) -> None:
    with pytest.raises(ConfigError, match=f"^{FAULT_KILL_AFTER_SINK_COMMIT}='{value}' is not a positive number"):
        fault_kill_after({FAULT_KILL_AFTER_SINK_COMMIT: value})
