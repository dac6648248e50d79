"""outbox_crm: the CRM write-back's ledger and offsets in a store database.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01

``outbox consume crm-writeback`` applies CRM changes to a store's legacy tables; in the same
transaction it records the notification ids it applied (``outbox_crm.applied``: a webhook
delivered twice is applied once) and its Kafka offsets (``outbox_crm.consumer_offsets``). Its own
schema, apart from ``outbox``, so that its role needs no privilege on the outbox's tables.

Before this revision the write-back created the schema itself at start-up, with these exact
tables: ``IF NOT EXISTS`` adopts what such a write-back made (the offsets in it stay valid).
Downgrade drops exactly these two tables and the schema, without CASCADE.
"""
from __future__ import annotations

from alembic import op
from sqlalchemy import DDL

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

SCHEMA = "outbox_crm"

STATEMENTS = (
    f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}",
    f"""CREATE TABLE IF NOT EXISTS {SCHEMA}.applied (
    delivery_id text PRIMARY KEY,
    applied_at  timestamptz NOT NULL DEFAULT clock_timestamp()
)""",
    # the same table every sink keeps its offsets in (outbox.consumers.sink_offsets)
    f"""CREATE TABLE IF NOT EXISTS {SCHEMA}.consumer_offsets (
    group_id    text NOT NULL,
    topic       text NOT NULL,
    partition   integer NOT NULL,
    next_offset bigint NOT NULL,
    updated_at  timestamptz NOT NULL,
    PRIMARY KEY (group_id, topic, partition)
)""",
    f"COMMENT ON SCHEMA {SCHEMA} IS 'outbox-relay: the CRM write-back''s applied notifications and Kafka offsets "
    "(outbox uninstall removes it)'",
)


def upgrade() -> None:
    for stmt in STATEMENTS:
        op.execute(DDL(stmt))


def downgrade() -> None:
    op.execute(DDL(f"DROP TABLE {SCHEMA}.consumer_offsets"))
    op.execute(DDL(f"DROP TABLE {SCHEMA}.applied"))
    op.execute(DDL(f"DROP SCHEMA {SCHEMA}"))
