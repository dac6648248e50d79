"""The backfill audit table: every ``outbox backfill`` run, who, what, when, how many rows, result.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23

``last_key`` (the key of the last finished chunk, as a JSON array of text values) is written in
the same transaction as that chunk's snapshot events, so ``--resume`` starts exactly after it.
"""
from __future__ import annotations

from alembic import op
from sqlalchemy import DDL

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

BACKFILLS = """
CREATE TABLE outbox.backfills (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    table_name   text        NOT NULL,
    where_clause text,
    source_id    text        NOT NULL,
    chunk_size   integer     NOT NULL,
    rate         integer,
    db_user      text        NOT NULL DEFAULT current_user,
    os_user      text,
    client_host  text,
    started_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    finished_at  timestamptz,
    rows         bigint      NOT NULL DEFAULT 0,
    chunks       integer     NOT NULL DEFAULT 0,
    result       text        NOT NULL DEFAULT 'running'
                 CHECK (result IN ('running', 'done', 'failed', 'interrupted', 'killed', 'dry-run')),
    error        text,
    last_key     jsonb,
    resumed_from bigint REFERENCES outbox.backfills (id)
)"""

COMMENT = ("COMMENT ON TABLE outbox.backfills IS 'outbox-relay: one row per outbox backfill run "
           "(who, what, when, rows, result, resume point)'")


def upgrade() -> None:
    op.execute(DDL(BACKFILLS.strip()))
    op.execute(DDL(COMMENT))


def downgrade() -> None:
    op.execute(DDL("DROP TABLE outbox.backfills"))
