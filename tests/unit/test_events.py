"""relay.events.RowReader: outbox.events value tuples to OutboxRows, by column position."""
from __future__ import annotations

import pytest

from outbox.contract import ContractError, OutboxRow
from relay.events import RowReader
from relay.pgoutput import UNCHANGED_TOAST, Column, ProtocolError, Relation


def relation(*names: str) -> Relation:
    return Relation(7, "outbox", "events", "d", tuple(Column(0, n, 25, -1) for n in names))


SHIPPED = relation("id", "aggregatetype", "aggregateid", "type", "payload", "origin", "traceparent", "created_at")


def test_reads_the_shipped_layout() -> None:
    row = RowReader(SHIPPED)(("e1", "order", "42", "order.created", '{"a": 1}', None, "00-ab-cd-01", "2026-11-23"))
    assert row == OutboxRow("e1", "order", "42", "order.created", '{"a": 1}', None, "00-ab-cd-01")


def test_columns_in_another_order_and_optional_ones_missing() -> None:
    reader = RowReader(relation("created_at", "payload", "type", "traceparent", "aggregateid", "aggregatetype", "id"))
    row = reader(("t", "{}", "order.updated", "00-1-2-01", "42", "order", "e2"))
    assert row == OutboxRow("e2", "order", "42", "order.updated", "{}", origin=None, traceparent="00-1-2-01")


def test_a_missing_required_column_is_refused_when_the_relation_arrives() -> None:
    with pytest.raises(ContractError, match="lacks column.*aggregateid"):
        RowReader(relation("id", "aggregatetype", "type", "payload"))


@pytest.mark.parametrize("position, name", [(0, "id"), (4, "payload")])
def test_a_null_required_value_is_a_contract_error(position: int, name: str) -> None:
    values = ["e1", "order", "42", "order.created", "{}", None, None, "t"]
    values[position] = None
    with pytest.raises(ContractError, match=f"lacks {name}"):
        RowReader(SHIPPED)(tuple(values))


def test_unchanged_toast_and_a_wrong_width_are_refused() -> None:
    with pytest.raises(ContractError, match="lacks payload"):
        RowReader(SHIPPED)(("e1", "order", "42", "order.created", UNCHANGED_TOAST, None, None, "t"))
    with pytest.raises(ProtocolError, match="8 columns"):
        RowReader(SHIPPED)(("e1", "order"))
