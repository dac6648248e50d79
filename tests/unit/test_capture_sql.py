"""The pure parts of install: capture SQL, quoting, preconditions and capture plans (no server)."""
from __future__ import annotations

import dataclasses

import pytest

from outbox import config as cfg
from outbox.contract import ContractError
from outbox.errors import ConfigError, PreconditionFailed
from outbox.install import (
    Facts,
    SlotFacts,
    TableFacts,
    capture_sql,
    check_install,
    check_slot_name,
    check_wal_level,
    create_slot_sql,
    install_problems,
    parse_capture,
    plan_captures,
    quote_ident,
    quote_literal,
    uncapture_sql,
    wal_level_problem,
)


def test_capture_sql_single_key() -> None:
    assert capture_sql("pos.customers", "customer", ["id"]) == [
        "CREATE TRIGGER outbox_capture AFTER INSERT OR UPDATE OR DELETE ON pos.customers "
        "FOR EACH ROW EXECUTE FUNCTION outbox.capture_change('customer', 'id')",
        "INSERT INTO outbox.captures (table_name, aggregate_type, key_columns) "
        "VALUES ('pos.customers', 'customer', ARRAY['id']::text[]) "
        "ON CONFLICT (table_name) DO UPDATE SET aggregate_type = EXCLUDED.aggregate_type, "
        "key_columns = EXCLUDED.key_columns, installed_at = now()",
    ]


def test_capture_sql_composite_key_keeps_key_order() -> None:
    sql = capture_sql("pos.order_lines", "order_line", ["order_id", "line_no"])
    assert "outbox.capture_change('order_line', 'order_id', 'line_no')" in sql[0]
    assert "ARRAY['order_id', 'line_no']::text[]" in sql[1]


def test_capture_sql_replace_drops_the_old_trigger_first() -> None:
    sql = capture_sql("pos.customers", "client", ["id"], replace=True)
    assert sql[0] == "DROP TRIGGER IF EXISTS outbox_capture ON pos.customers"
    assert sql[1].startswith("CREATE TRIGGER outbox_capture ")


def test_capture_sql_quotes_odd_names() -> None:
    sql = capture_sql('"Pos"."Odd Table"', "odd", ["It's", "a\\b"])
    assert "ON \"Pos\".\"Odd Table\" FOR EACH ROW" in sql[0]
    assert "capture_change('odd', 'It''s', E'a\\\\b')" in sql[0]
    assert "VALUES ('\"Pos\".\"Odd Table\"', 'odd'" in sql[1]


def test_capture_sql_refuses_bad_aggregate_and_missing_key() -> None:
    with pytest.raises(ContractError):
        capture_sql("pos.customers", "no spaces", ["id"])
    with pytest.raises(ValueError):
        capture_sql("pos.customers", "customer", [])


def test_quoting() -> None:
    assert quote_ident("customers") == "customers"
    assert quote_ident("Customers") == '"Customers"'
    assert quote_ident("order") == '"order"'
    assert quote_ident('a"b') == '"a""b"'
    assert quote_literal("it's") == "'it''s'"
    assert quote_literal("a\\b") == "E'a\\\\b'"


def test_other_statements() -> None:
    assert uncapture_sql("pos.customers") == "DROP TRIGGER IF EXISTS outbox_capture ON pos.customers"
    assert create_slot_sql("outbox_store1") == "SELECT pg_create_logical_replication_slot('outbox_store1', 'pgoutput')"
    assert check_slot_name("outbox_store1") == "outbox_store1"
    with pytest.raises(ConfigError):
        check_slot_name("Bad-Slot")


def test_wal_level_check() -> None:
    check_wal_level("logical", "h:5432/db")
    with pytest.raises(PreconditionFailed) as info:
        check_wal_level("replica", "h:5432/store1")
    assert info.value.message == (
        "wal_level is 'replica' on h:5432/store1: set wal_level = logical in postgresql.conf and restart PostgreSQL"
    )
    assert wal_level_problem("minimal", "x") is not None


