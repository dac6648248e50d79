"""From a decoded outbox.events row to a Kafka record. Pure."""
from __future__ import annotations

from outbox.contract import ContractError, OutboxRow
from relay import pgoutput

REQUIRED = ("id", "aggregatetype", "aggregateid", "type", "payload")


def outbox_row(columns: dict[str, str | None]) -> OutboxRow:
    """Read the columns the contract needs from one inserted row (PostgreSQL text values)."""
    missing = [c for c in REQUIRED if columns.get(c) is None]
    if missing:
        raise ContractError(f"outbox row lacks {', '.join(missing)}")
    for name, value in columns.items():
        if value is pgoutput.UNCHANGED_TOAST:  # never on INSERT; a guard against a future format
            raise ContractError(f"outbox row column {name} arrived without its value")
    return OutboxRow(
        id=columns["id"],  # type: ignore[arg-type]
        aggregatetype=columns["aggregatetype"],  # type: ignore[arg-type]
        aggregateid=columns["aggregateid"],  # type: ignore[arg-type]
        type=columns["type"],  # type: ignore[arg-type]
        payload=columns["payload"],  # type: ignore[arg-type]
        origin=columns.get("origin"),
        traceparent=columns.get("traceparent"),
    )
