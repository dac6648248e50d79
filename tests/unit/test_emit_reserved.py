"""outbox.emit() refuses the event types the outbox itself uses (#19 item 11). No I/O."""
from __future__ import annotations

import pytest

from outbox import contract
from outbox.emit import emit


@pytest.mark.parametrize("event_type", ["outbox.heartbeat", "outbox.capture_parked"])
def test_emit_refuses_reserved_event_types(event_type: str) -> None:
    # refused before the connection is touched: a bad argument never aborts the caller's transaction
    with pytest.raises(ValueError, match="reserved"):
        emit(object(), aggregate_type="customer", aggregate_id="1", event_type=event_type, payload={})


def test_the_reserved_types_are_the_contract_s() -> None:
    assert contract.HEARTBEAT_TYPE in contract.RESERVED_TYPES
