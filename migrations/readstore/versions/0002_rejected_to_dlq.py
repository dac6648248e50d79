"""Rejected records go to the shared dead-letter topic ``<topic>.dlq``: drop readstore.rejected.

Rows still in the table are not moved to Kafka: review them first
(``SELECT topic, partition, kafka_offset, error FROM readstore.rejected``) if the table is not empty;
the downgrade recreates the table empty.

Revision ID: readstore_0002
Revises: readstore_0001
Create Date: 2026-11-23
"""
from __future__ import annotations

import textwrap

from alembic import op

revision = "readstore_0002"
down_revision = "readstore_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("DROP TABLE readstore.rejected")


def downgrade() -> None:
    op.execute(textwrap.dedent("""
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
    """).strip())
