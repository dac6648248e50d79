"""The pure parts of polite DDL: lock_timeout values, how a blocker is described (no server)."""
from __future__ import annotations

import dataclasses

from outbox.install import Facts, TableFacts, inheritance_problems
from outbox.lockwait import Blocker, describe_blocker, describe_blockers, duration, lock_timeout_sql, lock_timeout_value


def test_lock_timeout_values() -> None:
    assert lock_timeout_value(2) == "2s"
    assert lock_timeout_value(0.5) == "500ms"
    assert lock_timeout_value(1.25) == "1250ms"
    assert lock_timeout_value(0) == "0"
    assert lock_timeout_sql(2.0) == "SET LOCAL lock_timeout = '2s'"


def test_durations() -> None:
    assert [duration(s) for s in (None, 0, 12.7, 119, 180, 7199, 7500)] == [
        "?", "0 s", "12 s", "119 s", "3 min", "119 min", "2 h 5 min"]


def test_a_blocker_is_named_without_its_query_text() -> None:
    b = Blocker(4242, "idle in transaction", 185.0, "pos_app", "nightly-batch")
    assert describe_blocker(b) == "pid 4242 (idle in transaction for 3 min, user pos_app, application nightly-batch)"
    assert describe_blocker(Blocker(7)) == "pid 7 (unknown state for ?)"
    assert describe_blockers(()) == "a session that has gone since"
    many = tuple(Blocker(p, "active", 1.0) for p in range(1, 6))
    assert describe_blockers(many).endswith("pid 3 (active for 1 s) and 2 more")


FACTS = Facts(where="h:5432/db", database="db", server_version=150000, wal_level="logical", max_replication_slots=10,
              slots_used=0, can_create=True, can_replicate=True, schema_exists=False, schema_empty=True,
              publication_exists=False, revision=None, slot=None)


def test_inheritance_children_must_be_captured_too() -> None:
    parent = TableFacts("pos.tickets", "pos.tickets", "r", ("id",), True, ("pos.tickets_2023", "pos.tickets_2024"))
    child = TableFacts("pos.tickets_2023", "pos.tickets_2023", "r", ("id",))
    problems = inheritance_problems(dataclasses.replace(FACTS, tables=(parent,)))
    assert problems == ["pos.tickets has inheritance children (pos.tickets_2023, pos.tickets_2024) whose rows its "
                        "trigger never sees: capture them too (--capture pos.tickets_2023=AGGREGATE for each), or "
                        "partition pos.tickets declaratively"]
    problems = inheritance_problems(dataclasses.replace(FACTS, tables=(parent, child)))
    assert problems and "(pos.tickets_2024)" in problems[0]
    already = dataclasses.replace(FACTS, tables=(parent, child), triggered=frozenset({"pos.tickets_2024"}))
    assert inheritance_problems(already) == []
