"""WAL histories per source and reconcile watermarks per (source, aggregate type).

``readstore.sources``: the WAL history (``ce_history``: system identifier and timeline) the stored
positions of a source belong to. Events of another history are not compared with them (their LSNs
may be lower: a restored backup, a promoted standby, a new cluster): the sink parks them in
``<topic>.dlq`` and logs the recovery, until ``readstore.reset_source`` is run (docs/operations.md).

``readstore.reconciled``: the start position of the latest ``outbox backfill --reconcile`` of a
source's aggregate type; events below it are stale (the snapshot or a later change supersedes
them, or the row is gone) and are skipped.

Revision ID: readstore_0003
Revises: readstore_0002
Create Date: 2026-11-24
"""
from __future__ import annotations

import textwrap

from alembic import op

revision = "readstore_0003"
down_revision = "readstore_0002"
branch_labels = None
depends_on = None


def _sql(statement: str) -> None:
    op.execute(textwrap.dedent(statement).strip())


def upgrade() -> None:
    _sql("""
        CREATE TABLE readstore.sources (
            source_id   text        PRIMARY KEY,
            history     text,
            since       timestamptz NOT NULL DEFAULT clock_timestamp(),
            reset_at    timestamptz
        )
    """)
    op.execute("COMMENT ON TABLE readstore.sources IS "
               "'The WAL history (ce_history) the stored positions of each source belong to. "
               "Change it only with readstore.reset_source (docs/operations.md).'")
    _sql("""
        CREATE TABLE readstore.reconciled (
            source_id      text        NOT NULL,
            aggregate_type text        NOT NULL,
            start_lsn      pg_lsn      NOT NULL,
            run            bigint,
            event_id       uuid        NOT NULL,
            applied_at     timestamptz NOT NULL DEFAULT clock_timestamp(),
            PRIMARY KEY (source_id, aggregate_type)
        )
    """)
    # The documented reset of a source whose WAL history changed: its rows keep their images and
    # tombstones but no longer hold a position (any event of the new history wins over them), its
    # reconcile watermarks go, and the new history is accepted.
    _sql("""
        CREATE FUNCTION readstore.reset_source(p_source_id text, p_history text) RETURNS bigint
        LANGUAGE plpgsql AS $$
        DECLARE
            n bigint;
        BEGIN
            INSERT INTO readstore.sources (source_id, history, reset_at)
                 VALUES (p_source_id, p_history, clock_timestamp())
            ON CONFLICT (source_id) DO UPDATE SET history = EXCLUDED.history, since = clock_timestamp(),
                                                  reset_at = clock_timestamp();
            UPDATE readstore.entities SET commit_lsn = '0/0', txseq = -1 WHERE source_id = p_source_id;
            GET DIAGNOSTICS n = ROW_COUNT;
            DELETE FROM readstore.reconciled WHERE source_id = p_source_id;
            RETURN n;
        END
        $$
    """)


def downgrade() -> None:
    op.execute("DROP FUNCTION readstore.reset_source(text, text)")
    op.execute("DROP TABLE readstore.reconciled")
    op.execute("DROP TABLE readstore.sources")
