"""The outbox: events table, its publication, the capture registry and the capture trigger function.

Revision ID: 0001
Revises:
Create Date: 2024-06-01

The schema ``outbox`` itself is created by env.py before any revision runs (it holds the version
table) and dropped by ``outbox uninstall`` after the downgrade. Downgrade drops exactly what
upgrade created here, without CASCADE: it never removes an object it did not make.
"""
from __future__ import annotations

from alembic import op
from sqlalchemy import DDL

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

EVENTS = """
CREATE TABLE outbox.events (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    aggregatetype text NOT NULL,
    aggregateid text NOT NULL,
    type text NOT NULL,
    payload jsonb NOT NULL,
    origin text DEFAULT nullif(current_setting('outbox.origin', true), ''),
    traceparent text,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp()
)"""

# BRIN: a few pages for the whole table, almost free on insert; the relay's purge of rows older
# than --retention ranges over created_at, which grows with insertion order.
EVENTS_CREATED_AT = "CREATE INDEX events_created_at_brin ON outbox.events USING brin (created_at)"

PUBLICATION = "CREATE PUBLICATION outbox_events FOR TABLE outbox.events WITH (publish = 'insert')"

CAPTURES = """
CREATE TABLE outbox.captures (
    table_name text PRIMARY KEY,
    aggregate_type text NOT NULL,
    key_columns text[] NOT NULL,
    installed_at timestamptz DEFAULT now()
)"""

# Runs inside every write to a captured table: one jsonb image per row, key values read from it.
# TG_ARGV[0] = aggregate type, TG_ARGV[1..] = primary-key columns in key order.
# "OLD *= NEW" (binary row equality) rather than IS NOT DISTINCT FROM: the latter fails on
# tables with a column type that has no equality operator (json, point, xml).
CAPTURE_FUNCTION = r"""
CREATE FUNCTION outbox.capture_change() RETURNS trigger
LANGUAGE plpgsql
SECURITY INVOKER
SET search_path = pg_catalog, pg_temp
AS $capture$
DECLARE
    image jsonb;
    kind text;
    key text;
    i integer;
BEGIN
    IF TG_OP = 'INSERT' THEN
        image := to_jsonb(NEW);
        kind := '.created';
    ELSIF TG_OP = 'UPDATE' THEN
        IF OLD *= NEW THEN
            RETURN NULL;  -- an update that changes nothing emits nothing
        END IF;
        image := to_jsonb(NEW);
        kind := '.updated';
    ELSE
        image := to_jsonb(OLD);
        kind := '.deleted';
    END IF;
    IF TG_NARGS = 2 THEN
        key := image ->> TG_ARGV[1];
    ELSE
        -- composite key: values in key order joined by ':', with '\' -> '\\' and ':' -> '\:'
        key := replace(replace(image ->> TG_ARGV[1], '\', '\\'), ':', '\:');
        FOR i IN 2 .. TG_NARGS - 1 LOOP
            key := key || ':' || replace(replace(image ->> TG_ARGV[i], '\', '\\'), ':', '\:');
        END LOOP;
    END IF;
    INSERT INTO outbox.events (aggregatetype, aggregateid, type, payload)
    VALUES (TG_ARGV[0], key, TG_ARGV[0] || kind, image);
    RETURN NULL;
END
$capture$"""

COMMENTS = (
    "COMMENT ON SCHEMA outbox IS 'outbox-relay: transactional outbox and change capture (outbox uninstall removes it)'",
    "COMMENT ON TABLE outbox.events IS 'outbox-relay: events streamed to Kafka through publication outbox_events'",
    "COMMENT ON TABLE outbox.captures IS 'outbox-relay: legacy tables with an outbox_capture trigger'",
)


def _execute(stmt: str) -> None:
    op.execute(DDL(stmt.strip().replace("%", "%%")))


def upgrade() -> None:
    _execute(EVENTS)
    _execute(EVENTS_CREATED_AT)
    _execute(PUBLICATION)
    _execute(CAPTURES)
    _execute(CAPTURE_FUNCTION)
    for stmt in COMMENTS:
        _execute(stmt)


def downgrade() -> None:
    _execute("DROP FUNCTION outbox.capture_change()")
    _execute("DROP TABLE outbox.captures")
    _execute("DROP PUBLICATION outbox_events")
    _execute("DROP TABLE outbox.events")
    _execute("COMMENT ON SCHEMA outbox IS NULL")
