"""``outbox.emit``: write a domain event into outbox.events, in the caller's own transaction.

This is the classic transactional outbox: the event commits (or rolls back) together with the
application's own writes, because it is one more row in the same transaction. ``emit`` never
commits. The relay streams the row from the WAL once the caller commits.

Accepted connections: a psycopg 3 ``Connection`` (sync), a SQLAlchemy ``Connection``, ``Session``
or ``scoped_session``. On a psycopg connection in autocommit mode outside ``conn.transaction()``
the server commits the row on its own: use a transaction to tie it to your writes. Everything is
validated before the database is touched, so a bad argument raises in Python and never aborts the caller's transaction.
"""
from __future__ import annotations

import datetime as dt
import json
import re
import uuid
from decimal import Decimal
from typing import Any

from outbox import contract
from outbox.errors import ContractError

_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")
_COLUMNS = "(id, aggregatetype, aggregateid, type, payload, traceparent)"
_PSYCOPG_SQL = f"INSERT INTO {contract.SCHEMA}.{contract.EVENTS_TABLE} {_COLUMNS} VALUES (%s, %s, %s, %s, %s::jsonb, %s)"
_SQLALCHEMY_SQL = (
    f"INSERT INTO {contract.SCHEMA}.{contract.EVENTS_TABLE} {_COLUMNS} VALUES (CAST(:id AS uuid), :aggregatetype, "
    ":aggregateid, :type, CAST(:payload AS jsonb), :traceparent)"
)


def emit(conn: Any, *, aggregate_type: str, aggregate_id: str | int | uuid.UUID, event_type: str, payload: Any,
         traceparent: str | None = None) -> uuid.UUID:
    """Write one event into outbox.events in ``conn``'s current transaction; return its id.

    ``aggregate_type`` names the Kafka topic (``<prefix>.<aggregate_type>``) and must be a valid
    topic part (else ``outbox.contract.ContractError``, a ValueError). ``aggregate_id`` is the
    Kafka key's second half. ``payload`` is any JSON-serialisable value (Decimal and UUID become
    strings, dates and times ISO 8601), or ``str``/``bytes`` that already hold JSON text.
    ``traceparent`` is a W3C trace context header, passed on as a Kafka header.
    """
    contract.topic_for(contract.DEFAULT_TOPIC_PREFIX, aggregate_type)
    if isinstance(aggregate_id, (int, uuid.UUID)) and not isinstance(aggregate_id, bool):
        aggregate_id = str(aggregate_id)
    if not isinstance(aggregate_id, str) or not aggregate_id:
        raise ContractError(f"aggregate_id must be a non-empty str, int or UUID, not {aggregate_id!r}")
    if not isinstance(event_type, str) or not event_type.strip():
        raise ContractError(f"event_type must be a non-empty str, not {event_type!r}")
    if event_type in contract.RESERVED_TYPES:
        raise ContractError(f"event_type {event_type!r} is reserved by the outbox itself (the relay never publishes "
                         "it): choose another type")
    if traceparent is not None and not _TRACEPARENT.match(traceparent):
        raise ContractError(f"traceparent {traceparent!r} is not a W3C trace context (00-<32 hex>-<16 hex>-<2 hex>)")
    for name, value in (("aggregate_id", aggregate_id), ("event_type", event_type)):
        if "\x00" in value:
            raise ContractError(f"{name} contains a NUL character, which PostgreSQL text cannot store")
    text = payload_json(payload)
    event_id = uuid.uuid4()
    values = (str(event_id), aggregate_type, aggregate_id, event_type, text, traceparent)
    _insert(conn, values)
    return event_id


def payload_json(payload: Any) -> str:
    """The payload as JSON text that PostgreSQL's jsonb accepts; ValueError/TypeError otherwise."""
    if isinstance(payload, (bytes, bytearray, memoryview)):
        try:
            payload = bytes(payload).decode("utf-8")
        except UnicodeDecodeError:
            raise ContractError("payload bytes are not UTF-8 JSON text") from None
    if isinstance(payload, str):
        try:
            json.loads(payload)
        except ValueError as exc:
            raise ContractError(f"payload str is not JSON text ({exc}); pass the value itself to have it encoded") from None
        text = payload
    else:
        try:
            text = json.dumps(payload, ensure_ascii=False, allow_nan=False, default=_json_default, separators=(",", ":"))
        except ValueError as exc:
            raise ContractError(f"payload cannot be JSON: {exc}") from None
    if "\\u0000" in text or "\x00" in text:
        raise ContractError("payload contains a NUL character (\\u0000), which PostgreSQL jsonb cannot store")
    return text


def _json_default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    raise TypeError(f"payload value of type {type(value).__name__} is not JSON serialisable")


def _insert(conn: Any, values: tuple[Any, ...]) -> None:
    import psycopg

    if isinstance(conn, psycopg.Connection):
        conn.execute(_PSYCOPG_SQL, values)
        return
    try:
        from sqlalchemy import text
        from sqlalchemy.engine import Connection
        from sqlalchemy.orm import Session, scoped_session
    except ImportError:  # pragma: no cover - SQLAlchemy is a dependency
        Connection = Session = scoped_session = ()  # type: ignore[assignment,misc]
    if isinstance(conn, (Connection, Session, scoped_session)):
        keys = ("id", "aggregatetype", "aggregateid", "type", "payload", "traceparent")
        conn.execute(text(_SQLALCHEMY_SQL), dict(zip(keys, values)))
        return
    raise TypeError(f"emit() needs a psycopg Connection or a SQLAlchemy Connection or Session, not {type(conn).__name__}")
