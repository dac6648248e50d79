"""outbox.emit(): a domain event in the caller's own transaction (psycopg and SQLAlchemy)."""
from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

import outbox
from outbox.config import InstallSettings
from outbox.contract import ContractError
from outbox.emit import payload_json
from outbox.install import install_outbox

TRACE = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.fixture
def store(new_database: Callable[..., str]) -> str:
    dsn = new_database("emit")
    install_outbox(InstallSettings(dsn=dsn))
    return dsn


@pytest.fixture
def engine(store: str) -> Iterator[sa.Engine]:
    eng = sa.create_engine("postgresql+psycopg://", creator=lambda: psycopg.connect(store))
    yield eng
    eng.dispose()


def rows(dsn: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT id, aggregatetype, aggregateid, type, payload::text, traceparent, origin "
                            "FROM outbox.events ORDER BY created_at").fetchall()


@pytest.mark.integration
def test_psycopg_commit_and_rollback(store: str) -> None:
    with psycopg.connect(store) as conn:
        event_id = outbox.emit(conn, aggregate_type="customer", aggregate_id=42, event_type="customer.merged",
                               payload={"into": 7, "name": "Zoë", "amount": Decimal("12345678901234.5678"),
                                        "at": dt.datetime(2024, 3, 1, 12, 0, tzinfo=dt.timezone.utc),
                                        "ref": uuid.UUID(int=1)}, traceparent=TRACE)
        assert isinstance(event_id, uuid.UUID)
        assert rows(store) == []  # not committed: invisible to others
        conn.commit()
        outbox.emit(conn, aggregate_type="customer", aggregate_id="9", event_type="customer.merged", payload={})
        conn.rollback()
    [(rid, agg, key, typ, payload, trace, origin)] = rows(store)
    assert (rid, agg, key, typ, trace, origin) == (event_id, "customer", "42", "customer.merged", TRACE, None)
    assert json.loads(payload, parse_float=Decimal) == {
        "into": 7, "name": "Zoë", "amount": "12345678901234.5678", "at": "2024-03-01T12:00:00+00:00",
        "ref": "00000000-0000-0000-0000-000000000001"}


@pytest.mark.integration
def test_origin_setting_is_recorded(store: str) -> None:
    with psycopg.connect(store) as conn:
        conn.execute("SET LOCAL outbox.origin = 'crm'")
        outbox.emit(conn, aggregate_type="customer", aggregate_id="1", event_type="customer.updated", payload="[1, 2]")
        conn.commit()
    [row] = rows(store)
    assert row[4] == "[1, 2]" and row[6] == "crm"


@pytest.mark.integration
def test_sqlalchemy_connection(store: str, engine: sa.Engine) -> None:
    with engine.connect() as conn:
        event_id = outbox.emit(conn, aggregate_type="order", aggregate_id=uuid.UUID(int=5), event_type="order.placed",
                               payload=b'{"total": 99.99}')
        conn.commit()
        outbox.emit(conn, aggregate_type="order", aggregate_id="x", event_type="order.placed", payload={})
        conn.rollback()
    assert [(r[0], r[2], r[4]) for r in rows(store)] == [
        (event_id, "00000000-0000-0000-0000-000000000005", '{"total": 99.99}')]


@pytest.mark.integration
def test_sqlalchemy_session(store: str, engine: sa.Engine) -> None:
    with Session(engine) as session:
        with session.begin():
            event_id = outbox.emit(session, aggregate_type="customer", aggregate_id="3", event_type="customer.created",
                                   payload={"a": [1, None, True]})
        with pytest.raises(RuntimeError), session.begin():
            outbox.emit(session, aggregate_type="customer", aggregate_id="4", event_type="customer.created", payload={})
            raise RuntimeError("the application's own work failed")
    assert [(r[0], r[2], json.loads(r[4])) for r in rows(store)] == [(event_id, "3", {"a": [1, None, True]})]


@pytest.mark.integration
def test_bad_arguments_never_touch_the_transaction(store: str) -> None:
    with psycopg.connect(store) as conn:
        conn.execute("SELECT 1")
        with pytest.raises(ContractError):
            outbox.emit(conn, aggregate_type="no spaces", aggregate_id="1", event_type="x.y", payload={})
        with pytest.raises(ValueError):
            outbox.emit(conn, aggregate_type="customer", aggregate_id="1", event_type="x.y", payload="not json")
        with pytest.raises(ValueError):
            outbox.emit(conn, aggregate_type="customer", aggregate_id="1", event_type="x.y", payload={}, traceparent="x")
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS  # not aborted
        outbox.emit(conn, aggregate_type="customer", aggregate_id="1", event_type="x.y", payload={})
        conn.commit()
    assert len(rows(store)) == 1


def test_emit_refuses_other_connections() -> None:
    with pytest.raises(TypeError, match="psycopg Connection or a SQLAlchemy"):
        outbox.emit(object(), aggregate_type="customer", aggregate_id="1", event_type="customer.created", payload={})


@pytest.mark.parametrize("payload, expected", [
    ({"name": "Zoë"}, '{"name":"Zoë"}'),
    ([Decimal("0.10"), dt.date(2024, 1, 2)], '["0.10","2024-01-02"]'),
    ('{"already": "json"}', '{"already": "json"}'),
    (b"[1]", "[1]"),
    (None, "null"),
])
def test_payload_json(payload: Any, expected: str) -> None:
    assert payload_json(payload) == expected


@pytest.mark.parametrize("payload", [float("nan"), "{", b"\xff", {"nul": "a\x00b"}, '"\\u0000"'])
def test_payload_json_refuses_what_jsonb_would(payload: Any) -> None:
    with pytest.raises(ValueError):
        payload_json(payload)


def test_payload_json_refuses_unknown_types() -> None:
    with pytest.raises(TypeError, match="not JSON serialisable"):
        payload_json({"x": object()})
