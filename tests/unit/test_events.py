"""relay.events.RowReader: outbox.events values (undecoded) to RawRows, by column position."""
from __future__ import annotations

import pytest

from outbox.contract import ContractError, RawRow
from outbox.relay.events import RowReader
from outbox.relay.pgoutput import UNCHANGED_TOAST, Column, ProtocolError, Relation


def relation(*names: str) -> Relation:
    return Relation(7, "outbox", "events", "d", tuple(Column(0, n, 25, -1) for n in names))


SHIPPED = relation("id", "aggregatetype", "aggregateid", "type", "payload", "origin", "traceparent", "created_at")


def test_reads_the_shipped_layout() -> None:
    row = RowReader(SHIPPED)((b"e1", b"order", b"42", b"order.created", b'{"a": 1}', None, b"00-ab-cd-01", b"2026-11-23"))
    assert row == RawRow(b"e1", b"order", b"42", b"order.created", b'{"a": 1}', None, b"00-ab-cd-01")


def test_columns_in_another_order_and_optional_ones_missing() -> None:
    reader = RowReader(relation("created_at", "payload", "type", "traceparent", "aggregateid", "aggregatetype", "id"))
    row = reader((b"t", b"{}", b"order.updated", b"00-1-2-01", b"42", b"order", b"e2"))
    assert row == RawRow(b"e2", b"order", b"42", b"order.updated", b"{}", origin=None, traceparent=b"00-1-2-01")


def test_a_missing_required_column_is_refused_when_the_relation_arrives() -> None:
    with pytest.raises(ContractError, match="lacks column.*aggregateid"):
        RowReader(relation("id", "aggregatetype", "type", "payload"))


@pytest.mark.parametrize("position, name", [(0, "id"), (4, "payload")])
def test_a_null_required_value_is_a_contract_error(position: int, name: str) -> None:
    values: list[bytes | None] = [b"e1", b"order", b"42", b"order.created", b"{}", None, None, b"t"]
    values[position] = None
    with pytest.raises(ContractError, match=f"lacks {name}"):
        RowReader(SHIPPED)(tuple(values))


def test_unchanged_toast_and_a_wrong_width_are_refused() -> None:
    with pytest.raises(ContractError, match="lacks payload"):
        RowReader(SHIPPED)((b"e1", b"order", b"42", b"order.created", UNCHANGED_TOAST, None, None, b"t"))
    with pytest.raises(ProtocolError, match="8 columns"):
        RowReader(SHIPPED)((b"e1", b"order"))
