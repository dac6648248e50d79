"""Helpers of the install tests: the legacy schema, the CLI in-process, queries."""
from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import psycopg
from click.testing import CliRunner, Result

from outbox.cli import cli

LEGACY = """
CREATE SCHEMA pos;
CREATE TABLE pos.customers (id serial PRIMARY KEY, name text, email text, balance numeric,
                            seen_at timestamptz, prefs json);
CREATE TABLE pos.orders (id bigserial PRIMARY KEY, customer_id int REFERENCES pos.customers, total numeric(18,4));
CREATE TABLE pos.order_lines (order_id bigint NOT NULL, line_no int NOT NULL, sku text, qty int,
                              PRIMARY KEY (order_id, line_no));
CREATE TABLE pos.audit (happened_at timestamptz, what text);
CREATE TABLE public.alembic_version (version_num varchar(32) NOT NULL PRIMARY KEY);
INSERT INTO public.alembic_version VALUES ('legacy_7f3a');
INSERT INTO pos.customers (name, email, balance) VALUES ('Ada', 'ada@example.com', 10.5);
INSERT INTO pos.orders (customer_id, total) VALUES (1, 99.9900);
INSERT INTO pos.order_lines VALUES (1, 1, 'SKU-1', 2);
INSERT INTO pos.audit VALUES (now(), 'legacy row');
"""
CAPTURES = ["--capture", "pos.customers=customer", "--capture", "pos.order_lines=order_line"]


def run(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def ok(*args: str) -> str:
    result = run(*args)
    assert result.exit_code == 0, result.output
    return result.output


def one_line_error(result: Result, exit_code: int = 1) -> str:
    assert result.exit_code == exit_code, result.output
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


def query(dsn: str, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(sql, params or None)
        return cur.fetchall() if cur.description else []


def events(dsn: str) -> list[tuple[Any, ...]]:
    rows = query(dsn, "SELECT aggregatetype, aggregateid, type, payload::text, origin FROM outbox.events "
                      "ORDER BY created_at, ctid")  # ctid: two events of one row change may share a microsecond
    return [(a, i, t, json.loads(p, parse_float=Decimal), o) for a, i, t, p, o in rows]


def dbname(dsn: str) -> str:
    return dsn.split("=", 1)[1]
