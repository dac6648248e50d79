"""outbox.parked: events the relay could not publish (larger than Kafka's message size limit).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23

The relay writes the whole event row here, with the reason and its source position, before it
confirms past that event; a small marker goes to ``<topic>.dlq``. Nothing is ever silently
dropped: an operator finds the row, raises the limit, and re-publishes it (docs/operations.md,
"Parked events"). Downgrade drops only this table.
"""
from __future__ import annotations

from alembic import op
from sqlalchemy import DDL

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

PARKED = """
CREATE TABLE outbox.parked (
    id uuid PRIMARY KEY,
    aggregatetype text NOT NULL,
    aggregateid text NOT NULL,
    type text NOT NULL,
    payload jsonb NOT NULL,
    origin text,
    traceparent text,
    created_at timestamptz,
    topic text NOT NULL,
    commit_lsn pg_lsn NOT NULL,
    xid bigint NOT NULL,
    txseq integer NOT NULL,
    size_bytes integer NOT NULL,
    error text NOT NULL,
    parked_at timestamptz NOT NULL DEFAULT now()
)"""

COMMENT = ("COMMENT ON TABLE outbox.parked IS 'Events the relay could not publish (too large for Kafka): "
           "the full row, the reason and its position; a marker went to <topic>.dlq. See docs/operations.md.'")


def upgrade() -> None:
    op.execute(DDL(PARKED))
    op.execute(DDL(COMMENT))


def downgrade() -> None:
    op.execute(DDL("DROP TABLE outbox.parked"))
