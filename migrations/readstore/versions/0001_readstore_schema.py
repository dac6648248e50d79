"""The read store: current entities with tombstones, consumer offsets, rejected records.

Revision ID: readstore_0001
Revises:
Create Date: 2025-01-01
"""
from __future__ import annotations

import textwrap

from alembic import op

revision = "readstore_0001"
down_revision = None
branch_labels = None
depends_on = None


def _sql(statement: str) -> None:
    op.execute(textwrap.dedent(statement).strip())


def upgrade() -> None:
    # One current row per (source, aggregate type, aggregate id). A delete leaves a tombstone
    # (deleted = true, last image kept) so that an older, replayed event can never bring the
    # row back: every write is guarded by the source position (commit_lsn, txseq).
    _sql("""
        CREATE TABLE readstore.entities (
            source_id           text        NOT NULL,
            aggregate_type      text        NOT NULL,
            aggregate_id        text        NOT NULL,
            payload             jsonb       NOT NULL,
            event_id            uuid        NOT NULL,
            event_type          text        NOT NULL,
            commit_lsn          pg_lsn      NOT NULL,
            txseq               integer     NOT NULL,
            source_committed_at timestamptz NOT NULL,
            applied_at          timestamptz NOT NULL DEFAULT clock_timestamp(),
            deleted             boolean     NOT NULL DEFAULT false,
            PRIMARY KEY (source_id, aggregate_type, aggregate_id)
        )
    """)
    op.execute("COMMENT ON TABLE readstore.entities IS "
               "'Current image of every aggregate, one row per (source_id, aggregate_type, aggregate_id); "
               "deleted rows are tombstones. Written by outbox consume readstore.'")
    _sql("""
        CREATE VIEW readstore.current_entities AS
        SELECT source_id, aggregate_type, aggregate_id, payload, event_id, event_type,
               commit_lsn, txseq, source_committed_at, applied_at
          FROM readstore.entities
         WHERE NOT deleted
    """)
    # The Kafka position each consumer group has applied, written in the same transaction as
    # the rows: the source of truth on restart (Kafka's committed offsets are for lag monitoring).
    _sql("""
        CREATE TABLE readstore.consumer_offsets (
            group_id    text        NOT NULL,
            topic       text        NOT NULL,
            partition   integer     NOT NULL,
            next_offset bigint      NOT NULL,
            updated_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
            PRIMARY KEY (group_id, topic, partition)
        )
    """)
    # Records that break the event contract: kept whole, never silently dropped.
    _sql("""
        CREATE TABLE readstore.rejected (
            group_id     text        NOT NULL,
            topic        text        NOT NULL,
            partition    integer     NOT NULL,
            kafka_offset bigint      NOT NULL,
            error        text        NOT NULL,
            received_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
            headers      jsonb       NOT NULL,
            key          bytea,
            value        bytea,
            PRIMARY KEY (group_id, topic, partition, kafka_offset)
        )
    """)


def downgrade() -> None:
    # The schema itself stays: Alembic's version table lives in it. To remove everything:
    # DROP SCHEMA readstore CASCADE.
    op.execute("DROP TABLE readstore.rejected")
    op.execute("DROP TABLE readstore.consumer_offsets")
    op.execute("DROP VIEW readstore.current_entities")
    op.execute("DROP TABLE readstore.entities")