def _facts(**changes: object) -> Facts:
    base = Facts(
        where="h:5432/store1", database="store1", server_version=150004, wal_level="logical",
        max_replication_slots=10, slots_used=0, can_create=True, can_replicate=True,
        schema_exists=False, schema_empty=True, publication_exists=False, revision=None, slot=None,
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def test_preconditions_pass_on_a_fresh_database() -> None:
    check_install(_facts(tables=(TableFacts("pos.customers", "pos.customers", "r", ("id",)),)), "outbox_store1")


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({"wal_level": "replica"}, "wal_level is 'replica' on h:5432/store1"),
        ({"can_create": False}, "GRANT CREATE ON DATABASE store1"),
        ({"can_replicate": False}, "ALTER ROLE <user> REPLICATION"),
        ({"slots_used": 10}, "raise max_replication_slots"),
        ({"server_version": 120010}, "outbox needs 13 or newer"),
        ({"schema_exists": True, "schema_empty": False}, "was not installed by outbox"),
        ({"revision": "0099", "schema_exists": True, "publication_exists": True}, "revision 0099"),
        ({"slot": SlotFacts("outbox_store1", "other", "pgoutput", None)}, "choose another name with --slot"),
        ({"tables": (TableFacts("pos.nope"),)}, "table pos.nope does not exist"),
        ({"tables": (TableFacts("pos.nokey", "pos.nokey", "r", ()),)}, "table pos.nokey has no primary key: add one"),
        ({"tables": (TableFacts("pos.v", "pos.v", "v", ()),)}, "pos.v is not a table"),
        ({"tables": (TableFacts("pos.t", "pos.t", "r", ("id",), can_trigger=False),)}, "GRANT TRIGGER ON pos.t"),
        ({"tables": (TableFacts("outbox.events", "outbox.events", "r", ("id",)),)}, "cannot be captured"),
    ],
)
def test_each_precondition_is_one_line_with_the_fix(changes: dict[str, object], expected: str) -> None:
    problems = install_problems(_facts(**changes), "outbox_store1")
    assert len(problems) == 1 and expected in problems[0]
    assert "\n" not in problems[0]
    with pytest.raises(PreconditionFailed, match="^" + problems[0][:20]):
        check_install(_facts(**changes), "outbox_store1")


def test_several_problems_are_counted_in_the_one_line() -> None:
    with pytest.raises(PreconditionFailed, match=r"\(and 1 more problem\)$"):
        check_install(_facts(wal_level="replica", can_create=False), "outbox_store1")


def test_installed_database_needs_no_create_privilege() -> None:
    facts = _facts(schema_exists=True, schema_empty=False, publication_exists=True, revision="0001",
                   can_create=False, slot=SlotFacts("outbox_store1", "store1", "pgoutput", None), can_replicate=False)
    assert install_problems(facts, "outbox_store1") == []


def test_plan_captures_create_keep_replace() -> None:
    tables = (
        TableFacts("pos.customers", "pos.customers", "r", ("id",)),
        TableFacts("pos.orders", "pos.orders", "r", ("id",)),
        TableFacts("pos.order_lines", "pos.order_lines", "r", ("order_id", "line_no")),
    )
    facts = _facts(
        tables=tables,
        captured={"pos.customers": ("customer", ("id",)), "pos.orders": ("order", ("id",))},
        triggered=frozenset({"pos.customers", "pos.orders"}),
    )
    wanted = [cfg.Capture.parse("pos.customers=customer"), cfg.Capture.parse("pos.orders=purchase"),
              cfg.Capture.parse("pos.order_lines=order_line")]
    plans = plan_captures(facts, wanted)
    assert [p.action for p in plans] == ["keep", "replace", "create"]
    assert plans[0].statements() == []
    assert plans[0].describe() == "pos.customers already captured as customer (key: id)"
    assert plans[1].describe() == "capturing pos.orders as purchase (key: id; was order)"
    assert plans[2].describe() == "capturing pos.order_lines as order_line (key: order_id, line_no)"
    assert plans[2].statements()[0].startswith("CREATE TRIGGER")


def test_plan_captures_refuses_the_same_table_twice() -> None:
    facts = _facts(tables=(TableFacts("pos.customers", "pos.customers", "r", ("id",)),
                           TableFacts("pos.Customers", "pos.customers", "r", ("id",))))
    with pytest.raises(ConfigError, match="twice"):
        plan_captures(facts, [cfg.Capture.parse("pos.customers=a"), cfg.Capture.parse("pos.Customers=b")])


@pytest.mark.parametrize("text", ["posnope=x", "pos.x", "pos.x=a b", "=x"])
def test_parse_capture_errors_are_one_line(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_capture(text)
    assert info.value.message.startswith(f"invalid --capture {text!r}")
    assert "\n" not in info.value.message
