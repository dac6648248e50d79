"""A btree index for the purge, and columns left out of captured events.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03

* ``outbox.events_created_at`` (btree on ``created_at``) replaces 0001's BRIN index. The relay's
  purge deletes the oldest rows in batches (``ORDER BY created_at LIMIT n``); on a queue-like
  table (rows deleted at the head, their space reused at the tail) a BRIN range soon spans the
  whole table and each batch was a sequential scan. The btree reads just the batch (issue #21.9).
* ``outbox.captures.exclude_columns``: columns ``outbox install --exclude SCHEMA.TABLE.COLUMN``
  leaves out of a captured table's events. Every UPDATE writes the row image into
  ``outbox.events`` (and so into the WAL): a wide TOASTed column nobody consumes multiplied the
  WAL of a price-only update a thousandfold (issue #21.10). The capture function reads the list
  from this row (the root of a partitioned table's), after the key: a key column is never lost,
  and an UPDATE that changed only excluded columns emits nothing. Changing the list is an UPDATE
  of ``outbox.captures``: no DDL, no lock on the legacy table. ``outbox_owner`` gets SELECT on
  ``outbox.captures`` for it.

Downgrade restores 0005's function and the BRIN index, drops the column and the grant.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

from alembic import op
from sqlalchemy import DDL

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

OWNER = "outbox_owner"

_DECLARE_ANCHOR = "    i integer;\nBEGIN\n"
_EXCLUDE_ANCHOR = "    IF reason IS NOT NULL THEN  -- never fail the application's statement: park the change\n"

# After the key is read from the full image: excluded columns leave the images (and the event).
EXCLUDE_BLOCK = r"""    -- columns left out of the event (outbox install --exclude): outbox.captures.exclude_columns of
    -- this table (of its root, for a partition); an update of only excluded columns emits nothing
    SELECT c.exclude_columns INTO excluded FROM outbox.captures c
     WHERE c.table_name = coalesce(pg_partition_root(TG_RELID), TG_RELID)::regclass::text;
    IF excluded <> '{}' THEN
        image := image - excluded;
        old_image := old_image - excluded;
        IF kind = '.updated' AND reason IS NULL AND image = old_image THEN
            RETURN NULL;
        END IF;
    END IF;
"""


def _revision(filename: str) -> ModuleType:
    """Another revision's script (Alembic loads revision files outside any package)."""
    path = Path(__file__).with_name(filename)
    spec = importlib.util.spec_from_file_location(f"_outbox_store_{filename[:4]}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def capture_function() -> str:
    """0005's function with the exclusion block (search_path pg_catalog: regclass::text is schema.table)."""
    previous = str(_revision("0005_capture_definer.py").CAPTURE_FUNCTION)
    assert previous.count(_DECLARE_ANCHOR) == 1 and previous.count(_EXCLUDE_ANCHOR) == 1
    return (previous.replace(_DECLARE_ANCHOR, "    i integer;\n    excluded text[];\nBEGIN\n")
            .replace(_EXCLUDE_ANCHOR, EXCLUDE_BLOCK + _EXCLUDE_ANCHOR))


UPGRADE = (
    # IF NOT EXISTS: a DBA may have built it beforehand with CREATE INDEX CONCURRENTLY (docs/operations.md)
    "CREATE INDEX IF NOT EXISTS events_created_at ON outbox.events (created_at)",
    "DROP INDEX outbox.events_created_at_brin",
    "ALTER TABLE outbox.captures ADD COLUMN exclude_columns text[] NOT NULL DEFAULT '{}'",
    "COMMENT ON COLUMN outbox.captures.exclude_columns IS 'columns left out of this table''s events "
    "(outbox install --exclude SCHEMA.TABLE.COLUMN); an UPDATE here takes effect at once'",
    f"GRANT SELECT ON outbox.captures TO {OWNER}",
)


def _execute(stmt: str) -> None:
    op.execute(DDL(stmt.strip().replace("%", "%%")))


def upgrade() -> None:
    for stmt in UPGRADE:
        _execute(stmt)
    _execute(capture_function())


def downgrade() -> None:
    _execute(str(_revision("0005_capture_definer.py").CAPTURE_FUNCTION))
    _execute(f"REVOKE SELECT ON outbox.captures FROM {OWNER}")
    _execute("ALTER TABLE outbox.captures DROP COLUMN exclude_columns")
    _execute("CREATE INDEX events_created_at_brin ON outbox.events USING brin (created_at)")
    _execute("DROP INDEX outbox.events_created_at")
