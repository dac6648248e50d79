"""Pure parts of backfill and replay: SQL built for a table, progress lines, rewind plans. No I/O."""
from __future__ import annotations

import io
from datetime import datetime, timezone

import pytest
from aiokafka import TopicPartition

from outbox.backfill import Progress, Target, chunk_sql, format_duration, key_sql
from outbox.consumers.replay import From, format_plan, parse_from, plan_rewind
from outbox.errors import ConfigError

T = Target('pos."Order Lines"', 1, "order_line", ("order_id", "line_no"), ("bigint", "integer"))


def test_key_sql_is_the_capture_triggers() -> None:
    assert key_sql(["id"]) == "image ->> 'id'"
    assert key_sql(["a", "b"], "c.image") == (
        "replace(replace(c.image ->> 'a', '\\', '\\\\'), ':', '\\:') || ':' || "
        "replace(replace(c.image ->> 'b', '\\', '\\\\'), ':', '\\:')")


def test_chunk_sql_pages_by_key_locks_and_writes_snapshots() -> None:
    first = chunk_sql(T, None, False, emit=True)
    assert "%(k0)s" not in first  # the first chunk starts at the first row
    # the range is fixed before locking (b, bound), and the lock re-checks the bound (a moved key leaves it)
    assert ('b AS MATERIALIZED (SELECT t.order_id, t.line_no FROM pos."Order Lines" t '
            "ORDER BY t.order_id, t.line_no LIMIT %(n)s)") in first
    assert "WHERE (t.order_id, t.line_no) <= (SELECT order_id, line_no FROM bound) ORDER BY" in first
    assert "ORDER BY t.order_id, t.line_no LIMIT %(n)s FOR SHARE OF t" in first
    assert "'order_line.snapshot'" in first and 'FROM pos."Order Lines" t' in first
    more = chunk_sql(T, "status = 'x' AND note LIKE 'a%'", True, emit=True)
    assert "WHERE (status = 'x' AND note LIKE 'a%%') AND (t.order_id, t.line_no) > (%(k0)s::bigint, %(k1)s::integer)" in more
    dry = chunk_sql(T, None, True, emit=False)
    assert "FOR SHARE" not in dry and "INSERT" not in dry


def test_progress_bar_on_a_terminal_and_lines_otherwise() -> None:
    tty, plain = io.StringIO(), io.StringIO()
    for out, is_tty in ((tty, True), (plain, False)):
        p = Progress(total=1000, out=out, tty=is_tty)
        p.add(250)
        p.show()
        p.finish()
    assert tty.getvalue().startswith("\r[#######") and "250/1,000 rows (25%)" in tty.getvalue() and "ETA" in tty.getvalue()
    assert tty.getvalue().endswith("\n")
    assert plain.getvalue().startswith("backfill: 250/1,000 rows (25%), ") and "\r" not in plain.getvalue()
    assert "rows/s, ETA 0:00:" in plain.getvalue()


def test_progress_total_is_an_estimate_and_never_below_done() -> None:
    p = Progress(total=10, out=io.StringIO(), tty=False)
    p.done = 25
    assert p.line().startswith("25/25 rows (100%)")


def test_format_duration() -> None:
    assert format_duration(3725.9) == "1:02:05" and format_duration(-1) == "0:00:00"


def test_parse_from() -> None:
    assert parse_from("earliest") == From(earliest=True) and parse_from(" 42 ") == From(offset=42)
    assert parse_from("2026-01-31T12:00:00Z").time == datetime(2026, 1, 31, 12, tzinfo=timezone.utc)
    assert parse_from("2026-01-31 12:00").time == datetime(2026, 1, 31, 12, tzinfo=timezone.utc)  # UTC by default
    with pytest.raises(ConfigError, match="invalid --from 'latest'"):
        parse_from("latest")


def test_plan_rewind_counts_and_clamps() -> None:
    a, b, c = TopicPartition("t", 0), TopicPartition("t", 1), TopicPartition("t", 2)
    begin, end = {a: 0, b: 10, c: 0}, {a: 100, b: 50, c: 0}
    plans = plan_rewind(begin, end, {a: 100, b: 40, c: None}, From(earliest=True))
    assert [(p.partition, p.target, p.redelivered) for p in plans] == [(0, 0, 100), (1, 10, 30), (2, 0, 0)]
    plans = plan_rewind(begin, end, {a: 100, b: 40}, From(offset=5))
    assert [(p.target, p.redelivered) for p in plans] == [(5, 95), (10, 30), (0, 0)]  # clamped to the log start
    plans = plan_rewind(begin, end, {a: 20, b: 40}, From(time=datetime.now(timezone.utc)), {a: 60, b: None, c: None})
    assert [(p.target, p.redelivered) for p in plans] == [(60, -40), (50, -10), (0, 0)]  # forwards; no record: the end
    text = format_plan("g", From(earliest=True), plan_rewind(begin, end, {a: 100, b: 40}, From(earliest=True)))
    assert text.splitlines()[0] == "rewind consumer group g to earliest:" and text.endswith("130 records re-delivered in all")
    assert "   -" in text.splitlines()[4]  # never committed
