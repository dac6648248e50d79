"""JSON nested deeper than Python's parser goes (about 1,000 levels) is a poison record, parked like
any other: never an uncaught RecursionError that crash-loops the consumer on the same batch."""
from __future__ import annotations

from datetime import datetime, timezone

import pytest

from outbox import contract
from outbox.consumers import readstore as rs
from outbox.consumers.crm_logic import DEFAULT_MAPPINGS, MappingError, parse_change
from outbox.consumers.dlq import DeadLetter
from tests.support.records import Rec

DEEP = b'{"a": ' * 1000 + b"1" + b"}" * 1000


def test_the_read_store_rejects_deeply_nested_json() -> None:
    good = contract.build_record(contract.OutboxRow(id="6f1c0b0e-8d1f-4a53-9b7e-0a6d2f4f5a11", aggregatetype="customer",
                                                    aggregateid="1", type="customer.created", payload="{}"),
                                 source_id="s1", prefix="p", position=contract.Position(16, 0),
                                 commit_time=datetime.now(timezone.utc), xid=1)
    verdict = rs.classify(Rec(good.topic, 0, 0, good.key, DEEP, list(good.headers)))
    assert isinstance(verdict, DeadLetter) and "nested too deeply" in verdict.error


def test_the_crm_mapping_and_the_way_back_reject_deeply_nested_json() -> None:
    event = contract.ReceivedEvent(id="6f1c0b0e-8d1f-4a53-9b7e-0a6d2f4f5a11", source_id="s", aggregate_type="customer",
                                   aggregate_id="1", type="customer.updated", time=datetime.now(timezone.utc),
                                   position=contract.Position(1, 0), origin=None, payload=DEEP)
    with pytest.raises(MappingError, match="nested"):
        DEFAULT_MAPPINGS["customer"].item(event)
    with pytest.raises(ValueError, match="nested"):
        parse_change(DEEP)
